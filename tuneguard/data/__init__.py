"""Data: read, validate, augment, template, tokenize, pack."""

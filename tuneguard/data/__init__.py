"""Data: read, validate, template, tokenize, pack."""

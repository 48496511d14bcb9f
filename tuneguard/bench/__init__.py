"""Benchmarks of training and evaluation memory and speed, against the usual way."""

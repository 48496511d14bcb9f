"""Evaluation: the scoring engine, tasks, metrics and the base-vs-tuned comparison."""

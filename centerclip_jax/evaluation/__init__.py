"""Evaluation: embed a split, retrieval metrics."""

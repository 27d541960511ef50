"""Inference library for the apps: one encoder (checkpoint -> model -> embeddings) and
cluster inspection."""

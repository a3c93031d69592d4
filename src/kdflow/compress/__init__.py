"""Compression: which parts of a model to keep (pruning by importance)."""

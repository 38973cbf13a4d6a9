"""Data: sources turned into prepared, split and normalised datasets; synthetic generators."""

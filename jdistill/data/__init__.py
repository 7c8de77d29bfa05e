"""Prompt and example data: reading, tokenising, batching per teacher, packing."""

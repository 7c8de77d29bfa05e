"""Test and demo fixtures: the toy world, tiny HF checkpoints (never imported by the library)."""

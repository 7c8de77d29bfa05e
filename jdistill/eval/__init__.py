"""What a model can do: verifiable rewards and per-domain accuracy."""

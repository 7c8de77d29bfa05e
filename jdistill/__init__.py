"""jdistill: JAX-native multi-teacher on-policy distillation."""

__version__ = "0.2.0"

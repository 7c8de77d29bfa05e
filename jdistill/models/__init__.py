"""Decoder models (Llama 3 / Qwen2 / Qwen3, their MoE variants, DeepSeek-V3) and Hugging Face
conversion."""

from jdistill.models.config import ModelConfig
from jdistill.models.transformer import Transformer, init_cache

__all__ = ["ModelConfig", "Transformer", "init_cache"]

"""bench/memory_plan.py's CPU stand-in for MoE models: the dense proxy plus the parameters it
declares left out is the real model, parameter for parameter, for every MoE family the plan
has a row of (Qwen3-MoE, DeepSeek-V3, Nemotron-H)."""

import importlib.util
import math
import os

import jax
import pytest
from flax import nnx

from jdistill.models import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def memory_plan():
  spec = importlib.util.spec_from_file_location(
    "memory_plan", os.path.join(ROOT, "bench", "memory_plan.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _params(cfg: ModelConfig) -> int:
  state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def _shrunk(memory_plan, name: str) -> ModelConfig:
  """The plan's model at a width the test can count quickly, its structure kept (the layer
  pattern, the experts, the shared expert, the dense first layers)."""
  cfg = memory_plan.model_config(name)
  small = dict(vocab_size=256, hidden_size=32, intermediate_size=96, num_heads=4, head_dim=8)
  small.update(num_kv_heads=min(cfg.num_kv_heads, 4), moe_intermediate_size=16)
  if cfg.mla:
    small.update(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
  if cfg.hybrid:
    small.update(mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=8)
  else:  # depth is a count there (a pattern here); the first layers may be dense
    small.update(num_layers=4)
  if cfg.shared_expert_intermediate_size:
    small.update(shared_expert_intermediate_size=32)
  return cfg.replace(num_experts=16, **small)


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "deepseek-v3-16b", "nemotron-3-nano-30b-a3b"])
def test_the_moe_proxy_and_what_it_leaves_out_are_the_whole_model(memory_plan, name):
  cfg = _shrunk(memory_plan, name)
  proxy, extra = memory_plan.cpu_moe_proxy(cfg)
  assert proxy.num_experts == 0 and proxy.hybrid == cfg.hybrid and proxy.mla == cfg.mla
  assert _params(proxy) + extra["extra_params"] == _params(cfg)
  assert extra["gathered_rows"] == cfg.num_experts_per_tok * cfg.hidden_size


def test_nemotron_3_nano_has_its_published_size(memory_plan):
  """31.6B parameters, 3.2B of them active per token (NVIDIA's model card)."""
  cfg = memory_plan.model_config("nemotron-3-nano-30b-a3b")
  total = _params(cfg)
  proxy, _ = memory_plan.cpu_moe_proxy(cfg)
  active = _params(proxy) - cfg.vocab_size * cfg.hidden_size  # the input embedding is a lookup
  assert round(total / 1e9, 1) == 31.6 and round(active / 1e9, 1) == 3.2

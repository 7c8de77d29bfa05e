"""MLA's latent KV cache against a GQA cache of the same model size: bytes and decode time.

Bytes: `init_cache`'s shapes (`jax.eval_shape`, nothing allocated) per token and for a
batch, at DeepSeek-V3's shape (61 layers, 128 heads, kv_lora_rank 512, RoPE key 64) against a
GQA model of the same width, depth and heads (8 KV heads of 128, Llama/Qwen's usual).

Time: one jitted decode step (one token per row against a full cache, the sampler's inner
step) of a small MLA model and a GQA model of the same width, depth and heads on this
machine's CPU, median over steps. The MLA step runs the absorbed projections
(`jdistill.models.mla`); the GQA step `transformer.Attention`.

  python bench/mla_cache.py                  # the figures
  python bench/mla_cache.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import cache_bytes  # noqa: E402
from flax import nnx  # noqa: E402

from jdistill.models import ModelConfig, Transformer, init_cache  # noqa: E402

# DeepSeek-V3 671B's attention and cache shape (the MoE does not change the cache)
DEEPSEEK_V3 = ModelConfig(
  model_type="deepseek_v3", vocab_size=129_280, hidden_size=7168, intermediate_size=18_432,
  num_layers=61, num_heads=128, num_kv_heads=128, q_lora_rank=1536, kv_lora_rank=512,
  qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, dtype="bfloat16",
  param_dtype="bfloat16", scan_layers=False,
)  # fmt: skip
GQA_OF_V3 = ModelConfig(
  model_type="qwen3", vocab_size=129_280, hidden_size=7168, intermediate_size=18_432,
  num_layers=61, num_heads=128, num_kv_heads=8, head_dim=128, dtype="bfloat16",
  param_dtype="bfloat16", scan_layers=False,
)  # fmt: skip


def small_pair(width: int, layers: int, heads: int) -> tuple[ModelConfig, ModelConfig]:
  """(MLA, GQA) of one width, depth and head count, dense MLPs, f32 (the CPU's fast type).
  MLA: kv_lora_rank = 2·head_dim, RoPE key head_dim/2 (V3's 512 and 64 at head_dim 128 are
  4· and 1/2·); GQA: heads/4 KV heads of head_dim."""
  hd = width // heads
  base = dict(vocab_size=1024, hidden_size=width, intermediate_size=4 * width, num_layers=layers,
              num_heads=heads)  # fmt: skip
  mla = ModelConfig(
    model_type="deepseek_v3", num_kv_heads=heads, kv_lora_rank=2 * hd, qk_nope_head_dim=hd,
    qk_rope_head_dim=hd // 2, v_head_dim=hd, **base,
  )  # fmt: skip
  gqa = ModelConfig(model_type="qwen3", num_kv_heads=max(heads // 4, 1), head_dim=hd, **base)
  return mla, gqa


def attention_params(cfg: ModelConfig) -> int:
  state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)
  return sum(x.size for x in jax.tree.leaves(state["layers"][0]["attn"]))


def decode_ms(cfg: ModelConfig, batch: int, context: int, steps: int) -> float:
  """Median ms of one decode step at slot `context` of a `context + steps` cache."""
  graphdef, state = nnx.split(jax.jit(lambda: Transformer(cfg, nnx.Rngs(0)))())
  cache = init_cache(cfg, batch, context + steps)
  kv_mask = jnp.ones((batch, context + steps), bool)

  @jax.jit
  def step(state, cache, tok, index):
    m = nnx.merge(graphdef, state)
    pos = jnp.full((batch, 1), index)
    hidden, cache = m(tok, pos, kv_mask=kv_mask, cache=cache, cache_index=index)
    return jnp.argmax(m.logits(hidden)[:, -1], -1)[:, None].astype(jnp.int32), cache

  tok = jnp.ones((batch, 1), jnp.int32)
  tok, cache = step(state, cache, tok, context)  # compile
  times = []
  for i in range(1, steps):
    t0 = time.perf_counter()
    tok, cache = jax.block_until_ready(step(state, cache, tok, context + i))
    times.append(1e3 * (time.perf_counter() - t0))
  return statistics.median(times)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--width", type=int, default=512)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--contexts", default="256,1024")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--json", default="")
  a = p.parse_args(argv)
  out = {"full_shape": {}, "small": []}
  for name, cfg in (("deepseek_v3_mla", DEEPSEEK_V3), ("gqa_8kv", GQA_OF_V3)):
    per_token = cache_bytes(cfg, 1, 1)
    out["full_shape"][name] = {
      "cache_bytes_per_token": per_token,
      "cache_gb_32x32k": per_token * 32 * 32_768 / 1e9,
      "attention_params_per_layer": attention_params(cfg),
    }
    print(f"{name:<16} {per_token:>9,} B/token  {per_token * 32 * 32_768 / 1e9:8.1f} GB at "
          f"32 rows x 32k  attention params/layer {attention_params(cfg):,}")  # fmt: skip
  mla, gqa = small_pair(a.width, a.layers, a.heads)
  for context in [int(c) for c in a.contexts.split(",")]:
    row = {"context": context, "batch": a.batch}
    for name, cfg in (("mla", mla), ("gqa", gqa)):
      row[f"{name}_cache_mb"] = cache_bytes(cfg, a.batch, context) / 1e6
      row[f"{name}_attention_params"] = attention_params(cfg)
      row[f"{name}_decode_ms"] = decode_ms(cfg, a.batch, context, a.steps)
    out["small"].append(row)
    print(f"width {a.width} x {a.layers} layers, batch {a.batch}, context {context}: cache "
          f"MLA {row['mla_cache_mb']:.2f} MB vs GQA {row['gqa_cache_mb']:.2f} MB; decode step "
          f"MLA {row['mla_decode_ms']:.2f} ms vs GQA {row['gqa_decode_ms']:.2f} ms")  # fmt: skip
  out["device"] = str(jax.devices()[0])
  if a.json:
    with open(a.json, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()

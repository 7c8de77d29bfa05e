"""Mamba-2 decode against attention as the context grows: tokens/s and the cache's bytes.

A Mamba-2 layer decodes from a fixed-size state (its conv window and `[heads, head_dim,
state]` SSM state), so its step costs the same at any context; an attention layer reads every
cached key and value, so its step and its cache grow with the context.

Bytes: `init_cache`'s shapes (`jax.eval_shape`, nothing allocated) of Nemotron 3 Nano (23
Mamba-2, 23 MoE and 6 attention layers; bench/memory_plan.py's shape) against the same model
with attention in place of every Mamba-2 layer, per row at growing contexts.

Time: one jitted decode step (one token per row at slot `context` of the cache, the sampler's
inner step) of two small Nemotron-H models of one width and depth on this machine's CPU,
median over steps, the two models' steps interleaved: `M-M-…` (Mamba-2 mixers, each followed
by an MLP) and `*-*-…` (attention in their place). Tokens/s = rows / step time.

  python bench/mamba_decode.py                  # the figures
  python bench/mamba_decode.py --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import memory_plan  # noqa: E402  (after jax: it leaves the device count alone then)
from common import cache_bytes  # noqa: E402
from flax import nnx  # noqa: E402

from jdistill.models import ModelConfig, Transformer, init_cache  # noqa: E402


def nano() -> ModelConfig:
  """Nemotron 3 Nano's config, from bench/memory_plan.py (one place for the shape)."""
  return memory_plan.model_config("nemotron-3-nano-30b-a3b")


def small_pair(width: int, layers: int) -> tuple[ModelConfig, ModelConfig]:
  """(Mamba-2, attention) Nemotron-H models of `layers` mixers each followed by an MLP, f32:
  Mamba-2 with Nano's head width (64), state (128) and 8 groups; attention with 2 KV heads;
  layers unrolled (the committed results' layout)."""
  heads = width // 64
  base = dict(
    model_type="nemotron_h", vocab_size=1024, hidden_size=width, intermediate_size=4 * width,
    num_layers=2 * layers, num_heads=heads, num_kv_heads=2, head_dim=64,
    mamba_num_heads=2 * heads, mamba_head_dim=64, ssm_state_size=128,
    mamba_n_groups=min(8, 2 * heads), scan_layers=False,
  )  # fmt: skip
  return (
    ModelConfig(layer_pattern="M-" * layers, **base),
    ModelConfig(layer_pattern="*-" * layers, **base),
  )


def decode_steps(cfg: ModelConfig, batch: int, context: int, steps: int):
  """A compiled decode step at slots `context, context + 1, …` of a `context + steps` cache:
  a function of no arguments that runs the next step and returns its ms."""
  graphdef, state = nnx.split(jax.jit(lambda: Transformer(cfg, nnx.Rngs(0)))())
  kv_mask = jnp.ones((batch, context + steps), bool)

  @functools.partial(jax.jit, donate_argnums=(1,))  # the cache updated in place, as the sampler's
  def step(state, cache, tok, index):
    m = nnx.merge(graphdef, state)
    pos = jnp.full((batch, 1), index)
    hidden, cache = m(tok, pos, kv_mask=kv_mask, cache=cache, cache_index=index)
    return jnp.argmax(m.logits(hidden)[:, -1], -1)[:, None].astype(jnp.int32), cache

  carry = {"tok": jnp.ones((batch, 1), jnp.int32), "cache": init_cache(cfg, batch, context + steps)}
  slots = iter(range(context, context + steps))

  def run() -> float:
    t0 = time.perf_counter()
    carry["tok"], carry["cache"] = jax.block_until_ready(
      step(state, carry["cache"], carry["tok"], next(slots))
    )
    return 1e3 * (time.perf_counter() - t0)

  run()  # compile
  return run


def decode_ms(cfgs: dict[str, ModelConfig], batch: int, context: int, steps: int) -> dict:
  """Median ms of one decode step per model, the models' steps interleaved (a load on the
  machine falls on all of them alike)."""
  runs = {name: decode_steps(cfg, batch, context, steps) for name, cfg in cfgs.items()}
  times = {name: [] for name in cfgs}
  for _ in range(steps - 1):
    for name, run in runs.items():
      times[name].append(run())
  return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--width", type=int, default=512)
  p.add_argument("--layers", type=int, default=4, help="mixers (each followed by an MLP)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--contexts", default="256,1024,4096,16384")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--json", default="")
  a = p.parse_args(argv)
  out = {"full_shape": [], "small": []}
  hybrid = nano()
  attention = hybrid.replace(layer_pattern=hybrid.layer_pattern.replace("M", "*"))
  for context in (4096, 32_768, 131_072, 1_048_576):
    row = {"context": context}
    for name, cfg in (("nano", hybrid), ("nano_attention_for_mamba", attention)):
      row[f"{name}_cache_gb_per_row"] = cache_bytes(cfg, 1, context) / 1e9
    out["full_shape"].append(row)
    print(
      f"Nemotron 3 Nano at {context:>9,} tokens: cache {row['nano_cache_gb_per_row']:7.3f} GB a "
      f"row; with attention for Mamba-2 {row['nano_attention_for_mamba_cache_gb_per_row']:7.3f}"
    )
  mamba, attn = small_pair(a.width, a.layers)
  for context in [int(c) for c in a.contexts.split(",")]:
    row = {"context": context, "batch": a.batch}
    cfgs = {"mamba": mamba, "attention": attn}
    for name, ms in decode_ms(cfgs, a.batch, context, a.steps).items():
      row[f"{name}_cache_mb"] = cache_bytes(cfgs[name], a.batch, context) / 1e6
      row[f"{name}_decode_ms"] = ms
      row[f"{name}_tokens_per_s"] = 1e3 * a.batch / ms
    row["mamba_speedup"] = row["attention_decode_ms"] / row["mamba_decode_ms"]
    out["small"].append(row)
    print(
      f"width {a.width} x {a.layers} mixers, batch {a.batch}, context {context:>6}: decode "
      f"Mamba-2 {row['mamba_tokens_per_s']:7.0f} tok/s ({row['mamba_cache_mb']:.2f} MB cache) vs "
      f"attention {row['attention_tokens_per_s']:7.0f} tok/s ({row['attention_cache_mb']:.1f} "
      f"MB): {row['mamba_speedup']:.2f}x",
      flush=True,
    )
  out["device"] = str(jax.devices()[0])
  out["args"] = {k: v for k, v in vars(a).items() if k != "json"}
  if a.json:
    with open(a.json, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()

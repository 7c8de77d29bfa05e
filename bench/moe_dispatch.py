"""Forward+backward time and XLA temp memory of one MoE layer, per expert dispatch.

  python bench/moe_dispatch.py                                   # Qwen3-30B-A3B layer, 2,048 tokens
  python bench/moe_dispatch.py --tokens 8192 --json moe.json     # the H200 measurement
  python bench/moe_dispatch.py --tokens 2048 --experts 64 --k 4 --hidden 512 --expert_width 256

One layer: router matmul, top-k (`moe.route`, normalised), the routed SwiGLU experts, and
the gradient of `sum(y^2)` with respect to x, the router and the three expert weights.
`ragged` is `jax.lax.ragged_dot`, `dense` every expert on every token (E/k times the FLOPs),
`blocked` the block-padded grouped matmul at its auto block size and group, and
`blocked_B<b>_G<g>` the same at the `--blocks` / `--groups` given (G 0: all blocks at once).
Time: median of `--repeats` runs after a warm-up; memory: the compiled program's
`memory_analysis().temp_size_in_bytes`. Ratios are against `ragged`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import timed  # noqa: E402

from jdistill.models import moe  # noqa: E402


def layer_step(run, k: int):
  """`(params, x)` → grads of `sum(y^2)` wrt params and x, for the dispatch `run`."""

  def loss(params, x):
    router, gate, up, down = params
    logits = jnp.dot(x, router, preferred_element_type=jnp.float32)
    weights, experts = moe.route(logits, k, norm_topk_prob=True)
    y = run(x, experts, weights.astype(x.dtype), gate, up, down)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def measure(name, run, params, x, k, repeats) -> dict:
  step = layer_step(run, k)
  compiled = step.lower(params, x).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  _, t = timed(compiled, params, x, repeats=repeats)
  return {"dispatch": name, "ms": t * 1e3, "temp_mb": temp / 2**20}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokens", type=int, default=2048)
  p.add_argument("--experts", type=int, default=128)
  p.add_argument("--k", type=int, default=8)
  p.add_argument("--hidden", type=int, default=2048)
  p.add_argument("--expert_width", type=int, default=768)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--dispatches", default="ragged,dense,blocked")
  p.add_argument("--blocks", default="", help="extra blocked variants: block sizes, e.g. 64,128")
  p.add_argument("--groups", default="", help="... times blocks per scan step, e.g. 0,8,32")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--json", default="")
  a = p.parse_args(argv)
  dt = jnp.dtype(a.dtype)
  e, d, f = a.experts, a.hidden, a.expert_width
  ks = jax.random.split(jax.random.key(0), 5)
  params = (
    (0.02 * jax.random.normal(ks[0], (d, e))).astype(dt),
    (0.02 * jax.random.normal(ks[1], (e, d, f))).astype(dt),
    (0.02 * jax.random.normal(ks[2], (e, d, f))).astype(dt),
    (0.02 * jax.random.normal(ks[3], (e, f, d))).astype(dt),
  )
  x = jax.random.normal(ks[4], (a.tokens, d)).astype(dt)
  runs = {
    "ragged": moe.ragged_experts,
    "dense": moe.dense_experts,
    "blocked": moe.blocked_experts,
  }
  variants = [(n, runs[n]) for n in a.dispatches.split(",") if n]
  for b in [int(v) for v in a.blocks.split(",") if v]:
    for g in [int(v) for v in a.groups.split(",") if v] or [None]:
      run = functools.partial(moe.blocked_experts, block_size=b, group=g or 1 << 30)
      variants.append((f"blocked_B{b}_G{g if g is not None else 'auto'}", run))
  m = a.tokens * a.k
  shape = dict(
    tokens=a.tokens, experts=e, k=a.k, hidden=d, expert_width=f, dtype=a.dtype,
    auto_block=moe.block_size_for(m, e),
  )  # fmt: skip
  results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "shape": shape}
  print(json.dumps(results), flush=True)
  rows = []
  for name, run in variants:
    rows.append(measure(name, run, params, x, a.k, a.repeats))
    print(f"  {name}: {rows[-1]['ms']:.1f} ms, {rows[-1]['temp_mb']:.1f} MB", flush=True)
  base = next((r for r in rows if r["dispatch"] == "ragged"), rows[0])
  for r in rows:
    r["time_vs_ragged"] = r["ms"] / base["ms"]
    r["temp_vs_ragged"] = r["temp_mb"] / base["temp_mb"] if base["temp_mb"] else float("nan")
  head = ("fwd+bwd ms", "temp MB", "time/ragged", "temp/ragged")
  print(f"\n{'dispatch':<22}{head[0]:>12}{head[1]:>10}{head[2]:>13}{head[3]:>13}")
  for r in rows:
    print(
      f"{r['dispatch']:<22}{r['ms']:>12.1f}{r['temp_mb']:>10.1f}"
      f"{r['time_vs_ragged']:>13.2f}{r['temp_vs_ragged']:>13.2f}"
    )
  results["rows"] = rows
  if a.json:
    with open(a.json, "w") as fh:
      json.dump(results, fh, indent=1)
  return results


if __name__ == "__main__":
  main()

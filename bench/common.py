"""Helpers every bench script shares: median timing, XLA's FLOP count, the matmul peak."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn, *args, repeats: int):
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  return out, float(np.median(times))


def flops_of(jitted, *args) -> float:
  cost = jitted.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  _, t = timed(f, a, a, repeats=repeats)
  return 2 * n**3 / t


def cache_bytes(cfg, batch: int, length: int) -> int:
  """Bytes of `init_cache(cfg, batch, length)` (a `ModelConfig`'s sampler cache), nothing
  allocated."""
  from jdistill.models import init_cache

  shapes = jax.eval_shape(lambda: init_cache(cfg, batch, length))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))

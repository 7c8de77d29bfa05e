"""The scale features on one real accelerator: compile time under scan, the memory plan's
estimate against the device, streamed against resident teachers, and MoE dispatch.

  python bench/gpu_scale.py --json results.json       # on a GPU (about 6 minutes on an H200)
  python bench/gpu_scale.py --smoke                   # tiny shapes on CPU, the same code

1. Compile time of the Qwen3-0.6B-shaped OPD step (28 layers), scanned vs unrolled.
2. `bench/memory_plan.py`'s programs for one device (a Qwen3-1.7B student, one Qwen3-8B
   teacher, 2 rows x 8,192 tokens), resident and streamed: XLA's compiled per-device peak,
   then the programs run on random weights and the device's measured peak
   (`memory_stats()["peak_bytes_in_use"]`) and step time. The CPU estimate of the same
   programs is computed on CPU (`--cpu_estimate`) and put beside it.
3. The Qwen3-30B-A3B MoE layer shape (128 experts, top-8, width 2,048, 768 per expert):
   forward+backward time of the ragged (grouped matmul) dispatch against the dense
   one-hot reference, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memory_plan as mp  # noqa: E402

from jdistill.models import ModelConfig  # noqa: E402
from jdistill.models import moe as moe_lib  # noqa: E402
from jdistill.runtime import sharding as shd  # noqa: E402

mp.SETUPS["qwen3_1.7b_1x8b"] = ("qwen3-1.7b", "qwen3-8b", 1, 8192, 2)
mp.SETUPS["tiny_1x"] = ("tiny", "tiny", 1, 128, 2)


def log(msg):
  print(msg, flush=True)


def compile_times(smoke: bool) -> dict:
  """Lower + compile of the OPD step (student and one same-shape teacher), both layouts."""
  name = "tiny" if smoke else "qwen3-0.6b"
  mp.MODELS["qwen3-0.6b"] = dict(
    **mp.QWEN3, hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
    num_kv_heads=8, tie_word_embeddings=True,
  )  # fmt: skip
  mp.SETUPS["compile"] = (name, name, 1, 128 if smoke else 2048, 2)
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  out = {}
  for scan in (True, False):
    original = mp.model_config

    def with_layout(n, **kw):
      return original(n, **{**kw, "scan_layers": scan})

    mp.model_config = with_layout
    try:
      fn, args = mp.programs(
        "compile", mesh, "resident", remat_policy="full", chunk=1024, attention=1024
      )["step"]
      t0 = time.perf_counter()
      fn.lower(*args).compile()
      out["scanned" if scan else "unrolled"] = time.perf_counter() - t0
    finally:
      mp.model_config = original
    log(f"compile {name} OPD step, scan={scan}: {out['scanned' if scan else 'unrolled']:.1f} s")
  out["ratio"] = out["scanned"] / out["unrolled"]
  return out


_FILLERS: dict = {}


def _filler(shape, dtype, sharding):
  """One small compile per distinct leaf (the model's own init compiles for minutes)."""
  key = (shape, jnp.dtype(dtype).name, sharding)
  if key not in _FILLERS:
    _FILLERS[key] = jax.jit(
      lambda k: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype),
      out_shardings=sharding,
    )
  return _FILLERS[key]


def materialise(tree, seed=0, zeros=False):
  """Random (or zero) arrays for a tree of sharded ShapeDtypeStructs, in their memory kinds."""
  leaves, treedef = jax.tree.flatten(tree)
  out = []
  for i, x in enumerate(leaves):
    on_device = x.sharding.with_memory_kind("device")
    if zeros or jnp.issubdtype(x.dtype, jnp.integer):
      value = jax.device_put(np.zeros(x.shape, x.dtype), on_device)
    else:
      value = _filler(x.shape, x.dtype, on_device)(jax.random.key(seed + i))
    if x.sharding.memory_kind == "pinned_host":
      value = jax.device_put(value, x.sharding)
    out.append(value)
  return jax.tree.unflatten(treedef, out)


def _batch_values(batch):
  b, length = batch["tokens"].shape
  mask = np.zeros((b, length), np.float32)
  mask[:, 64:] = 1.0
  values = {
    "tokens": np.random.RandomState(0).randint(3, 1000, (b, length)).astype(np.int32),
    "completion_mask": mask,
    "logprobs": np.full((b, length), -2.0, np.float32),
    "sampling_logprobs": np.full((b, length), -2.0, np.float32),
    "lengths": np.full((b,), length, np.int32),
  }
  return {k: jax.device_put(v, batch[k].sharding) for k, v in values.items()}


def peak_bytes() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  return float(stats.get("peak_bytes_in_use", float("nan")))


def memory_check(setup: str, placement: str, run: bool) -> dict:
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  kw = dict(remat_policy="full", chunk=1024, attention=1024)
  progs = mp.programs(setup, mesh, placement, **kw)
  out = {"setup": setup, "placement": placement}
  step_fn, step_args = progs["step"]
  t0 = time.perf_counter()
  compiled = step_fn.lower(*step_args).compile()
  out["compile_s"] = time.perf_counter() - t0
  out["xla_step_peak_gb"] = mp.device_bytes(compiled)["peak"] / mp.GB
  if placement == "streamed":
    fwd_fn, fwd_args = progs["forward"]
    out["xla_forward_peak_gb"] = mp.device_bytes(fwd_fn.lower(*fwd_args).compile())["peak"] / mp.GB
  if not run:
    return out
  abstract = progs["state"]
  state = {
    "params": materialise(abstract["params"]),
    "opt_state": materialise(abstract["opt_state"], zeros=True),  # Adam's moments start at 0
    "step": materialise(abstract["step"], zeros=True),
  }
  batch = _batch_values(step_args[-1])
  if placement == "resident":
    teachers = materialise(step_args[1], seed=1000)
    call = lambda s: compiled(s, teachers, batch)  # noqa: E731
  else:
    host = materialise(fwd_args[0], seed=1000)
    unembed = materialise(progs["cache_per_teacher"][1], seed=2000)

    def call(s):
      hidden = fwd_fn(host, batch)
      return compiled(s, {0: (hidden, unembed)}, batch)

  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    state, metrics = call(state)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t0)
  out["step_s"] = float(np.median(times[1:]))
  out["measured_peak_gb"] = peak_bytes() / mp.GB
  out["loss"] = float(metrics["loss"])
  return out


def moe_dispatch(smoke: bool) -> dict:
  cfg = ModelConfig(
    model_type="qwen3_moe", vocab_size=1024, hidden_size=2048 if not smoke else 64,
    intermediate_size=6144, num_layers=1, num_heads=32 if not smoke else 4, num_kv_heads=4,
    head_dim=128 if not smoke else 16, qk_norm=True, num_experts=128 if not smoke else 8,
    num_experts_per_tok=8 if not smoke else 2, moe_intermediate_size=768 if not smoke else 16,
    norm_topk_prob=True, param_dtype="bfloat16", dtype="bfloat16",
  )  # fmt: skip
  tokens = 8192 if not smoke else 64
  x = jax.random.normal(jax.random.key(0), (1, tokens, cfg.hidden_size), jnp.bfloat16)
  out = {"tokens": tokens}
  for dispatch in ("ragged", "dense"):
    layer = moe_lib.MoE(cfg.replace(moe_dispatch=dispatch), nnx.Rngs(0))
    graphdef, state = nnx.split(layer)

    def loss(state, x):
      y = nnx.merge(graphdef, state)(x)
      return jnp.sum(y.astype(jnp.float32) ** 2)

    step = jax.jit(jax.grad(loss))
    jax.block_until_ready(step(state, x))
    t0 = time.perf_counter()
    for _ in range(5):
      g = step(state, x)
    jax.block_until_ready(g)
    out[dispatch + "_ms"] = (time.perf_counter() - t0) / 5 * 1e3
    log(f"MoE layer fwd+bwd, {tokens} tokens, {dispatch}: {out[dispatch + '_ms']:.2f} ms")
  out["dense_over_ragged"] = out["dense_ms"] / out["ragged_ms"]
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--cpu_estimate", action="store_true", help="only the XLA peaks, no run")
  p.add_argument("--parts", default="compile,memory,moe")
  p.add_argument(
    "--placements",
    default="resident,streamed",
    help="one per process for a clean measured peak (the device's peak is process-wide)",
  )
  p.add_argument("--json", default="")
  a = p.parse_args(argv)
  setup = "tiny_1x" if a.smoke else "qwen3_1.7b_1x8b"
  results = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
  parts = a.parts.split(",")
  if "compile" in parts and not a.cpu_estimate:
    results["compile"] = compile_times(a.smoke)
  if "memory" in parts:
    results["memory"] = []
    for placement in a.placements.split(","):
      r = memory_check(setup, placement, run=not a.cpu_estimate)
      results["memory"].append(r)
      log(json.dumps(r))
  if "moe" in parts and not a.cpu_estimate:
    results["moe"] = moe_dispatch(a.smoke)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  main()

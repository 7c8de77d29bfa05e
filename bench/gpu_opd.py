"""The OPD step of Qwen3-shaped students on one accelerator: tokens/s, MFU, sampler tok/s, memory.

For each size, a student (f32 master params, bf16 compute) and one same-shaped teacher (bf16
params) run the real pieces: the jitted sampler makes the rollouts, then one compiled train
step (teacher forward, student forward/backward, chunked full-vocab reverse KL, AdamW, donated
state). MFU is given twice, over the chip's dense bf16 peak (`--peak_tflops`, default the H100/H200
datasheet's 989): "XLA MFU" from XLA's cost analysis of the compiled step, and "model MFU" from
the usual count (2 FLOPs per weight per token and causal attention; student forward + backward,
teacher forward). On an H200 (jax 0.11.2) XLA's count came out about 10x below the model count,
which suggests it leaves out the cuBLAS matmuls; the model count is the one to quote. A bf16
matmul measured in the same run gives the chip's reachable rate.

  python bench/gpu_opd.py                        # Qwen3-0.6B and Qwen3-1.7B shapes
  python bench/gpu_opd.py --sizes tiny --rows 4  # a CPU smoke run of the same code
  python bench/gpu_opd.py --json results.json

Random weights: no stop token is drawn, so every row decodes `--new` tokens.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import timed
from flax import nnx

from jdistill.losses import LossSettings
from jdistill.models import ModelConfig, Transformer
from jdistill.runtime import sharding as shd
from jdistill.sampling import Sampler, SamplingParams
from jdistill.step import common as step_common
from jdistill.step import opd as ts

QWEN3 = dict(
  model_type="qwen3",
  vocab_size=151_936,
  num_heads=16,
  num_kv_heads=8,
  head_dim=128,
  qk_norm=True,
  tie_word_embeddings=True,
  rope_theta=1_000_000.0,
)
SIZES = {
  "0.6B": ModelConfig(**QWEN3, hidden_size=1024, intermediate_size=3072, num_layers=28),
  "1.7B": ModelConfig(**QWEN3, hidden_size=2048, intermediate_size=6144, num_layers=28),
  "tiny": ModelConfig(
    **{**QWEN3, "vocab_size": 4096}, hidden_size=128, intermediate_size=256, num_layers=2
  ),
}


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
  return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_model(cfg: ModelConfig, seed: int) -> nnx.Module:
  """A model with N(0, 0.02) weights and unit norm scales, one small compile per leaf shape.

  (The model's own initialisers in one jitted init compile for minutes on a GPU at 28 layers.)
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [
    jnp.ones(x.shape, x.dtype) if x.ndim == 1 else _normal(k, x.shape, x.dtype)
    for k, x in zip(keys, leaves)
  ]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def n_params(state) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def forward_flops_per_token(cfg: ModelConfig, n: int, seq: int) -> float:
  """Matmul FLOPs of one forward per token: 2 per weight (the tied unembedding counted once,
  the embedding lookup not at all) plus causal attention over seq/2 positions on average."""
  return 2 * n + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq / 2


def peak_bytes() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  return float(stats.get("peak_bytes_in_use", float("nan")))


def bf16_matmul_tflops(n: int) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  _, t = timed(jax.jit(lambda x, y: x @ y), a, a, repeats=5)
  return 2 * n**3 / t / 1e12


def bench_size(name: str, args, mesh) -> dict:
  base = SIZES[name]
  student_cfg = base.replace(param_dtype="float32", dtype="bfloat16")
  teacher_cfg = base.replace(param_dtype="bfloat16", dtype="bfloat16")
  t0 = time.perf_counter()
  student = random_model(student_cfg, 0)
  teacher = random_model(teacher_cfg, 1)
  graphdef, params = nnx.split(student)
  t_graphdef, t_state = nnx.split(teacher)
  del student, teacher
  spec = step_common.TeacherSpec(
    "teacher",
    LossSettings(loss="reverse_kl", chunk_size=args.chunk),
    1.0,
    tuple(range(args.rows)),
  )
  opt, sched = step_common.make_optimizer(1e-5, steps=1000, warmup_steps=0)
  state = {
    "params": params,
    "opt_state": jax.jit(opt.init)(params),
    "step": jnp.zeros((), jnp.int32),
  }
  print(
    f"[{name}] {n_params(params) / 1e9:.2f}B params, built in {time.perf_counter() - t0:.0f} s",
    flush=True,
  )

  rng = np.random.RandomState(0)
  prompts = rng.randint(5, base.vocab_size, (args.rows, args.prompt)).astype(np.int32)
  lengths = np.full((args.rows,), args.prompt, np.int32)
  sampler = Sampler(graphdef, mesh)
  sp = SamplingParams(max_new_tokens=args.new, temperature=1.0, prompt_buckets=(args.prompt,))

  def sample(p, i):
    out = sampler.generate(p, (prompts, lengths), jax.random.key(i), sp)
    jax.block_until_ready(out.tokens)
    return out

  t0 = time.perf_counter()
  out = sample(state["params"], 0)
  sampler_compile = time.perf_counter() - t0
  times = []
  for i in range(args.repeats):
    t0 = time.perf_counter()
    out = sample(state["params"], i + 1)
    times.append(time.perf_counter() - t0)
  t_sample = float(np.median(times))
  print(
    f"[{name}] sampler: first call {sampler_compile:.1f} s, then {t_sample * 1e3:.0f} ms "
    f"({args.rows * args.new / t_sample:,.0f} tok/s)",
    flush=True,
  )

  batch = step_common.rollout_batch(out)
  step = jax.jit(
    functools.partial(
      ts.train_step,
      student_graphdef=graphdef,
      teacher_graphdefs=(t_graphdef,),
      specs=(spec,),
      optimizer=opt,
      schedule=sched,
      diagnostics=False,
    ),
    donate_argnums=0,
  )
  t0 = time.perf_counter()
  compiled = step.lower(state, (t_state,), batch).compile()
  step_compile = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  state, metrics = compiled(state, (t_state,), batch)  # warm-up
  jax.block_until_ready(metrics["loss"])
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    state, metrics = compiled(state, (t_state,), batch)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t0)
  t_step = float(np.median(times))
  tokens = args.rows * (args.prompt + args.new - 1)
  result = {
    "size": name,
    "params": n_params(params),
    "rows": args.rows,
    "prompt": args.prompt,
    "new": args.new,
    "sampler_s": t_sample,
    "sampler_tok_s": args.rows * args.new / t_sample,
    "sampler_first_call_s": sampler_compile,
    "step_compile_s": step_compile,
    "train_step_s": t_step,
    "train_tok_s": tokens / t_step,
    "train_step_tflops": flops / t_step / 1e12,
    "mfu": flops / t_step / (args.peak_tflops * 1e12),
    # Student forward + backward (3 forwards) and the teacher's forward, no recomputation counted.
    "model_tflops": 4
    * forward_flops_per_token(base, n_params(params), args.prompt + args.new)
    * tokens
    / t_step
    / 1e12,
    "opd_step_s": t_sample + t_step,
    "opd_tok_s": tokens / (t_sample + t_step),
    "loss": float(metrics["loss"]),
    "finite": float(metrics["finite"]),
    "peak_gb": peak_bytes() / 1e9,
  }
  print(
    f"[{name}] train step: compile {step_compile:.1f} s, {t_step * 1e3:.0f} ms, "
    f"{result['train_tok_s']:,.0f} tok/s, {result['train_step_tflops']:.0f} TFLOP/s "
    f"(MFU {result['mfu']:.1%}); peak memory {result['peak_gb']:.1f} GB",
    flush=True,
  )
  return result


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default="0.6B,1.7B", help=f"comma-separated of {list(SIZES)}")
  parser.add_argument("--rows", type=int, default=32)
  parser.add_argument("--prompt", type=int, default=128)
  parser.add_argument("--new", type=int, default=384)
  parser.add_argument("--chunk", type=int, default=256, help="loss chunk (tokens)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--peak_tflops", type=float, default=989.0)
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  mesh = shd.make_mesh({"data": -1})
  dev = jax.devices()[0]
  print(
    f"backend {jax.default_backend()}: {jax.device_count()} x {dev.device_kind}; "
    f"jax {jax.__version__}",
    flush=True,
  )
  measured = bf16_matmul_tflops(8192 if jax.default_backend() != "cpu" else 1024)
  print(f"bf16 matmul, same run: {measured:.1f} TFLOP/s", flush=True)
  results = []
  for name in args.sizes.split(","):
    results.append(bench_size(name, args, mesh))
    results[-1]["mfu_of_measured_matmul"] = results[-1]["train_step_tflops"] / measured
    results[-1]["model_mfu"] = results[-1]["model_tflops"] / args.peak_tflops
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"matmul_tflops": measured, "results": results}, f, indent=1)
  print()
  print(
    f"{'size':<6}{'params':>8}{'sampler tok/s':>15}{'train tok/s':>13}{'XLA MFU':>9}"
    f"{'model MFU':>11}{'OPD tok/s':>11}{'peak GB':>9}"
  )
  for r in results:
    print(
      f"{r['size']:<6}{r['params'] / 1e9:>7.2f}B{r['sampler_tok_s']:>15,.0f}"
      f"{r['train_tok_s']:>13,.0f}{r['mfu']:>9.1%}{r['model_mfu']:>11.1%}"
      f"{r['opd_tok_s']:>11,.0f}{r['peak_gb']:>9.1f}"
    )


if __name__ == "__main__":
  main()

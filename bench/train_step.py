"""OPD step throughput and achieved FLOP/s against a matmul peak measured in the same run.

Shape (CPU): student and 2 teachers, each 4 layers, width 256, 4 heads (2 KV), MLP 768,
vocab 8,192; 16 rows (8 per teacher), prompt 32 + 64 new tokens. Timed separately:
the sampler (rollouts), the teachers' forward alone, and the whole compiled train step
(teachers + student forward/backward + chunked loss + AdamW). FLOPs come from XLA's cost
analysis of each compiled function.

  python bench/train_step.py [--steps 5]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import flops_of, matmul_peak, timed
from flax import nnx

from jdistill.losses import LossSettings
from jdistill.models import ModelConfig, Transformer
from jdistill.runtime import sharding as shd
from jdistill.sampling import Sampler, SamplingParams
from jdistill.step import common as step_common
from jdistill.step import opd as ts

CFG = ModelConfig(
  vocab_size=8192,
  hidden_size=256,
  intermediate_size=768,
  num_layers=4,
  num_heads=4,
  num_kv_heads=2,
  head_dim=64,
)
ROWS_PER_TEACHER, PROMPT, NEW = 8, 32, 64


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  mesh = shd.make_mesh({"data": -1})
  student = shd.create_sharded(lambda: Transformer(CFG, nnx.Rngs(0)), mesh)
  teacher_cfg = CFG.replace(param_dtype="bfloat16", dtype="bfloat16")
  teachers = [
    shd.create_sharded(lambda s=s: Transformer(teacher_cfg, nnx.Rngs(s)), mesh) for s in (1, 2)
  ]
  graphdef, params = nnx.split(student)
  t_graphdefs, t_states = zip(*(nnx.split(t) for t in teachers))
  rows_a, rows_b = step_common.teacher_rows(2, ROWS_PER_TEACHER)
  specs = (
    step_common.TeacherSpec("a", LossSettings(loss="reverse_kl", chunk_size=32), 1.0, rows_a),
    step_common.TeacherSpec("b", LossSettings(loss="sampled_token", chunk_size=32), 1.0, rows_b),
  )
  rows = 2 * ROWS_PER_TEACHER
  opt, sched = step_common.make_optimizer(1e-4, steps=100, warmup_steps=0)
  state = {
    "params": params,
    "opt_state": jax.jit(opt.init)(params),
    "step": jnp.zeros((), jnp.int32),
  }

  rng = np.random.RandomState(0)
  prompts = rng.randint(5, CFG.vocab_size, (rows, PROMPT)).astype(np.int32)
  lengths = np.full((rows,), PROMPT, np.int32)
  sampler = Sampler(graphdef, mesh)
  sp = SamplingParams(max_new_tokens=NEW, temperature=1.0, prompt_buckets=(PROMPT,))
  gen = lambda p: sampler.generate(p, (prompts, lengths), jax.random.key(0), sp)
  out = gen(state["params"])
  t0 = time.perf_counter()
  for _ in range(args.steps):
    out = gen(state["params"])
    jax.block_until_ready(out.tokens)
  t_sample = (time.perf_counter() - t0) / args.steps
  batch = step_common.rollout_batch(out)
  seq = batch["tokens"].shape[1]

  step = jax.jit(
    functools.partial(
      ts.train_step,
      student_graphdef=graphdef,
      teacher_graphdefs=t_graphdefs,
      specs=specs,
      optimizer=opt,
      schedule=sched,
    )
  )
  x = step_common.shifted_inputs(batch)

  def teachers_forward(t_states, x):
    return [
      step_common.teacher_hidden(g, s, x, spec.rows)[0]
      for g, s, spec in zip(t_graphdefs, t_states, specs)
    ]

  teacher_fwd = jax.jit(teachers_forward)

  step_flops = flops_of(step, state, t_states, batch)
  teacher_flops = flops_of(teacher_fwd, t_states, x)
  (state, _), t_step = timed(step, state, t_states, batch, repeats=args.steps)
  _, t_teacher = timed(teacher_fwd, t_states, x, repeats=args.steps)
  peak = matmul_peak()

  tokens = rows * (seq - 1)
  new_tokens = rows * NEW
  print(
    f"backend {jax.default_backend()}, {jax.device_count()} device(s); model: 4 layers, "
    f"width 256, vocab {CFG.vocab_size}; {rows} rows x {seq} tokens "
    f"(prompt {PROMPT} + {NEW} new); student f32, teachers bf16"
  )
  print(f"matmul peak (f32 2048^3, same run):  {peak / 1e9:8.1f} GFLOP/s")
  print(f"{'part':<28}{'ms':>10}{'tokens/s':>12}{'GFLOP/s':>10}{'of peak':>9}")
  print(
    f"{'sampler (rollouts)':<28}{t_sample * 1e3:>10.1f}{new_tokens / t_sample:>12,.0f}"
    f"{'':>10}{'':>9}"
  )
  print(
    f"{'teachers forward (x2)':<28}{t_teacher * 1e3:>10.1f}{tokens / t_teacher:>12,.0f}"
    f"{teacher_flops / t_teacher / 1e9:>10.1f}{teacher_flops / t_teacher / peak:>9.1%}"
  )
  print(
    f"{'train step (all)':<28}{t_step * 1e3:>10.1f}{tokens / t_step:>12,.0f}"
    f"{step_flops / t_step / 1e9:>10.1f}{step_flops / t_step / peak:>9.1%}"
  )
  total = t_sample + t_step
  print(f"{'OPD step (sampler + train)':<28}{total * 1e3:>10.1f}{tokens / total:>12,.0f}")


if __name__ == "__main__":
  main()

"""The OPD step's time, compile time and peak memory against the number of teachers N.

A fixed total of rows (default 24 rows x (16 prompt + 16 new tokens)) split evenly over N =
1, 2, 4, 8, 12 teachers; student and teachers 4 layers, width 256, 4 heads (2 KV), MLP 768,
vocab 8,192, all f32; every teacher the chunked full-vocab reverse KL (chunk 32) over the
completion window, the step's non-logging flavour (diagnostics off). Three arrangements:

  stacked        N forks of one graphdef (one base's params + 1e-3 i), grouped and stacked as
                 the stage does
                 (`build.group_by_architecture`, `build.stack_states`): one vmapped forward
  heterogeneous  N teachers of differing MLP width (768, 736, 800, 704, 832, ...: mean about
                 768), so no two share a graphdef: N separate forwards
  streamed       N forks with `placement=streamed`: params in pinned host memory, each
                 teacher's compiled forward (`streaming.teacher_cache`) before the step

Per N and arrangement, measured in one process:
  step_s          median warm time of one step (streamed: the teachers' forwards + the step)
  compile_s       lowering + compiling the step (streamed: + every streamed forward; their
                  count is `forward_compiles`)
  peak_bytes      the compiled step's `memory_analysis()`: argument + output + temp bytes
                  (the arguments hold the teachers' params, stacked or not, and for streamed
                  teachers the cache: hidden states and unembeddings)
  streamed only:  forward_peak_bytes (the streamed forward's argument + output + temp
                  bytes; on the CPU host and device memory are one) and cache_bytes (what
                  the streaming path keeps on the devices between the forwards and the step:
                  every teacher's hidden states and unembedding)
Ratios are to N = 1 of the same arrangement.

  python bench/teachers.py [--rows 24] [--prompt 16] [--new 16] [--repeats 2] [--json out]
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
from jdistill.runtime import build
from jdistill.runtime import sharding as shd
from jdistill.step import common as step_common
from jdistill.step import opd as ts
from jdistill.step import streaming

CFG = ModelConfig(
  vocab_size=8192,
  hidden_size=256,
  intermediate_size=768,
  num_layers=4,
  num_heads=4,
  num_kv_heads=2,
  head_dim=64,
)
ARRANGEMENTS = ("stacked", "heterogeneous", "streamed")


def mlp_width(i: int) -> int:
  """Teacher i's MLP width in the heterogeneous arrangement: 768, 736, 800, 704, 832, ..."""
  return CFG.intermediate_size + 32 * ((i + 1) // 2) * (1 if i % 2 == 0 else -1)


def make_batch(rows: int, prompt: int, new: int) -> dict:
  rng = np.random.RandomState(0)
  length = prompt + new
  mask = np.zeros((rows, length), np.float32)
  mask[:, prompt:] = 1
  return {
    "tokens": jnp.asarray(rng.randint(5, CFG.vocab_size, (rows, length)), jnp.int32),
    "completion_mask": jnp.asarray(mask),
    "logprobs": jnp.full((rows, length), -2.0, jnp.float32),
    "sampling_logprobs": jnp.full((rows, length), -2.0, jnp.float32),
    "lengths": jnp.full((rows,), length, jnp.int32),
  }


def peak(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def measure(arrangement: str, n: int, args, mesh, student_state, base_teacher, batch) -> dict:
  graphdef, state = student_state
  rows = step_common.teacher_rows(n, args.rows // n)
  settings = LossSettings(loss="reverse_kl", chunk_size=32)
  specs = tuple(step_common.TeacherSpec(f"t{i}", settings, 1.0, r) for i, r in enumerate(rows))
  if arrangement == "heterogeneous":
    models = [
      nnx.split(Transformer(CFG.replace(intermediate_size=mlp_width(i)), nnx.Rngs(100 + i)))
      for i in range(n)
    ]
  else:  # forks of one base: its params plus a small per-teacher offset (no init per teacher)
    base_graphdef, base = base_teacher
    models = [(base_graphdef, jax.tree.map(lambda x, i=i: x + 1e-3 * i, base)) for i in range(n)]
  graphdefs = [g for g, _ in models]
  streamed, groups, t_graphdefs, t_states = [], (), (), ()
  if arrangement == "streamed":
    streamed = [
      streaming.StreamedTeacher.park(i, g, s, rows=r, hidden_dtype="float32", mesh=mesh)
      for i, ((g, s), r) in enumerate(zip(models, rows))
    ]
  else:
    groups = build.group_by_architecture(graphdefs)
    t_graphdefs = tuple(graphdefs[g[0]] for g in groups)
    t_states = tuple(
      models[g[0]][1] if len(g) == 1 else build.stack_states([models[i][1] for i in g])
      for g in groups
    )
  del models
  batch_shardings = build.batch_shardings(mesh)
  opt, sched = step_common.make_optimizer(1e-4, steps=100, warmup_steps=0)
  fn = functools.partial(
    ts.train_step,
    student_graphdef=graphdef,
    teacher_graphdefs=t_graphdefs,
    specs=specs,
    optimizer=opt,
    schedule=sched,
    groups=groups,
    loss_window=args.new,
  )
  train = {"params": state, "opt_state": jax.jit(opt.init)(state), "step": jnp.zeros((), jnp.int32)}
  flag = jnp.asarray(False)

  def cache_of():
    return streaming.teacher_cache(streamed, batch, batch_shardings, mesh)

  t0 = time.perf_counter()
  cache = jax.block_until_ready(cache_of())
  first_cache = time.perf_counter() - t0
  step = lambda st, ts_, c, b, d: fn(st, ts_, b, diagnostics=d, teacher_cache=c)  # noqa: E731
  jitted = jax.jit(step)
  t0 = time.perf_counter()
  compiled = jitted.lower(train, t_states, cache, batch, flag).compile()
  step_compile = time.perf_counter() - t0
  out = {
    "arrangement": arrangement,
    "teachers": n,
    "groups": len(groups),
    "step_compile_s": step_compile,
    "peak_bytes": peak(compiled),
    "teacher_param_bytes": nbytes(t_states) + sum(nbytes(s.host_state) for s in streamed),
  }

  def whole():
    return compiled(train, t_states, cache_of(), batch, flag)

  _, out["step_s"] = timed(whole, repeats=args.repeats)
  if streamed:
    _, warm_cache = timed(cache_of, repeats=args.repeats)
    out["forward_s"] = warm_cache
    out["forward_compile_s"] = max(first_cache - warm_cache, 0.0)
    shardings = build.batch_shardings(mesh)
    programs = {
      streaming.shared_forward(
        s.graphdef,
        s.hidden_dtype,
        streaming.host_shardings(s.host_state),
        shardings,
        streaming.hidden_sharding(mesh, len(s.rows)),
      )
      for s in streamed
    }
    out["forward_compiles"] = sum(p._cache_size() for p in programs)
    rows_arg = jnp.asarray(streamed[0].rows, jnp.int32)
    out["forward_peak_bytes"] = max(
      peak(p.lower(streamed[0].host_state, batch, rows_arg).compile()) for p in programs
    )
    out["cache_bytes"] = nbytes(cache)
  out["compile_s"] = out["step_compile_s"] + out.get("forward_compile_s", 0.0)
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rows", type=int, default=24)
  p.add_argument("--prompt", type=int, default=16)
  p.add_argument("--new", type=int, default=16)
  p.add_argument("--teachers", default="1,2,4,8,12")
  p.add_argument("--arrangements", default=",".join(ARRANGEMENTS))
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--json", default="")
  a = p.parse_args()
  counts = [int(n) for n in a.teachers.split(",")]
  assert all(a.rows % n == 0 for n in counts), f"--rows {a.rows} must divide by every N"
  mesh = shd.make_mesh({"data": -1})
  student = nnx.split(shd.create_sharded(lambda: Transformer(CFG, nnx.Rngs(0)), mesh))
  fork_base = nnx.split(shd.create_sharded(lambda: Transformer(CFG, nnx.Rngs(100)), mesh))
  batch = jax.device_put(make_batch(a.rows, a.prompt, a.new))
  results = []
  print(
    f"backend {jax.default_backend()}; student and teachers 4 layers, width 256, vocab "
    f"{CFG.vocab_size}, f32; {a.rows} rows x ({a.prompt} prompt + {a.new} new), split evenly"
  )
  head = f"{'arrangement':<15}{'N':>3}{'step ms':>9}{'x N=1':>7}{'compile s':>10}{'x N=1':>7}"
  print(head + f"{'peak MB':>9}{'x N=1':>7}{'fwd peak MB':>12}{'cache MB':>9}")
  for arrangement in a.arrangements.split(","):
    base = None
    for n in counts:
      r = measure(arrangement, n, a, mesh, student, fork_base, batch)
      base = base or r
      for k in ("step_s", "compile_s", "peak_bytes"):
        r[k.split("_")[0] + "_ratio"] = r[k] / base[k]
      results.append(r)
      mb = lambda k: f"{r[k] / 2**20:.1f}" if k in r else "-"  # noqa: E731
      print(
        f"{arrangement:<15}{n:>3}{r['step_s'] * 1e3:>9.1f}{r['step_ratio']:>7.2f}"
        f"{r['compile_s']:>10.1f}{r['compile_ratio']:>7.2f}{mb('peak_bytes'):>9}"
        f"{r['peak_ratio']:>7.2f}{mb('forward_peak_bytes'):>12}{mb('cache_bytes'):>9}",
        flush=True,
      )
  if a.json:
    with open(a.json, "w") as f:
      meta = dict(vars(a), backend=jax.default_backend(), devices=jax.device_count())
      json.dump({"config": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
  main()

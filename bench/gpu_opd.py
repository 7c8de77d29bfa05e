"""The OPD step of a Qwen3-shaped student with several teachers on one accelerator: per-phase
time, MFU by the model's FLOP count, peak memory, and the issue-26 goals as met / not met.

For each size, a student (f32 master params, bf16 compute) and `--teachers` same-shaped teachers
(bf16 params) run the real pieces, in this order:

1. Rollouts: the sampler gets a copy of the student's params cast to `--rollout_dtype`
   (`rollout_copy`; the cast is timed as part of the phase) and decodes every row, by
   continuous batching (`Sampler.generate_continuous`, `--continuous_slots` slots per teacher,
   each teacher's rows one group) or by the static loop (`--continuous_slots 0`). Random
   weights almost never draw the stop token, so each row gets a forced length
   (`max_new_per_prompt`), uniform in [new/4, new]: lengths vary as with `stop_at_eos`. With
   `--compare_static` the static loop also runs on the same prompts and lengths. `--all`
   gives each teacher as many slots as rows (4): with a fixed batch per step, fewer slots
   can only add loop steps (a teacher's queue takes about sum(lengths) / slots of them, the
   static loop max(lengths)), so the run measures what the continuous loop's per-row decode
   and in-loop prefills cost against the static loop, at the same step count.
2. For each `--placement`:
   - stacked: the teachers are same-graphdef forks whose states are stacked on a leading
     teacher axis, one group (as `runtime.build.teachers` groups them with
     `stack_teachers`): their forward runs once under `vmap` inside the train step. It is
     also compiled alone and timed ("teacher forwards", a part of the train step's time).
   - streamed: each teacher's params are parked in pinned host memory
     (`jdistill.step.streaming`); before the step, one compiled forward per teacher moves
     them onto the device and returns its rows' bf16 hidden states ("teacher forwards", a
     phase of its own); the train step rebuilds their logits from those.
   The train step: student forward/backward, chunked full-vocab reverse KL over the
   completion window (`loss_window`, as the stage runs it), AdamW, donated state.

Whole step = rollouts + train step (+ teacher forwards when streamed). MFU ("model MFU") is
the usual count over `--peak_tflops` (default 989, the H100/H200 dense bf16 datasheet
peak): 2 FLOPs per body weight per token plus causal attention, the unembedding only on the
loss window's tokens; the student counts 3 forwards (forward + backward), each teacher one.
XLA's own cost analysis came out about 10x low on an H200 (it leaves out the cuBLAS
matmuls), so only the model count is quoted. Peak memory: the device's
`memory_stats()["peak_bytes_in_use"]` (the process's peak so far; placements run streamed
first, so the stacked figure is the larger of the two) where the backend has it, and always
the compiled train step's `memory_analysis()` (arguments + outputs + temporaries - aliased).

  python bench/gpu_opd.py                 # = --all: the issue's run (1.7B, 4 teachers, both
                                          #   placements, bf16 rollouts, continuous batching)
  python bench/gpu_opd.py --teachers 1 --placement stacked --rollout_dtype float32 \\
      --continuous_slots 0 --sizes 0.6B,1.7B --rows 32   # the earlier one-teacher run
  python bench/gpu_opd.py --sizes tiny --rows 8 --prompt 8 --new 16   # CPU smoke (the test)
  python bench/gpu_opd.py --json results.json

`--all` on one H100, estimated from bench/results_gpu_opd_h200.json (1.7B, one teacher, 32
rows x 512: sampler first call 16 s, step compile 44 s, sampler 1.9 s, train step 0.68 s)
and results_gpu_streamed_h200.json (streamed forward compile 16 s): matmul check 5 s; random
weights for the student and 4 teachers ~30 s; rollouts: continuous + static compiles ~45 s,
4 + 4 timed runs at <= 2 s (16 rows; decode is weight-bandwidth bound, H100 ~1.4x slower than
H200) ~20 s; streamed: park 4 x 3.4 GB ~10 s, 4 forward compiles ~65 s, step compile ~45 s,
4 steps ~10 s; stacked: forward compile ~20 s, step compile ~60 s, 4 steps ~8 s. About
5.5 minutes, 7 if `--remat auto` falls back (a second step compile per placement); the budget
is 10. Memory at 16 rows: XLA:CPU's plan of the same stacked step (compiled on CPU from
abstract inputs) has 34.4 GB of arguments (f32 params + AdamW 20.6 GB, 4 bf16 teachers 13.8
GB) and 94.4 GB of temporaries without remat, 49.5 GB with dots_with_no_batch_dims_saveable.
The GPU's plan is smaller (32 rows with one teacher peaked at 102 GB measured on the H200),
but whether it fits an H100's 80 GB is unknown, hence `--remat auto`: the student's step is
compiled with dots_with_no_batch_dims_saveable and, when its temporaries do not fit in the
free memory (`memory_analysis` against `memory_stats`, before it runs), again with full
remat. Recomputation is not in the model count, so MFU under remat reads the useful work.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

# JAX takes 75% of a GPU's memory by default (59 GB of an H100's 80): this run needs most of it
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import timed  # noqa: E402

from jdistill.losses import LossSettings  # noqa: E402
from jdistill.models import ModelConfig, Transformer  # noqa: E402
from jdistill.runtime import build  # noqa: E402
from jdistill.runtime import sharding as shd  # noqa: E402
from jdistill.sampling import Sampler, SamplingParams, rollout_params  # noqa: E402
from jdistill.step import common as step_common  # noqa: E402
from jdistill.step import opd as ts  # noqa: E402
from jdistill.step import streaming  # noqa: E402

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
  # the CPU smoke run's (tests/bench/test_gpu_opd_smoke.py): Qwen3's layout, small enough to
  # compile fast
  "tiny": ModelConfig(
    **{**QWEN3, "vocab_size": 512, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16},
    hidden_size=64,
    intermediate_size=128,
    num_layers=1,
  ),
}
# The run (`--all`, the default): see the module docstring for its time and memory.
ALL = dict(
  sizes="1.7B",
  teachers=4,
  placement="streamed,stacked",
  rollout_dtype="bfloat16",
  continuous_slots=4,
  compare_static=True,
  rows=16,
  prompt=128,
  new=384,
  remat="auto",
)
# `--remat auto`: the student's remat policies to try, the first whose step fits in memory
AUTO_REMAT = ("dots_with_no_batch_dims_saveable", "full")
GOAL_MFU = 0.45  # train step, model count, at the 1.7B shape
GOAL_ROLLOUT_SHARE = 0.50  # rollouts' share of the whole step
STOP_TOKEN = 2  # any id: random weights draw it about once per vocab_size tokens


@functools.partial(jax.jit, static_argnums=(1,))
def _random_leaves(key, abstract: tuple[tuple[tuple[int, ...], str, bool], ...]):
  """Leaves of the given (shape, dtype, is a norm scale): ones for the norm scales, N(0, 0.02)
  for the rest; one compile for the whole state."""
  keys = jax.random.split(key, len(abstract))
  return [
    jnp.ones(shape, dtype) if norm else (0.02 * jax.random.normal(k, shape)).astype(dtype)
    for k, (shape, dtype, norm) in zip(keys, abstract)
  ]


def random_state(cfg: ModelConfig, seed: int, stack: int = 0):
  """(graphdef, state) with N(0, 0.02) weights and unit norm scales; `stack` > 0: every leaf
  gets a leading axis of that many independent forks (the layout `runtime.build.stack_states`
  gives same-graphdef teachers).

  (The model's own initialisers in one jitted init compile for minutes on a GPU at 28 layers;
  plain draws of the leaves compile in seconds.)
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  lead = (stack,) if stack else ()
  spec = tuple(
    (lead + x.shape, str(x.dtype), "norm" in jax.tree_util.keystr(path)) for path, x in leaves
  )
  # XLA's RngBitGenerator: threefry's unrolled rounds took 3x the compile time on CPU
  key = jax.random.key(seed, impl="unsafe_rbg")
  return graphdef, jax.tree.unflatten(treedef, _random_leaves(key, spec))


def rollout_copy(params, dtype: str):
  """The sampler's copy of the student's params (`jdistill.sampling.rollout_params`, as
  `rollout.param_dtype` makes it): floating leaves cast to `dtype`, the f32 master params stay
  with the train step; `float32` = the params themselves."""
  return rollout_params(params, "" if dtype == "float32" else dtype)


def n_params(state) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def forward_flops(cfg: ModelConfig, n: int, rows: int, seq: int, window: int) -> dict:
  """Matmul FLOPs of one forward over `rows` sequences of `seq` inputs → {"body": the blocks
  (2 per weight per token, the embedding lookup free) plus causal attention over seq/2
  positions on average, "unembed": the logits (2 per unembedding weight) on the `window` loss
  tokens of each row}."""
  unembed = cfg.vocab_size * cfg.hidden_size
  body = n - unembed * (1 if cfg.tie_word_embeddings else 2)
  attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq / 2
  return {"body": (2 * body + attention) * rows * seq, "unembed": 2 * unembed * rows * window}


def device_peak_bytes() -> float:
  """The device's peak bytes in use so far (NaN where the backend keeps no statistics)."""
  stats = jax.devices()[0].memory_stats() or {}
  return float(stats.get("peak_bytes_in_use", float("nan")))


def compiled_bytes(compiled) -> float:
  """A compiled program's device memory: arguments + outputs + temporaries − aliased."""
  m = compiled.memory_analysis()
  if m is None:
    return float("nan")
  return float(
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  )


def extra_bytes(compiled) -> float:
  """What a compiled program allocates beyond its (resident) arguments: temporaries and the
  outputs not aliased to donated arguments."""
  m = compiled.memory_analysis()
  if m is None:
    return 0.0
  return float(m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def free_bytes(margin: float = 0.95) -> float:
  """The device's memory left under `margin` of its limit (inf where there are no statistics)."""
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    return float("inf")
  return margin * stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def graphdef_of(cfg: ModelConfig):
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))[0]


def bf16_matmul_tflops(n: int) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  _, t = timed(jax.jit(lambda x, y: x @ y), a, a, repeats=5)
  return 2 * n**3 / t / 1e12


def median_time(fn, repeats: int) -> tuple[float, object]:
  """Median wall time of `repeats` calls of `fn` after a first (compiling) call; the last output."""
  out = jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), out


def rollouts(cfg: ModelConfig, graphdef, params, args, mesh, log) -> tuple[dict, dict]:
  """Phase 1 on fixed prompts and forced lengths → (the step's batch, the phase's figures)."""
  rng = np.random.RandomState(0)
  prompts = rng.randint(5, cfg.vocab_size, (args.rows, args.prompt)).astype(np.int32)
  lengths = np.full((args.rows,), args.prompt, np.int32)
  limits = rng.randint(max(args.new // 4, 1), args.new + 1, args.rows).astype(np.int32)
  groups = np.repeat(np.arange(args.teachers), args.rows // args.teachers).astype(np.int32)
  sampler = Sampler(graphdef, mesh)
  sp = SamplingParams(
    max_new_tokens=args.new,
    temperature=1.0,
    prompt_buckets=(args.prompt,),
    stop_token_ids=(STOP_TOKEN,),
    key_schedule="prompt",
  )
  key = jax.random.key(0)

  stats = []

  def continuous(p):
    out, loop = sampler.generate_continuous(
      p, (prompts, lengths), key, sp, slots_per_group=args.continuous_slots, groups=groups,
      max_new_per_prompt=limits,
    )  # fmt: skip
    stats.append(loop)
    return out

  def static(p):
    return sampler.generate(p, (prompts, lengths), key, sp, max_new_per_prompt=limits)

  decode = continuous if args.continuous_slots else static
  cast = functools.partial(rollout_copy, dtype=args.rollout_dtype)
  t0 = time.perf_counter()
  out = decode(jax.block_until_ready(cast(params)))
  jax.block_until_ready(out.tokens)
  first = time.perf_counter() - t0
  t_cast, low = median_time(lambda: cast(params), args.repeats)
  t_decode, out = median_time(lambda: decode(low), args.repeats)
  generated = int(np.asarray(out.completion_lengths).sum())
  r = {
    "rollout_path": f"continuous, {args.continuous_slots} slots/teacher"
    if args.continuous_slots
    else "static",
    "rollout_dtype": args.rollout_dtype,
    "rollout_first_call_s": first,
    "rollout_cast_s": t_cast,
    "rollout_decode_s": t_decode,
    "rollout_s": t_cast + t_decode,
    "rollout_param_dtypes": sorted(
      {str(x.dtype) for x in jax.tree.leaves(low) if jnp.issubdtype(x.dtype, jnp.floating)}
    ),
    "generated_tokens": generated,
    "forced_lengths_mean": float(limits.mean()),
    "rollout_tok_s": generated / (t_cast + t_decode),
  }
  if stats:  # continuous: the loop's work on the timed call
    r["decode_steps"], r["prefills"] = int(stats[-1].decode_steps), int(stats[-1].prefills)
  log(
    f"rollouts ({r['rollout_path']}, {args.rollout_dtype}): first call {first:.1f} s, then cast "
    f"{t_cast * 1e3:.0f} ms + decode {t_decode * 1e3:.0f} ms, {r['rollout_tok_s']:,.0f} tok/s"
  )
  if args.compare_static and args.continuous_slots:
    static(low)  # compile
    t_static, _ = median_time(lambda: static(low), args.repeats)
    r["static_decode_s"] = t_static
    r["continuous_over_static"] = t_static / t_decode
    log(f"static loop, same prompts and lengths: {t_static * 1e3:.0f} ms")
  batch = step_common.rollout_batch(out, build.batch_shardings(mesh))
  return batch, r


def train_phases(placement: str, base: ModelConfig, state, batch, args, mesh, log):
  """Phase 2 for one placement → its figures (state is donated; the new one is returned too)."""
  n_t, per = args.teachers, args.rows // args.teachers
  rows = step_common.teacher_rows(n_t, per)
  teacher_cfg = base.replace(param_dtype="bfloat16", dtype="bfloat16")
  specs = tuple(
    step_common.TeacherSpec(
      f"teacher{i}", LossSettings(loss="reverse_kl", chunk_size=args.chunk), 1.0, rows[i]
    )
    for i in range(n_t)
  )
  opt, sched = step_common.make_optimizer(1e-5, steps=1000, warmup_steps=0)
  x = lambda b: step_common.shifted_inputs(b)  # noqa: E731
  r = {"placement": placement}
  if placement == "stacked":
    t_graphdef, t_state = random_state(teacher_cfg, 1, stack=n_t if n_t > 1 else 0)
    groups = (tuple(range(n_t)),)
    teachers, cache = (t_state,), {}
    forward = jax.jit(
      lambda s, b: [h for h, _ in step_common.group_hidden(t_graphdef, s, x(b), rows)]
    )
    compiled = forward.lower(t_state, batch).compile(args.compiler_options)
    r["teacher_forward_s"], _ = median_time(lambda: compiled(t_state, batch), args.repeats)
    r["teacher_forward_in_step"] = True
    r["teacher_layout"] = {
      "groups": [list(g) for g in groups],
      "stacked_axis": sorted({x.shape[0] for x in jax.tree.leaves(t_state)}) if n_t > 1 else [],
    }
    graphdefs = (t_graphdef,)
  elif placement == "streamed":
    streamed = []
    for i in range(n_t):  # one teacher on the device at a time, then parked on the host
      t_graphdef, t_state = random_state(teacher_cfg, 1 + i)
      streamed.append(
        streaming.StreamedTeacher.park(
          i, t_graphdef, t_state, rows=rows[i], hidden_dtype="bfloat16", mesh=mesh
        )
      )
    shardings = build.batch_shardings(mesh)
    teacher_cache = lambda: streaming.teacher_cache(streamed, batch, shardings, mesh)  # noqa: E731
    r["teacher_forward_s"], cache = median_time(teacher_cache, args.repeats)
    r["teacher_forward_in_step"] = False
    r["teacher_layout"] = {
      "streamed": [t.index for t in streamed],
      "memory_kinds": sorted(
        {x.sharding.memory_kind for t in streamed for x in jax.tree.leaves(t.host_state)}
      ),
    }
    groups, teachers, graphdefs = (), (), ()
  else:
    raise ValueError(f"--placement: {placement!r} is not stacked or streamed")
  # `--remat auto`: the first policy whose compiled step fits beside what is resident
  policies = list(AUTO_REMAT) if args.remat == "auto" else [args.remat]
  r["step_compile_s"] = 0.0
  for policy in policies:
    student_cfg = base.replace(param_dtype="float32", dtype="bfloat16", remat_policy=policy)
    step = jax.jit(
      functools.partial(
        ts.train_step,
        student_graphdef=graphdef_of(student_cfg),
        teacher_graphdefs=graphdefs,
        specs=specs,
        optimizer=opt,
        schedule=sched,
        groups=groups,
        diagnostics=False,
        loss_window=args.new,
      ),
      donate_argnums=0,
    )
    t0 = time.perf_counter()
    lowered = step.lower(state, teachers, batch, teacher_cache=cache)
    compiled = lowered.compile(args.compiler_options)
    r["step_compile_s"] += time.perf_counter() - t0
    free = free_bytes()
    if policy == policies[-1] or extra_bytes(compiled) <= free:
      break
    log(
      f"{placement}: remat {policy} needs {extra_bytes(compiled) / 1e9:.1f} GB beside the "
      f"resident arrays, {free / 1e9:.1f} GB free; next: {policies[policies.index(policy) + 1]}"
    )
  r["remat"] = policy
  r["step_compiled_gb"] = compiled_bytes(compiled) / 1e9
  state, metrics = compiled(state, teachers, batch, teacher_cache=cache)  # warm-up
  jax.block_until_ready(metrics["loss"])
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    state, metrics = compiled(state, teachers, batch, teacher_cache=cache)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t0)
  r["train_step_s"] = float(np.median(times))
  r["loss"] = float(metrics["loss"])
  r["finite"] = float(metrics["finite"])
  r["device_peak_gb"] = device_peak_bytes() / 1e9
  return state, r


def bench_size(name: str, args, mesh, log) -> list[dict]:
  base = SIZES[name]
  student_cfg = base.replace(param_dtype="float32", dtype="bfloat16")
  t0 = time.perf_counter()
  graphdef, params = random_state(student_cfg, 0)
  opt, _ = step_common.make_optimizer(1e-5, steps=1000, warmup_steps=0)
  state = {
    "params": params,
    "opt_state": jax.jit(opt.init)(params),
    "step": jnp.zeros((), jnp.int32),
  }
  n = n_params(params)
  log(f"[{name}] {n / 1e9:.2f}B params, built in {time.perf_counter() - t0:.0f} s")
  batch, rollout = rollouts(
    base, graphdef, state["params"], args, mesh, lambda m: log(f"[{name}] {m}")
  )
  seq = args.prompt + args.new - 1  # inputs of the shifted batch
  f = forward_flops(base, n, args.rows, seq, args.new)
  peak = args.peak_tflops * 1e12
  results = []
  for placement in args.placement.split(","):
    t0 = time.perf_counter()
    state, r = train_phases(placement, base, state, batch, args, mesh, log)
    # Train-step FLOPs: the student's 3 forwards; stacked, the teachers' forward too;
    # streamed, only the teachers' logits rebuilt from their cached hidden states.
    student = 3 * (f["body"] + f["unembed"])
    if r["teacher_forward_in_step"]:
      step_flops, teacher_flops = student + f["body"] + f["unembed"], f["body"] + f["unembed"]
      whole = rollout["rollout_s"] + r["train_step_s"]
    else:
      step_flops, teacher_flops = student + f["unembed"], f["body"]
      whole = rollout["rollout_s"] + r["teacher_forward_s"] + r["train_step_s"]
    r = {
      "size": name,
      "params": n,
      "teachers": args.teachers,
      "rows": args.rows,
      "prompt": args.prompt,
      "new": args.new,
      **rollout,
      **r,
      "opd_step_s": whole,
      "rollout_share": rollout["rollout_s"] / whole,
      "train_tok_s": args.rows * seq / r["train_step_s"],
      "opd_tok_s": args.rows * seq / whole,
      "train_step_model_tflops": step_flops / r["train_step_s"] / 1e12,
      "train_step_model_mfu": step_flops / r["train_step_s"] / peak,
      "teacher_forward_model_mfu": teacher_flops / r["teacher_forward_s"] / peak,
      "phases_s": time.perf_counter() - t0,
    }
    r["peak_gb"] = (
      r["device_peak_gb"] if math.isfinite(r["device_peak_gb"]) else r["step_compiled_gb"]
    )
    r["goal_mfu_met"] = bool(r["train_step_model_mfu"] >= GOAL_MFU)
    r["goal_rollout_share_met"] = bool(r["rollout_share"] <= GOAL_ROLLOUT_SHARE)
    teacher_phase = "in the step" if r["teacher_forward_in_step"] else "before the step"
    log(
      f"[{name}] {placement}: teacher forwards ({teacher_phase}) "
      f"{r['teacher_forward_s'] * 1e3:.0f} ms; train step compile {r['step_compile_s']:.1f} s, "
      f"{r['train_step_s'] * 1e3:.0f} ms, model MFU {r['train_step_model_mfu']:.1%}; whole step "
      f"{whole * 1e3:.0f} ms, rollouts {r['rollout_share']:.0%} of it; peak "
      f"{r['peak_gb']:.1f} GB (compiled step {r['step_compiled_gb']:.1f} GB)"
    )
    results.append(r)
  return results


def parse(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--all",
    action="store_true",
    help="the issue's run (the default when no option is given); overrides the other options",
  )
  parser.add_argument("--sizes", default=ALL["sizes"], help=f"comma-separated of {list(SIZES)}")
  parser.add_argument("--teachers", type=int, default=ALL["teachers"])
  parser.add_argument(
    "--placement", default=ALL["placement"], help="comma-separated of stacked, streamed"
  )
  parser.add_argument("--rollout_dtype", default=ALL["rollout_dtype"])
  parser.add_argument(
    "--continuous_slots", type=int, default=ALL["continuous_slots"], help="per teacher; 0: static"
  )
  parser.add_argument(
    "--compare_static",
    action=argparse.BooleanOptionalAction,
    default=ALL["compare_static"],
    help="also time the static loop on the same rollouts",
  )
  parser.add_argument("--rows", type=int, default=ALL["rows"])
  parser.add_argument("--prompt", type=int, default=ALL["prompt"])
  parser.add_argument("--new", type=int, default=ALL["new"])
  parser.add_argument(
    "--remat",
    default=ALL["remat"],
    help="the student's remat_policy, or auto: the first of "
    f"{', '.join(AUTO_REMAT)} whose train step fits in the device's memory",
  )
  parser.add_argument("--chunk", type=int, default=256, help="loss chunk (tokens)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--peak_tflops", type=float, default=989.0)
  parser.add_argument(
    "--fast_compile",
    action="store_true",
    help="compile the train steps without XLA's expensive optimisations (the CPU smoke test)",
  )
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  args.compiler_options = None
  if args.fast_compile:
    args.compiler_options = {
      "xla_backend_optimization_level": 0,
      "xla_llvm_disable_expensive_passes": True,
    }
  if args.all:
    for k, v in ALL.items():
      setattr(args, k, v)
  if args.rows % args.teachers:
    parser.error(f"--rows {args.rows} must divide over --teachers {args.teachers}")
  if args.continuous_slots > args.rows // args.teachers:
    parser.error(
      f"--continuous_slots must be at most the rows per teacher, {args.rows // args.teachers}"
    )
  return args


def main(argv=None) -> dict:
  args = parse(argv)
  log = lambda m: print(m, flush=True)  # noqa: E731
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  dev = jax.devices()[0]
  device = f"{jax.default_backend()}: {dev.device_kind}; jax {jax.__version__}"
  log(device)
  measured = bf16_matmul_tflops(8192 if jax.default_backend() != "cpu" else 512)
  log(f"bf16 matmul, same run: {measured:.1f} TFLOP/s")
  report = {"device": device, "matmul_tflops": measured, "args": vars(args), "results": []}
  for name in args.sizes.split(","):
    report["results"] += bench_size(name, args, mesh, log)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
  print()
  print(
    f"{'size':<6}{'placement':<10}{'rollouts s':>11}{'teachers s':>11}{'step s':>8}"
    f"{'whole s':>9}{'rollout %':>10}{'step MFU':>9}{'OPD tok/s':>11}{'peak GB':>9}"
  )
  for r in report["results"]:
    print(
      f"{r['size']:<6}{r['placement']:<10}{r['rollout_s']:>11.3f}{r['teacher_forward_s']:>11.3f}"
      f"{r['train_step_s']:>8.3f}{r['opd_step_s']:>9.3f}{r['rollout_share']:>10.0%}"
      f"{r['train_step_model_mfu']:>9.1%}{r['opd_tok_s']:>11,.0f}{r['peak_gb']:>9.1f}"
    )
  for r in report["results"]:
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    print(
      f"goals [{r['size']} {r['placement']}]: train step >= {GOAL_MFU:.0%} MFU: "
      f"{met(r['goal_mfu_met'])} ({r['train_step_model_mfu']:.1%}); rollouts <= "
      f"{GOAL_ROLLOUT_SHARE:.0%} of the step: {met(r['goal_rollout_share_met'])} "
      f"({r['rollout_share']:.0%})"
    )
  return report


if __name__ == "__main__":
  main()

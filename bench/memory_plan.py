"""What fits where: the per-device memory of the OPD step for named setups and meshes.

Nothing is allocated. Params, optimizer state, teachers and the batch are
`ShapeDtypeStruct`s carrying their `NamedSharding`s; each program is lowered and compiled
for the mesh, and XLA's `memory_analysis()` of the compiled program gives its per-device
bytes: arguments + outputs not aliased with them + temporaries.

* resident: every teacher on the mesh (stacked, one vmapped forward), one compiled step.
* streamed: teachers in pinned host memory. Peak = the larger of the train step (student
  state + every teacher's cached hidden states `[rows, L-1, d]` bf16 + unembeddings) and
  one teacher's forward (its params moved onto the mesh inside the program) while the
  student state and the other teachers' caches are live.
* own_devices (`teachers.<name>.devices`): each teacher on `--teacher_devices` devices of its
  own (`{fsdp: k}`), the student's step on the rest. Training mesh: the streamed step's
  program (student state + every teacher's hidden states and unembedding), no forward;
  teacher mesh: one teacher's forward with its params resident there (params + the
  activations of its rows + its hidden states out).

The student keeps f32 master params and AdamW moments and computes in bf16 with
`remat_policy` per layer; teachers are bf16. Models of 8 layers or more run scanned, and
attention runs in blocks of `--attention_chunk` queries (T·chunk scores, not T²).
Rollouts (the sampler's KV cache) are a separate program before the step and are not
counted here.

  python bench/memory_plan.py                                   # the README table
  python bench/memory_plan.py --setups qwen3_1.7b_4x8b --meshes h200x8
  python bench/memory_plan.py --smoke                           # tiny shapes, seconds

The compile runs on simulated CPU devices (`--xla_force_host_platform_device_count`). The
CPU compiler's buffer assignment, fusion and rematerialisation differ from the GPU and TPU
compilers', so the figures are an estimate of the accelerator's, not its measurement; see
README for a same-program comparison on an H200.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

DEVICES = 64
if "jax" not in sys.modules:
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
  )
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jdistill.losses import LossSettings  # noqa: E402
from jdistill.models import ModelConfig, Transformer  # noqa: E402
from jdistill.runtime import sharding as shd  # noqa: E402
from jdistill.step import common as step_common  # noqa: E402
from jdistill.step import opd as ts  # noqa: E402
from jdistill.step import streaming  # noqa: E402

GB = 1e9
QWEN3 = dict(
  model_type="qwen3",
  vocab_size=151_936,
  head_dim=128,
  qk_norm=True,
  rope_theta=1_000_000.0,
  param_dtype="bfloat16",
  dtype="bfloat16",
)
MODELS = {
  "qwen3-1.7b": dict(
    **QWEN3,
    hidden_size=2048,
    intermediate_size=6144,
    num_layers=28,
    num_heads=16,
    num_kv_heads=8,
    tie_word_embeddings=True,
  ),
  "qwen3-8b": dict(
    **QWEN3,
    hidden_size=4096,
    intermediate_size=12288,
    num_layers=36,
    num_heads=32,
    num_kv_heads=8,
  ),
  "qwen3-32b": dict(
    **QWEN3,
    hidden_size=5120,
    intermediate_size=25600,
    num_layers=64,
    num_heads=64,
    num_kv_heads=8,
  ),
  "qwen3-30b-a3b": dict(
    **{**QWEN3, "model_type": "qwen3_moe"},
    hidden_size=2048,
    intermediate_size=6144,
    num_layers=48,
    num_heads=32,
    num_kv_heads=4,
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=768,
    norm_topk_prob=True,
  ),
  # DeepSeek-V3's architecture (MLA, 2 shared + 64 routed experts of which 6 active, sigmoid
  # group routing, one dense first layer) at DeepSeek-V2-Lite's 16B size: a student that fits
  # 8 H200s with f32 Adam, unlike V3's own 671B; Qwen3's vocabulary, to share its teachers'
  "deepseek-v3-16b": dict(
    model_type="deepseek_v3",
    vocab_size=151_936,
    hidden_size=2048,
    intermediate_size=10_944,
    num_layers=27,
    num_heads=16,
    num_kv_heads=16,
    q_lora_rank=None,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    num_experts=64,
    num_experts_per_tok=6,
    moe_intermediate_size=1408,
    shared_expert_intermediate_size=2 * 1408,
    n_group=1,
    topk_group=1,
    norm_topk_prob=False,
    first_k_dense_replace=1,
    param_dtype="bfloat16",
    dtype="bfloat16",
  ),
  # Nemotron 3 Nano 30B-A3B (its config.json): 23 Mamba-2, 23 MoE (128 squared-ReLU experts,
  # 6 active, one shared) and 6 attention layers; 31.6B parameters, 3.2B active
  "nemotron-3-nano-30b-a3b": dict(
    model_type="nemotron_h",
    vocab_size=131_072,
    hidden_size=2688,
    intermediate_size=1856,
    num_layers=52,
    layer_pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
    num_heads=32,
    num_kv_heads=2,
    head_dim=128,
    mamba_num_heads=64,
    mamba_head_dim=64,
    ssm_state_size=128,
    mamba_n_groups=8,
    num_experts=128,
    num_experts_per_tok=6,
    moe_intermediate_size=1856,
    shared_expert_intermediate_size=3712,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.5,
    param_dtype="bfloat16",
    dtype="bfloat16",
  ),
  "tiny": dict(
    **{**QWEN3, "vocab_size": 1024},
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    tie_word_embeddings=True,
  ),
}
# (student, teacher, number of teachers, tokens per row, rows per teacher; -1: one row per
# data shard for each teacher (the fewest rows at which every teacher's forward and loss are
# split over all data shards; with fewer, GSPMD runs them replicated on every device), 0:
# one row per data shard in all)
SETUPS = {
  "qwen3_1.7b_4x8b": ("qwen3-1.7b", "qwen3-8b", 4, 8192, -1),
  "qwen3_30b_a3b_4x32b": ("qwen3-30b-a3b", "qwen3-32b", 4, 16384, -1),
  "deepseek_v3_16b_4x8b": ("deepseek-v3-16b", "qwen3-8b", 4, 8192, -1),
  # Ultra's shape at Nano's size: four teachers forked from the student's own checkpoint
  "nemotron_3_nano_4x": ("nemotron-3-nano-30b-a3b", "nemotron-3-nano-30b-a3b", 4, 8192, -1),
  # twelve 8B specialists into an 8B student (issue 26), 8 rows of 4,096 / 2,048 tokens per
  # teacher
  "qwen3_8b_12x8b": ("qwen3-8b", "qwen3-8b", 12, 4096, 8),
  "qwen3_8b_12x8b_2k": ("qwen3-8b", "qwen3-8b", 12, 2048, 8),
  "tiny": ("tiny", "tiny", 4, 128, 2),
}
# Meshes and their device memory (GB): 8 x H200 (141 GB), TPU v5p-64 (32 chips of 95 GB,
# 64 with megacore off: here 64 devices of 95 GB / 2 = 47.5 GB would understate a chip, so
# the plan uses the 32 chips).
MESHES = {
  "h200x8": (dict(data=1, fsdp=8, tensor=1), 141),
  "h200x8_tp2": (dict(data=1, fsdp=4, tensor=2), 141),
  "h200x32": (dict(data=1, fsdp=32, tensor=1), 141),  # four nodes of 8
  "v5p-64": (dict(data=1, fsdp=32, tensor=1), 95),
  "v5p-64_tp4": (dict(data=1, fsdp=8, tensor=4), 95),
  "cpu8": (dict(data=2, fsdp=2, tensor=2), None),
}


def model_config(name: str, **overrides) -> ModelConfig:
  return ModelConfig(**{**MODELS[name], **overrides})


def cpu_moe_proxy(cfg: ModelConfig) -> tuple[ModelConfig, dict]:
  """A dense stand-in for an MoE model, for the CPU compiler, and what it leaves out.

  XLA:CPU lowers `ragged_dot` densely (every group over every row: E times the memory of
  the grouped matmul), and the blocked dispatch's memory depends on its gathered-weight
  budget, so the CPU's reading of an MoE step says little about an accelerator. The
  stand-in swaps each expert layer for a dense SwiGLU of width k·f, whose activations
  (`[tokens, k·f]`) are exactly the grouped matmul's (`[tokens·k, f]`). Left out, and added
  back by `plan` per device: the other E − k experts' weights (`extra_params` per model,
  as parameter counts) and the `[tokens·k, d]` rows the dispatch gathers, live within one
  layer (`gathered_rows` per token, in elements).

  DeepSeek-V3 keeps its latent attention; every layer's stand-in MLP is k·f plus the shared
  experts' width wide (the sparse layers' activations), and the `first_k_dense_replace`
  dense layers' wider MLP weights are added back as parameters (their activations, a few
  layers of `[tokens, intermediate_size]`, are not). Nemotron-H keeps its Mamba-2 and
  attention layers; each `E` becomes a `-` (its squared-ReLU MLP, two matrices as its
  experts have) of width k·f plus the shared expert's.
  """
  e, k, f, d = cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.hidden_size
  sparse = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
  grouped = cfg.model_type in ("deepseek_v3", "nemotron_h")  # a score bias `[experts]` each
  width = k * f + (cfg.shared_expert_intermediate_size if grouped else 0)
  router = d * e + (e if grouped else 0)
  if cfg.hybrid:
    proxy = cfg.replace(
      layer_pattern=cfg.layer_pattern.replace("E", "-"),
      num_experts=0,
      num_experts_per_tok=0,
      moe_intermediate_size=0,
      shared_expert_intermediate_size=0,
      n_group=1,
      topk_group=1,
      routed_scaling_factor=1.0,
      intermediate_size=width,
    )
    extra = {"extra_params": sparse * (2 * d * f * (e - k) + router), "gathered_rows": k * d}
    return proxy, extra
  proxy = cfg.replace(
    model_type="deepseek_v3" if cfg.mla else "qwen3",
    num_experts=0,
    num_experts_per_tok=0,
    moe_intermediate_size=0,
    shared_expert_intermediate_size=0,
    norm_topk_prob=False,
    first_k_dense_replace=0,
    intermediate_size=width,
  )
  dense_extra = (cfg.num_layers - sparse) * 3 * d * (cfg.intermediate_size - width)
  extra = {
    "extra_params": sparse * (3 * d * f * (e - k) + router) + dense_extra,
    "gathered_rows": k * d,
  }
  return proxy, extra


def abstract_model(cfg: ModelConfig, mesh, memory_kind: str | None = None):
  """(graphdef, state of ShapeDtypeStructs sharded on `mesh`) — nothing allocated."""
  graphdef, state = shd.abstract_sharded_state(lambda: Transformer(cfg, nnx.Rngs(0)), mesh)
  if memory_kind:
    state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=x.sharding.with_memory_kind(memory_kind)
      ),
      state,
    )
  return graphdef, state


def stacked(state, n: int):
  """A state with every leaf stacked n times on a new leading (teacher) axis."""

  def one(x):
    spec = P(None, *x.sharding.spec)
    sharding = NamedSharding(x.sharding.mesh, spec)
    return jax.ShapeDtypeStruct((n, *x.shape), x.dtype, sharding=sharding)

  return jax.tree.map(one, state)


def batch(mesh, rows: int, length: int) -> dict:
  """The step's rollout batch `[rows, length]` as ShapeDtypeStructs."""
  two, one = shd.batch_sharding(mesh, 2), shd.batch_sharding(mesh, 1)
  sds = lambda shape, dtype, sh: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)  # noqa: E731
  return {
    "tokens": sds((rows, length), jnp.int32, two),
    "completion_mask": sds((rows, length), jnp.float32, two),
    "logprobs": sds((rows, length), jnp.float32, two),
    "sampling_logprobs": sds((rows, length), jnp.float32, two),
    "lengths": sds((rows,), jnp.int32, one),
  }


def device_bytes(compiled) -> dict:
  m = compiled.memory_analysis()
  args, out, alias, temp = (
    m.argument_size_in_bytes,
    m.output_size_in_bytes,
    m.alias_size_in_bytes,
    m.temp_size_in_bytes,
  )
  return {"arguments": args, "temp": temp, "peak": args + out - alias + temp}


def programs(
  setup: str, mesh, placement: str, *, remat_policy: str, chunk: int, attention: int
) -> dict:
  """The OPD step's compiled-to-be programs on abstract args, and the per-device bytes that
  stay live across them.

  Returns `{"step": (jitted, args), "forward": (jitted, args) (streamed only), "state",
  "teachers", "cache_per_teacher", "n_teachers"}`; args are ShapeDtypeStructs (a bench on a
  real device materialises them and runs the same programs).
  """
  student_name, teacher_name, n_teachers, length, rows_per_teacher = SETUPS[setup]
  dp = shd.data_parallel_size(mesh)
  if rows_per_teacher == 0:  # one row of the step per data shard
    rows_per_teacher = max(dp // n_teachers, 1)
  if rows_per_teacher == -1:  # each teacher's rows over every data shard
    rows_per_teacher = dp
  if (rows_per_teacher * n_teachers) % dp:
    raise ValueError(f"{setup}: {rows_per_teacher * n_teachers} rows over {dp} data shards")
  student_cfg = model_config(
    student_name, param_dtype="float32", remat_policy=remat_policy, attention_chunk=attention
  )
  teacher_cfg = model_config(teacher_name, attention_chunk=attention)
  proxy = {}
  if jax.default_backend() == "cpu":
    if student_cfg.num_experts:
      student_cfg, proxy["student"] = cpu_moe_proxy(student_cfg)
    if teacher_cfg.num_experts:
      teacher_cfg, proxy["teacher"] = cpu_moe_proxy(teacher_cfg)
  graphdef, params = abstract_model(student_cfg, mesh)
  optimizer, schedule = step_common.make_optimizer(1e-5, steps=100)
  replicated = NamedSharding(mesh, P())
  opt_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    jax.eval_shape(optimizer.init, params),
    shd.optimizer_shardings(optimizer, params, replicated),
  )
  state = {
    "params": params,
    "opt_state": opt_state,
    "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
  }
  rows = step_common.teacher_rows(n_teachers, rows_per_teacher)
  specs = tuple(
    step_common.TeacherSpec(
      f"t{i}", LossSettings(loss="reverse_kl", chunk_size=chunk), 1.0, rows[i]
    )
    for i in range(n_teachers)
  )
  step_batch = batch(mesh, n_teachers * rows_per_teacher, length)
  t_graphdef, t_state = abstract_model(teacher_cfg, mesh)
  shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
  common = dict(
    student_graphdef=graphdef,
    specs=specs,
    optimizer=optimizer,
    schedule=schedule,
    diagnostics=False,
  )
  out = {
    "rows_per_teacher": rows_per_teacher,
    "state": state,
    "n_teachers": n_teachers,
    "teacher_state": t_state,
    "proxy": proxy,
  }
  out["tokens_per_device"] = n_teachers * rows_per_teacher * length / dp
  if placement == "resident":
    teachers = (stacked(t_state, n_teachers),) if n_teachers > 1 else (t_state,)
    step = jax.jit(
      lambda s, t, b: ts.train_step(
        s, t, b, teacher_graphdefs=(t_graphdef,), groups=(tuple(range(n_teachers)),), **common
      ),
      in_shardings=(shardings(state), shardings(teachers), shardings(step_batch)),
      out_shardings=(shardings(state), None),
      donate_argnums=(0,),
    )
    out["step"] = (step, (state, teachers, step_batch))
    return out
  hidden = jax.ShapeDtypeStruct(
    (rows_per_teacher, length - 1, teacher_cfg.hidden_size),
    jnp.bfloat16,
    sharding=streaming.hidden_sharding(mesh, rows_per_teacher),
  )
  unembed_shape = (teacher_cfg.hidden_size, teacher_cfg.vocab_size)
  unembed = jax.ShapeDtypeStruct(
    unembed_shape,
    jnp.bfloat16,
    sharding=NamedSharding(mesh, shd.logical_to_spec(("embed", "vocab"), unembed_shape, mesh)),
  )
  cache = {i: (hidden, unembed) for i in range(n_teachers)}
  step = jax.jit(
    lambda s, c, b: ts.train_step(
      s, (), b, teacher_graphdefs=(), groups=(), teacher_cache=c, **common
    ),
    in_shardings=(shardings(state), shardings(cache), shardings(step_batch)),
    out_shardings=(shardings(state), None),
    donate_argnums=(0,),
  )
  _, host_state = abstract_model(teacher_cfg, mesh, memory_kind="pinned_host")
  on_device = streaming.device_shardings(host_state)

  def forward(host, b):  # what streaming.StreamedTeacher.forward compiles
    h, _ = step_common.teacher_hidden(
      t_graphdef, jax.device_put(host, on_device), step_common.shifted_inputs(b), rows[0]
    )
    return h.astype(jnp.bfloat16)

  fwd = jax.jit(
    forward,
    in_shardings=(shardings(host_state), shardings(step_batch)),
    out_shardings=hidden.sharding,
  )
  out["step"] = (step, (state, cache, step_batch))
  out["forward"] = (fwd, (host_state, step_batch))
  out["cache_per_teacher"] = (hidden, unembed)
  return out


def own_devices_forward(setup: str, mesh, step_batch) -> tuple:
  """One teacher's forward on its own mesh (`jdistill.step.own_devices`): (jitted, args)."""
  _, teacher_name, _, length, rows_per_teacher = SETUPS[setup]
  t_graphdef, t_state = abstract_model(model_config(teacher_name, attention_chunk=512), mesh)
  moved = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shd.batch_sharding(mesh, x.ndim)),
    step_batch,
  )
  rows = tuple(range(rows_per_teacher))
  out = streaming.hidden_sharding(mesh, rows_per_teacher)

  def forward(state, b):  # what own_devices.OwnDevicesTeacher.forward compiles
    h, _ = step_common.teacher_hidden(t_graphdef, state, step_common.shifted_inputs(b), rows)
    return h.astype(jnp.bfloat16)

  shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
  fwd = jax.jit(forward, in_shardings=(shardings(t_state), shardings(moved)), out_shardings=out)
  return fwd, (t_state, moved)


def plan(setup: str, mesh_name: str, placement: str, teacher_devices: int = 2, **kw) -> dict:
  """Compiles the setup's programs on `mesh_name` and reads their per-device peaks (GB).
  `own_devices`: each teacher on `teacher_devices` of the mesh's devices (the last ones), the
  step on the rest (`{fsdp: rest}`)."""
  axes, capacity = MESHES[mesh_name]
  n = math.prod(axes.values())
  mesh = shd.make_mesh(axes, jax.devices()[:n])
  t0 = time.perf_counter()
  if placement == "own_devices":
    training = n - SETUPS[setup][2] * teacher_devices
    if training < 1:
      raise ValueError(f"{setup}: {SETUPS[setup][2]} x {teacher_devices} devices of {n}")
    mesh = shd.make_mesh(dict(data=1, fsdp=training, tensor=1), jax.devices()[:training])
    own = shd.make_mesh(
      dict(data=1, fsdp=teacher_devices, tensor=1),
      jax.devices()[training : training + teacher_devices],
    )
  progs = programs(setup, mesh, "streamed" if placement == "own_devices" else placement, **kw)
  out = {"setup": setup, "mesh": mesh_name, "placement": placement, "capacity_gb": capacity}
  fn, args = progs["step"]
  step = device_bytes(fn.lower(*args).compile())
  out.update(peak_gb=step["peak"] / GB, step_gb=step["peak"] / GB)
  if placement == "own_devices":
    fn, args = own_devices_forward(setup, own, progs["step"][1][2])
    fwd = device_bytes(fn.lower(*args).compile())
    out.update(
      training_devices=training,
      teacher_devices=teacher_devices,
      teacher_mesh_gb=fwd["peak"] / GB,
      teacher_mesh_params_gb=_per_device(args[0]) / GB,
      peak_gb=max(step["peak"], fwd["peak"]) / GB,
    )
  if placement == "streamed":
    fn, args = progs["forward"]
    fwd = device_bytes(fn.lower(*args).compile())
    hidden, unembed = progs["cache_per_teacher"]
    # while the last teacher runs: the student state, every other teacher's cache, every
    # unembedding, and the forward program itself (its device copy of the params included)
    live = _per_device(progs["state"]) + progs["n_teachers"] * _per_device(unembed)
    live += (progs["n_teachers"] - 1) * _per_device(hidden)
    during_forward = fwd["peak"] + live
    out.update(
      peak_gb=max(step["peak"], during_forward) / GB, teacher_forward_gb=during_forward / GB
    )
  out["compile_s"] = time.perf_counter() - t0
  if progs["proxy"]:  # the MoE parts the CPU stand-in leaves out (see cpu_moe_proxy)
    devices = mesh.devices.size  # the training mesh's
    added = 0.0
    if "student" in progs["proxy"]:
      extra = progs["proxy"]["student"]
      added += 16 * extra["extra_params"] / devices  # f32 param, grad, Adam m and v
      added += 2 * extra["gathered_rows"] * progs["tokens_per_device"]  # bf16, one layer
    if "teacher" in progs["proxy"]:
      extra = progs["proxy"]["teacher"]
      if placement == "own_devices":  # on the teacher's mesh, not the step's
        out["teacher_mesh_gb"] += 2 * extra["extra_params"] / teacher_devices / GB
      else:
        n_on_device = progs["n_teachers"] if placement == "resident" else 1
        added += 2 * n_on_device * extra["extra_params"] / devices
    out["moe_added_gb"] = added / GB
    for key in ("peak_gb", "step_gb"):
      out[key] += added / GB
    if placement == "own_devices":
      out["peak_gb"] = max(out["step_gb"], out["teacher_mesh_gb"])
  out["rows_per_teacher"] = progs["rows_per_teacher"]
  out["student_state_gb"] = _per_device(progs["state"]) / GB
  # per device of the mesh the step runs on, were they resident there (own_devices: none are,
  # each has teacher_mesh_params_gb on its own mesh)
  out["teacher_params_gb"] = progs["n_teachers"] * _per_device(progs["teacher_state"]) / GB
  if placement == "own_devices":
    out["teacher_params_gb"] = 0.0
  out["fits"] = None if capacity is None else bool(out["peak_gb"] <= capacity)
  return out


def _per_device(tree) -> int:
  """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    total += int(jnp.dtype(x.dtype).itemsize * math.prod(shard))
  return total


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--setups", default="qwen3_1.7b_4x8b")
  p.add_argument("--meshes", default="h200x8,v5p-64")
  p.add_argument("--placements", default="resident,streamed", help="and own_devices")
  p.add_argument("--teacher_devices", type=int, default=2, help="own_devices: per teacher")
  p.add_argument("--remat_policy", default="full")
  p.add_argument("--chunk", type=int, default=1024, help="loss.chunk_size")
  p.add_argument("--attention_chunk", type=int, default=512, help="0: one block (T^2 scores)")
  p.add_argument("--smoke", action="store_true", help="the tiny setup on the cpu8 mesh")
  p.add_argument("--json", default="")
  a = p.parse_args(argv)
  setups, meshes = a.setups.split(","), a.meshes.split(",")
  if a.smoke:
    setups, meshes = ["tiny"], ["cpu8"]
  results = []
  print(
    f"{'setup':<22}{'mesh':<12}{'placement':<12}{'peak GB/dev':>12}{'step':>8}"
    f"{'teacher mesh':>14}{'fits':>6}{'compile s':>11}",
    flush=True,
  )
  for setup in setups:
    for mesh_name in meshes:
      for placement in a.placements.split(","):
        r = plan(
          setup,
          mesh_name,
          placement,
          remat_policy=a.remat_policy,
          chunk=a.chunk,
          attention=a.attention_chunk,
          teacher_devices=1 if a.smoke else a.teacher_devices,
        )
        results.append(r)
        fits = "-" if r["fits"] is None else ("yes" if r["fits"] else "no")
        own = f"{r['teacher_mesh_gb']:>14.1f}" if "teacher_mesh_gb" in r else f"{'-':>14}"
        print(
          f"{setup:<22}{mesh_name:<12}{placement:<12}{r['peak_gb']:>12.1f}{r['step_gb']:>8.1f}"
          f"{own}{fits:>6}{r['compile_s']:>11.1f}",
          flush=True,
        )
  if a.json:
    with open(a.json, "w") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  main()

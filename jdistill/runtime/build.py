"""Config → the objects a stage is made of: mesh, tokenizer, student, teachers, data, optimizer.

The one place that turns a validated config (`jdistill.config`) into objects. The OPD
trainer, the `overlap` command and later stages call these functions; none of them builds
models or data on its own. Nothing here runs a step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jdistill import config as config_lib
from jdistill import losses
from jdistill.data import alignment
from jdistill.data import prompts as data_lib
from jdistill.data.tokenizer import load_tokenizer
from jdistill.models import ModelConfig, hf
from jdistill.runtime import checkpoint as ckpt
from jdistill.runtime import sharding as shd
from jdistill.sampling import SamplingParams
from jdistill.sampling.environment import Environment, load_environment
from jdistill.sampling.episodes import EpisodeParams
from jdistill.step import common, cross_tokenizer, own_devices, streaming

# --- mesh and models -------------------------------------------------------------------


def devices(config) -> list[jax.Device]:
  """The devices a run uses: all, or the first `config.num_devices`."""
  available = jax.device_count()
  if config.num_devices > available:
    raise ValueError(
      f"config.num_devices={config.num_devices} is invalid; allowed: 0 (all) or at most the "
      f"{available} devices this run sees ({jax.devices()[0].platform})"
    )
  return jax.devices()[: config.num_devices or None]


def mesh(config) -> jax.sharding.Mesh:
  """The mesh of `config.mesh` over all devices, or the first `config.num_devices`."""
  return shd.make_mesh(dict(config.mesh), devices(config))


def own_device_counts(config) -> dict[str, int]:
  """`{name: n}` of the teachers on `n > 0` devices of their own (`teachers.<name>.devices`)."""
  names = config_lib.teacher_names(config) if "teachers" in config else []
  return {
    n: config.teachers[n].get("devices", 0) for n in names if config.teachers[n].get("devices", 0)
  }


def meshes(config) -> tuple[jax.sharding.Mesh, jax.sharding.Mesh | None]:
  """(training mesh, sampler mesh) of the OPD stage.

  `rollout.devices` = 0 and no teacher on devices of its own: (`mesh(config)`, None). Of a
  run's N devices, the sampler's n = `rollout.devices` are the last n (a data-parallel mesh
  `{data: n, fsdp: 1, tensor: 1}`, params replicated), the teachers' own devices
  (`teacher_meshes`) the ones before them, and `config.mesh` applies to the rest, the first.
  """
  n, own = config.rollout.devices, sum(own_device_counts(config).values())
  if not n and not own:
    return mesh(config), None
  pool = devices(config)
  field = f"config.rollout.devices={n}" if n else f"config.teachers.<name>.devices={own}"
  if jax.process_count() > 1:
    raise ValueError(
      f"{field} is invalid with {jax.process_count()} processes; "
      "allowed: 0 (a disaggregated sampler or teacher runs in one process for now)"
    )
  if n + own >= len(pool):
    if own:
      field = f"config.teachers.<name>.devices={own} with config.rollout.devices={n}"
    raise ValueError(
      f"{field} is invalid; allowed: 0, or at most {len(pool) - 1} of the "
      f"{len(pool)} devices (training keeps at least one)"
    )
  left = len(pool) - n - own
  try:
    training = shd.make_mesh(dict(config.mesh), pool[:left])
  except ValueError as e:
    raise ValueError(
      f"{field} is invalid: the {left} devices left for training "
      f"do not fit config.mesh ({e}); allowed: a count whose remainder fits config.mesh"
    ) from e
  if not n:
    return training, None
  return training, shd.make_mesh({"data": n, "fsdp": 1, "tensor": 1}, pool[len(pool) - n :])


def teacher_meshes(config) -> dict[str, jax.sharding.Mesh]:
  """`{name: mesh}` of the teachers on devices of their own: in name order, the devices just
  before the sampler's (`meshes`), each a mesh `{data: 1, fsdp: n, tensor: 1}`: the rows
  split over its n devices and the params FSDP-sharded on them."""
  own = own_device_counts(config)
  pool = devices(config)
  start = len(pool) - config.rollout.devices - sum(own.values())
  out = {}
  for name, n in own.items():
    out[name] = shd.make_mesh({"data": 1, "fsdp": n, "tensor": 1}, pool[start : start + n])
    start += n
  return out


def tokenizer(config):
  """`config.tokenizer`, else the student's directory."""
  return load_tokenizer(config.tokenizer or config.student.path)


def load_model(
  path: str,
  mesh,
  *,
  param_dtype: str,
  dtype: str,
  scan_layers: bool | None = None,
  remat_policy: str = "none",
):
  """An HF directory or a jdistill checkpoint directory → a sharded Transformer
  (`scan_layers` None: scanned from `models.config.SCAN_MIN_LAYERS` layers)."""
  kw = dict(param_dtype=param_dtype, dtype=dtype, scan_layers=scan_layers)
  kw["remat_policy"] = remat_policy
  if ckpt.is_checkpoint_dir(path):
    return ckpt.load_model_from_checkpoint(path, mesh, **kw)
  return hf.from_hf(path, mesh, **kw)


@dataclasses.dataclass
class Student:
  """The trained model, split once: `nnx.merge(graphdef, params)` rebuilds it."""

  graphdef: nnx.GraphDef
  params: nnx.State
  cfg: ModelConfig
  step: int | None = None  # the checkpoint step the params come from, if any


def student(config, mesh) -> Student:
  s = config.student
  model = load_model(
    s.path,
    mesh,
    param_dtype=s.param_dtype,
    dtype=s.dtype,
    scan_layers=s.scan_layers,
    remat_policy=s.remat_policy,
  )
  graphdef, params = nnx.split(model)
  return Student(graphdef, params, model.cfg)


@dataclasses.dataclass
class Teachers:
  """Frozen teachers, in sorted name order, grouped by architecture.

  `specs[i]` describes teacher i (name, loss settings, weight, rows of the batch).
  `groups` lists resident teacher indices that share one graphdef; `graphdefs[g]` /
  `states[g]` are per group, a group of several having every state leaf stacked on a
  leading teacher axis (run as one `vmap`ped forward). `streamed` holds the teachers
  placed `streamed` (params in host memory, see `jdistill.step.streaming`), in no group;
  `own_devices` those on devices of their own (`jdistill.step.own_devices`), in none;
  `cross` the teachers with their own `tokenizer` (`jdistill.step.cross_tokenizer`), in none.
  """

  names: list[str]
  specs: tuple[common.TeacherSpec, ...]
  groups: tuple[tuple[int, ...], ...]
  graphdefs: tuple
  states: tuple
  streamed: tuple[streaming.StreamedTeacher, ...] = ()
  cross: tuple[cross_tokenizer.CrossTeacher, ...] = ()
  own_devices: tuple[own_devices.OwnDevicesTeacher, ...] = ()

  @property
  def cached(self) -> tuple:
    """The teachers whose hidden states enter the step through its `teacher_cache`."""
    return self.streamed + self.own_devices

  def member(self, i: int):
    """(graphdef, state) of teacher i, sliced out of its stacked group if needed (a
    streamed teacher: a device copy of its params; one on its own devices: a copy on the
    training mesh)."""
    for t in self.streamed:
      if t.index == i:
        return t.graphdef, t.device_state()
    for t in self.own_devices:
      if t.index == i:
        return t.graphdef, t.training_state()
    for g, members in enumerate(self.groups):
      if i in members:
        state = self.states[g]
        if len(members) > 1:
          j = members.index(i)
          state = jax.tree.map(lambda x: x[j], state)
        return self.graphdefs[g], state
    raise IndexError(f"no teacher {i}")


def loss_settings(config, loss: str) -> losses.LossSettings:
  """The kernel settings of a teacher whose `config.teachers.<name>.loss` is `loss`."""
  lc, o = config.loss, config.overlap
  return losses.settings_for(
    loss,  # its kernel loss and the settings the name fixes (losses.registry)
    chunk_size=lc.chunk_size,
    temperature=lc.temperature,
    normalize=lc.normalize,
    beta=lc.beta,
    k=lc.topk,
    topk_tail=lc.topk_tail,
    topk_direction=lc.topk_direction,
    clip_eps=lc.clip_eps or None,
    icepop_c=lc.icepop_c or None,
    kl_weight=lc.kl_weight,
    overlap_criterion=lc.overlap_criterion,
    overlap_topk=lc.overlap_topk,
    overlap_floor_prob=lc.overlap_floor_prob,
    diag_topk=tuple(o.topks),
    diag_floor_prob=o.floor_prob,
    diag_top_p=o.top_p,
  )


def check_cross_processes(config) -> None:
  """A teacher of another tokenizer needs a run of one process: a ValueError naming its
  `tokenizer` otherwise (its host alignment reads the rows of the whole batch)."""
  for name in config_lib.teacher_names(config):
    if config.teachers[name].get("tokenizer") and jax.process_count() > 1:
      raise ValueError(
        f"config.teachers.{name}.tokenizer={config.teachers[name].tokenizer!r}: a teacher of "
        f"another tokenizer needs a run of one process (its host alignment reads the rows of "
        f"the whole batch); this run has {jax.process_count()}"
      )


def teachers(
  config, mesh, vocab_size: int, rows_per_teacher: int | None = None, student_tokenizer=None
) -> Teachers:
  """Loads every `config.teachers.<name>` onto `mesh`; checks the shared vocabulary.
  Each teacher scores `rows_per_teacher` rows of the step (default `data.slots_per_teacher`;
  GRPO: prompts × group size). A teacher with its own `tokenizer` is aligned with
  `student_tokenizer` (required then) and has a vocabulary of its own."""
  names = config_lib.teacher_names(config)
  check_cross_processes(config)  # before any weights load
  slots = rows_per_teacher or config.data.slots_per_teacher
  rows = common.teacher_rows(len(names), slots, jax.process_count())
  graphdefs, states, specs, streamed, cross, placed = {}, {}, [], [], [], []
  own_meshes = teacher_meshes(config)
  for i, name in enumerate(names):
    t = config.teachers[name]
    model = load_model(
      t.path,
      own_meshes.get(name, mesh),
      param_dtype=t.param_dtype,
      dtype=t.param_dtype,
      scan_layers=t.scan_layers,
    )
    if t.get("tokenizer"):
      settings = loss_settings(config, t.loss)
      cross_tokenizer.check_settings(settings, name)
      specs.append(common.TeacherSpec(name, settings, float(t.weight), rows[i], spans=True))
      graphdef, state = nnx.split(model)
      student, teacher = (
        alignment.Vocab.of(student_tokenizer),
        alignment.Vocab.of(load_tokenizer(t.tokenizer)),
      )
      dense = settings.loss != "sampled_token"
      groups, match = None, t.get("dense_match", "token")
      if dense and match in ("prefix", "marginal"):
        groups = cross_tokenizer.model_prefix_map(student, teacher, model.cfg.vocab_size)
      cross.append(
        cross_tokenizer.CrossTeacher(
          i, rows[i], graphdef, state, student, teacher, float(t.length_ratio),
          cross_tokenizer.model_vocab_map(student, teacher, vocab_size) if dense else None,
          groups, marginal=dense and match == "marginal",
        )
      )  # fmt: skip
      continue
    if model.cfg.vocab_size != vocab_size:
      raise ValueError(
        f"config.teachers.{name}: vocab_size {model.cfg.vocab_size} differs from the "
        f"student's {vocab_size}; teachers and student must share a tokenizer"
      )
    graphdef, state = nnx.split(model)
    specs.append(common.TeacherSpec(name, loss_settings(config, t.loss), float(t.weight), rows[i]))
    if t.get("placement", "resident") == "streamed":
      hidden_dtype = t.get("hidden_dtype", "bfloat16")
      streamed.append(
        streaming.StreamedTeacher.park(
          i, graphdef, state, rows=rows[i], hidden_dtype=hidden_dtype, mesh=mesh
        )
      )
      continue
    if name in own_meshes:
      placed.append(
        own_devices.OwnDevicesTeacher.place(
          i, graphdef, state, rows=rows[i], hidden_dtype=t.get("hidden_dtype", "bfloat16"),
          training_mesh=mesh,
        )
      )  # fmt: skip
      continue
    graphdefs[i], states[i] = graphdef, state
  resident = sorted(graphdefs)
  if config.stack_teachers:
    groups = tuple(
      tuple(resident[j] for j in g) for g in group_by_architecture([graphdefs[i] for i in resident])
    )
  else:
    groups = tuple((i,) for i in resident)
  stacked = tuple(
    states[g[0]] if len(g) == 1 else stack_states([states[i] for i in g]) for g in groups
  )
  return Teachers(
    names,
    tuple(specs),
    groups,
    tuple(graphdefs[g[0]] for g in groups),
    stacked,
    tuple(streamed),
    tuple(cross),
    tuple(placed),
  )


def group_by_architecture(graphdefs) -> tuple[tuple[int, ...], ...]:
  """Indices of teachers grouped by identical graphdef (same architecture and dtypes)."""
  groups: list[list[int]] = []
  for i, graphdef in enumerate(graphdefs):
    for g in groups:
      if graphdefs[g[0]] == graphdef:
        g.append(i)
        break
    else:
      groups.append([i])
  return tuple(tuple(g) for g in groups)


def stack_states(states):
  """Stacks same-structure states on a new leading (teacher) axis, kept sharded as before."""

  def stack(*xs):
    sharding = xs[0].sharding
    spec = jax.sharding.PartitionSpec(None, *sharding.spec)
    out = jax.sharding.NamedSharding(sharding.mesh, spec)
    return jax.jit(lambda *a: jnp.stack(a), out_shardings=out)(*xs)

  return jax.tree.map(stack, *states)


# --- optimizer and train state ---------------------------------------------------------


def optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  o = config.optimizer
  return common.make_optimizer(
    o.lr,
    steps=config.train.steps,
    warmup_steps=o.warmup_steps,
    schedule=o.schedule,
    end_lr_ratio=o.end_lr_ratio,
    weight_decay=o.weight_decay,
    b1=o.b1,
    b2=o.b2,
    eps=o.eps,
    max_grad_norm=o.max_grad_norm,
    grad_accum=o.grad_accum,
  )


def train_state(params, optimizer, mesh) -> dict:
  """`{"params", "opt_state", "step"}` with the optimizer state sharded like the params."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  out_shardings = shd.optimizer_shardings(optimizer, params, replicated)
  opt_state = jax.jit(optimizer.init, out_shardings=out_shardings)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
  return {"params": params, "opt_state": opt_state, "step": step}


# --- data and sampling -----------------------------------------------------------------


def read_records(files: str, config) -> tuple[list[dict], int]:
  """Prompt records of comma-separated `files` → (records, malformed lines skipped)."""
  records, skipped = [], 0
  for path in [p.strip() for p in str(files).split(",") if p.strip()]:
    recs, n = data_lib.read_prompt_records(
      path,
      prompt_field=config.data.prompt_field,
      messages_field=config.data.messages_field,
      domain_field=config.data.domain_field,
      on_error=config.data.on_error,
    )
    records += recs
    skipped += n
  return records, skipped


def prompt_batcher(config, tokenizer, files: str, *, seed: int) -> data_lib.PromptBatcher:
  """Batches of `config.data.slots_per_teacher` prompts per teacher from `files`, every
  prompt (or the first `data.check_prompts` of each teacher) tokenised and checked against
  the `overlong` rule first, so bad input fails before anything compiles. The counts are in
  `batcher.prompt_counts`. Prompts are grouped by the teacher owning their domain; with no
  teachers (pure GRPO) one group, "policy", owns every domain in the files."""
  records, skipped = read_records(files, config)
  d = config.data
  owners = config_lib.teacher_domains(config)
  if not owners:
    owners = {"policy": sorted({r["domain"] for r in records})}
  batcher = data_lib.PromptBatcher(
    records,
    tokenizer,
    owners,
    slots_per_teacher=d.slots_per_teacher,
    max_prompt_len=d.max_prompt_len,
    pad_id=tokenizer.pad_token_id or 0,
    seed=seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    use_chat_template=d.use_chat_template,
    overlong=d.overlong,
    n_skipped_malformed=skipped,
  )
  batcher.prompt_counts = batcher.check_prompts(d.check_prompts)
  return batcher


def check_rows_divide(config, rows_per_batch: int, mesh) -> None:
  """Refuses a batch whose rows do not split evenly over the data-parallel shards."""
  dp = shd.data_parallel_size(mesh)
  if rows_per_batch % dp:
    n = len(config.teachers.keys())
    slots = config.data.slots_per_teacher
    raise ValueError(
      f"config.data.slots_per_teacher={slots}: {n} teachers x {slots} slots = "
      f"{rows_per_batch} rows do not divide over the {dp} data-parallel shards of mesh "
      f"{dict(mesh.shape)}"
    )


def stop_token_ids(tokenizer) -> tuple[int, ...]:
  ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
  return tuple(
    sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id)
  )


def sampling_params(config, tokenizer) -> SamplingParams:
  s = config.sampling
  return SamplingParams(
    max_new_tokens=s.max_new_tokens,
    temperature=s.temperature,
    top_k=s.top_k,
    top_p=s.top_p,
    stop_token_ids=stop_token_ids(tokenizer) if s.stop_at_eos else (),
    prompt_buckets=tuple(s.prompt_buckets),
    pad_id=tokenizer.pad_token_id or 0,
  )


def episodes(config) -> tuple[Environment, EpisodeParams] | tuple[None, None]:
  """With `episode.environment`: the environment and the episodes' limits (the per-turn limit
  is `sampling.max_new_tokens`; with `data.use_chat_template`, observations wrapped as the
  template's tool messages); else `(None, None)`, single-turn rollouts."""
  e = config.episode
  if not e.environment:
    return None, None
  if jax.process_count() > 1:
    raise ValueError("config.episode.environment: multi-turn rollouts run on one process only")
  role = None
  if config.data.use_chat_template:  # observations enter as the template's tool messages
    from jdistill.data.chat import tool_role

    role = tool_role(tokenizer(config))
  limits = EpisodeParams(
    max_turns=e.max_turns,
    max_turn_tokens=config.sampling.max_new_tokens,
    max_total_tokens=e.max_total_tokens,
    stop_strings=tuple(e.stop_strings),
    wave_tokens=e.wave_tokens or None,
    slots=e.slots or None,
    env_workers=e.env_workers,
    observation_role=role,
  )
  return load_environment(e.environment, "config.episode.environment"), limits


def batch_shardings(mesh) -> dict:
  """Shardings of the step's rollout batch (`step.common.rollout_batch`): rows over data."""
  ndims = {"tokens": 2, "completion_mask": 2, "logprobs": 2, "sampling_logprobs": 2, "lengths": 1}
  return {k: shd.batch_sharding(mesh, nd) for k, nd in ndims.items()}


def checkpointer(config) -> ckpt.Checkpointer | None:
  c = config.checkpoint
  if not c.dir:
    return None
  return ckpt.Checkpointer(c.dir, every=c.every, keep=c.keep, async_save=c.async_save)

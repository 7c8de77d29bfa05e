"""Multi-teacher on-policy distillation: the training loop and its command line.

  python -m jdistill.train --config=configs/opd_tiny.py \
      --config.optimizer.lr=3e-6 --config.teachers.math.weight=2

Per step: the jitted sampler draws rollouts from the current student params, then
one compiled `train_step` (explicit in/out shardings, donated state) runs the
teachers on their slots, the student, the chunked loss kernels and the optax
update. Progress goes to the console; metrics to `<output_dir>/metrics.jsonl`,
TensorBoard (`<output_dir>/tb`) and a learning-curve PNG.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdistill import checkpoint as ckpt
from jdistill import config as config_lib
from jdistill import data as data_lib
from jdistill import distributed, overlap
from jdistill import sharding as shd
from jdistill import train_step as ts
from jdistill.models import hf
from jdistill.sampler import Sampler, SamplingParams
from jdistill.tokenizer import load_tokenizer

log = logging.getLogger("jdistill")


def load_model(path: str, mesh, *, param_dtype: str, dtype: str, remat: bool = False):
  """An HF directory or a jdistill checkpoint directory → a sharded Transformer."""
  if ckpt.is_checkpoint_dir(path):
    return ckpt.load_model_from_checkpoint(
      path, mesh, param_dtype=param_dtype, dtype=dtype, remat=remat
    )
  return hf.from_hf(path, mesh, param_dtype=param_dtype, dtype=dtype, remat=remat)


def read_records(files: str, config) -> tuple[list[dict], int]:
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


def stop_token_ids(tokenizer) -> tuple[int, ...]:
  ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
  return tuple(
    sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id)
  )


def group_teachers(graphdefs) -> tuple[tuple[int, ...], ...]:
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
    out = jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec)
    )
    return jax.jit(lambda *a: jnp.stack(a), out_shardings=out)(*xs)

  return jax.tree.map(stack, *states)


def optimizer_shardings(optimizer, params, replicated):
  """Shardings of the optimizer state: moments like their parameter, scalars replicated."""
  by_path = {
    tuple(map(str, path)): x.sharding for path, x in jax.tree_util.tree_leaves_with_path(params)
  }

  def one(path, leaf):
    path = tuple(map(str, path))
    for i in range(len(path)):
      if path[i:] in by_path and leaf.ndim:
        return by_path[path[i:]]
    return replicated

  return jax.tree_util.tree_map_with_path(one, jax.eval_shape(optimizer.init, params))


def _to_float(tree):
  return jax.tree.map(lambda x: float(x), jax.device_get(tree))


class Trainer:
  """Builds everything from a validated config; `run()` trains."""

  def __init__(self, config):
    config_lib.validate(config)
    self.config = config
    c = config
    devices = jax.devices()[: c.num_devices] if c.num_devices else None
    self.mesh = shd.make_mesh(dict(c.mesh), devices)
    self.tokenizer = load_tokenizer(c.tokenizer or c.student.path)
    student = load_model(
      c.student.path,
      self.mesh,
      param_dtype=c.student.param_dtype,
      dtype=c.student.dtype,
      remat=c.student.remat,
    )
    self.model_cfg = student.cfg
    self.student_graphdef, params = nnx.split(student)

    self.names = config_lib.teacher_names(c)
    slots = c.data.slots_per_teacher
    graphdefs, states, specs = [], [], []
    all_rows = ts.teacher_rows(len(self.names), slots, jax.process_count())
    for i, name in enumerate(self.names):
      t = c.teachers[name]
      teacher = load_model(t.path, self.mesh, param_dtype=t.param_dtype, dtype=t.param_dtype)
      if teacher.cfg.vocab_size != student.cfg.vocab_size:
        raise ValueError(
          f"config.teachers.{name}: vocab_size {teacher.cfg.vocab_size} differs from "
          f"the student's {student.cfg.vocab_size}; teachers and student must share "
          "a tokenizer"
        )
      graphdef, state = nnx.split(teacher)
      graphdefs.append(graphdef)
      states.append(state)
      specs.append(ts.TeacherSpec(name=name, loss=t.loss, weight=float(t.weight), rows=all_rows[i]))
    self.specs = tuple(specs)
    self.teacher_groups = (
      group_teachers(graphdefs) if c.stack_teachers else tuple((i,) for i in range(len(graphdefs)))
    )
    self.teacher_graphdefs = tuple(graphdefs[g[0]] for g in self.teacher_groups)
    self.teacher_states = tuple(
      states[g[0]] if len(g) == 1 else stack_states([states[i] for i in g])
      for g in self.teacher_groups
    )
    del states
    lc = c.loss
    self.settings = ts.LossSettings(
      chunk_size=lc.chunk_size,
      temperature=lc.temperature,
      normalize=lc.normalize,
      beta=lc.beta,
      topk=lc.topk,
      topk_tail=lc.topk_tail,
      topk_direction=lc.topk_direction,
      clip_eps=lc.clip_eps,
      overlap_criterion=lc.overlap_criterion,
      overlap_topk=lc.overlap_topk,
      overlap_floor_prob=lc.overlap_floor_prob,
      diag_topk=tuple(c.overlap.topks),
      diag_floor_prob=c.overlap.floor_prob,
      diag_top_p=c.overlap.top_p,
    )

    o = c.optimizer
    self.optimizer, self.schedule = ts.make_optimizer(
      o.lr,
      steps=c.train.steps,
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
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    opt_state = jax.jit(
      self.optimizer.init, out_shardings=optimizer_shardings(self.optimizer, params, replicated)
    )(params)
    self.state = {
      "params": params,
      "opt_state": opt_state,
      "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
    }
    self._step = 0

    # data
    records, skipped = read_records(c.data.train_files, c)
    self.batcher = self._batcher(records, skipped, c.seed)
    self.data_iter = self.batcher.iterator()
    self.eval_batcher = None
    if c.data.eval_files:
      eval_records, _ = read_records(c.data.eval_files, c)
      self.eval_batcher = self._batcher(eval_records, 0, c.seed + 1)

    dp = shd.data_parallel_size(self.mesh)
    if self.batcher.rows_per_batch % dp:
      raise ValueError(
        f"config.data.slots_per_teacher={slots}: {len(self.names)} teachers x {slots} "
        f"slots = {self.batcher.rows_per_batch} rows do not divide over the "
        f"{dp} data-parallel shards of mesh {dict(self.mesh.shape)}"
      )

    s = c.sampling
    pad_id = self.tokenizer.pad_token_id or 0
    self.sampling = SamplingParams(
      max_new_tokens=s.max_new_tokens,
      temperature=s.temperature,
      top_k=s.top_k,
      top_p=s.top_p,
      stop_token_ids=stop_token_ids(self.tokenizer) if s.stop_at_eos else (),
      prompt_buckets=tuple(b for b in s.prompt_buckets),
      pad_id=pad_id,
    )
    self.sampler = Sampler(self.student_graphdef, self.mesh)
    self.rng = jax.random.key(c.seed)
    self._alarmed: set[str] = set()
    self.skipped_updates = 0

    state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
    teacher_shardings = jax.tree.map(lambda x: x.sharding, self.teacher_states)
    self.batch_shardings = {
      k: shd.batch_sharding(self.mesh, nd)
      for k, nd in (("tokens", 2), ("completion_mask", 2), ("logprobs", 2), ("lengths", 1))
    }
    step_fn = functools.partial(
      ts.train_step,
      student_graphdef=self.student_graphdef,
      teacher_graphdefs=self.teacher_graphdefs,
      specs=self.specs,
      settings=self.settings,
      optimizer=self.optimizer,
      schedule=self.schedule,
      groups=self.teacher_groups,
    )
    self.train_step = jax.jit(
      step_fn,
      in_shardings=(state_shardings, teacher_shardings, self.batch_shardings),
      out_shardings=(state_shardings, None),
      donate_argnums=(0,),
    )
    objective = functools.partial(
      ts.distill_objective,
      student_graphdef=self.student_graphdef,
      teacher_graphdefs=self.teacher_graphdefs,
      specs=self.specs,
      settings=self.settings,
      groups=self.teacher_groups,
    )
    self.eval_objective = jax.jit(lambda p, t, b: objective(p, teacher_states=t, batch=b)[1])

    self.checkpointer = None
    if c.checkpoint.dir:
      self.checkpointer = ckpt.Checkpointer(
        c.checkpoint.dir,
        every=c.checkpoint.every,
        keep=c.checkpoint.keep,
        async_save=c.checkpoint.async_save,
      )
      self.checkpointer.write_model_config(self.model_cfg)
      if c.checkpoint.resume:
        self.maybe_restore(None if c.checkpoint.restore_step < 0 else c.checkpoint.restore_step)

  def _batcher(self, records, skipped, seed):
    c = self.config
    return data_lib.PromptBatcher(
      records,
      self.tokenizer,
      config_lib.teacher_domains(c),
      slots_per_teacher=c.data.slots_per_teacher,
      max_prompt_len=c.data.max_prompt_len,
      pad_id=self.tokenizer.pad_token_id or 0,
      seed=seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      use_chat_template=c.data.use_chat_template,
      overlong=c.data.overlong,
      n_skipped_malformed=skipped,
    )

  # --- state -------------------------------------------------------------------

  @property
  def step(self) -> int:
    """Host copy of `state["step"]` (kept in Python so the loop never waits on the device)."""
    return self._step

  @property
  def params(self):
    return self.state["params"]

  def teacher(self, i: int):
    """(graphdef, state) of teacher i (sliced out of its stacked group if needed)."""
    for g, members in enumerate(self.teacher_groups):
      if i in members:
        state = self.teacher_states[g]
        if len(members) > 1:
          j = members.index(i)
          state = jax.tree.map(lambda x: x[j], state)
        return self.teacher_graphdefs[g], state
    raise IndexError(f"no teacher {i}")

  def maybe_restore(self, step: int | None = None) -> bool:
    if step is None:
      step = self.checkpointer.latest_step()
      if step is None:
        return False
    params, opt_state, meta = self.checkpointer.restore(
      step, ckpt.abstract_like(self.state["params"]), ckpt.abstract_like(self.state["opt_state"])
    )
    self.state = {
      "params": params,
      "opt_state": opt_state,
      "step": jax.device_put(jnp.asarray(meta["step"], jnp.int32), self.state["step"].sharding),
    }
    self._step = int(meta["step"])
    self.rng = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))
    self.data_iter = self.batcher.iterator()
    self.data_iter.set_state(meta["data"])
    log.info("restored step %d from %s", meta["step"], self.checkpointer.directory)
    return True

  def save(self, force: bool = False) -> bool:
    if self.checkpointer is None:
      return False
    meta = {
      "step": self.step,
      "rng": np.asarray(jax.random.key_data(self.rng)).tolist(),
      "data": self.data_iter.get_state(),
      "seed": self.config.seed,
    }
    return self.checkpointer.save(
      self.step, self.state["params"], self.state["opt_state"], meta, force=force
    )

  # --- one step --------------------------------------------------------------------

  def rollouts(self, prompts: dict, rng) -> dict:
    """Student rollouts on a prompt batch → the train step's batch (right-padded)."""
    out = self.sampler.generate(
      self.state["params"],
      (prompts["prompt_tokens"], prompts["prompt_lengths"]),
      rng,
      self.sampling,
    )
    batch = {
      "tokens": out.tokens,
      "completion_mask": out.completion_mask,
      "logprobs": out.logprobs,
      "lengths": jnp.asarray(out.prompt_lengths) + jnp.asarray(out.completion_lengths),
    }
    return {k: jax.device_put(jnp.asarray(v), self.batch_shardings[k]) for k, v in batch.items()}

  def train_one(self) -> dict:
    prompts = next(self.data_iter)
    rng = jax.random.fold_in(self.rng, self.step)
    batch = self.rollouts(prompts, rng)
    self.state, metrics = self.train_step(self.state, self.teacher_states, batch)
    self._step += 1
    return metrics

  def evaluate(self, seed: int = 1234) -> dict[str, dict]:
    """Per-teacher metrics (full-vocab reverse KL etc.) on held-out student rollouts.

    One batch of `eval_files` prompts (else a far-away batch of the training stream),
    sampled with a fixed key, so evaluations at different steps are comparable."""
    batcher = self.eval_batcher or self.batcher
    prompts = batcher.batch(10**6 if batcher is self.batcher else 0)
    batch = self.rollouts(prompts, jax.random.key(seed))
    return _to_float(self.eval_objective(self.state["params"], self.teacher_states, batch))

  # --- the loop ----------------------------------------------------------------------

  def run(self, steps: int | None = None) -> list[dict]:
    """Trains until `train.steps` (or `steps` more); returns the logged metrics."""
    c = self.config
    end = c.train.steps if steps is None else self.step + steps
    out_dir = c.output_dir
    os.makedirs(out_dir, exist_ok=True)
    writer = _tensorboard(os.path.join(out_dir, "tb"))
    history = []
    start_step, t0 = self.step, time.time()
    last_time = t0
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as jsonl:
      while self.step < end:
        metrics = self.train_one()
        step = self.step
        if not bool(metrics["finite"]):  # one scalar per step: NaN/Inf never goes unnoticed
          loss, norm = float(metrics["loss"]), float(metrics["grad_norm"])
          msg = f"step {step}: non-finite loss {loss} or grad norm {norm}"
          if c.loss.nonfinite == "stop":
            raise FloatingPointError(msg + " (config.loss.nonfinite='stop')")
          self.skipped_updates += 1
          print(
            f"WARNING {msg}: update skipped (config.loss.nonfinite='skip'; "
            f"{self.skipped_updates} so far)",
            flush=True,
          )
        if (step % c.train.log_every == 0) or step == end:
          m = _to_float(metrics)
          m["skipped_updates"] = self.skipped_updates
          self._overlap_alarms(m)
          tokens = sum(t["tokens"] for t in m["teachers"].values()) * c.train.log_every
          now = time.time()
          rate = tokens / max(now - last_time, 1e-9)  # over the last log interval
          last_time = now
          elapsed = now - t0
          eta = (end - step) * elapsed / max(step - start_step, 1)
          record = {"step": step, **m, "tokens_per_s": rate, "elapsed_s": elapsed}
          history.append(record)
          jsonl.write(json.dumps(record) + "\n")
          jsonl.flush()
          _log_tb(writer, record)
          per_t = " ".join(f"{n}:rkl={v['reverse_kl']:.3f}" for n, v in m["teachers"].items())
          print(
            f"step {step}/{end} | loss {m['loss']:.4f} | {per_t} | {rate:,.0f} tok/s | "
            f"ETA {_fmt_eta(eta)}",
            flush=True,
          )
        if c.train.eval_every and step % c.train.eval_every == 0:
          ev = self.evaluate()
          jsonl.write(json.dumps({"step": step, "eval": ev}) + "\n")
          print(
            f"eval step {step} | "
            + " ".join(f"{n}:rkl={v['reverse_kl']:.3f}" for n, v in ev.items()),
            flush=True,
          )
        self.save()
      self.save(force=True)
    if self.checkpointer:
      self.checkpointer.wait()
    if writer:
      writer.close()
    if history:
      from jdistill import plots

      plots.learning_curves(history, os.path.join(out_dir, "learning_curves.png"))
    return history

  def _overlap_alarms(self, m: dict) -> None:
    """Adds a per-teacher `overlap_alarm` metric; warns when a teacher crosses a threshold."""
    o = self.config.overlap
    for name, tm in m["teachers"].items():
      alarms = overlap.overlap_alarms(
        {name: tm},
        min_topk_coverage=o.min_topk_coverage,
        max_off_support=o.max_off_support,
        k=o.k_for_alarm,
      )
      tm["overlap_alarm"] = float(bool(alarms))
      if alarms and name not in self._alarmed:
        for a in alarms:
          print(f"WARNING step {self.step}: {a}", flush=True)
        self._alarmed.add(name)
      elif not alarms and name in self._alarmed:
        print(
          f"step {self.step}: teacher {name!r} is back within the overlap thresholds", flush=True
        )
        self._alarmed.discard(name)

  def export(self, out_dir: str) -> None:
    hf.to_hf(
      nnx.merge(self.student_graphdef, self.state["params"]), out_dir, tokenizer=self.tokenizer
    )


def _fmt_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _tensorboard(path):
  try:
    from tensorboardX import SummaryWriter
  except ImportError:  # optional
    return None
  return SummaryWriter(path)


def _log_tb(writer, record):
  if writer is None:
    return
  step = record["step"]
  for key, value in record.items():
    if key == "teachers":
      for name, tm in value.items():
        for k, v in tm.items():
          writer.add_scalar(f"{name}/{k}", v, step)
    elif isinstance(value, (int, float)) and key != "step":
      writer.add_scalar(key, value, step)


def main(argv):
  del argv
  from absl import flags
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  config = flags.FLAGS.config
  try:
    config_lib.validate(config)
  except ValueError as e:
    sys.exit(f"jdistill: bad config: {e}")
  if flags.FLAGS.validate_only:
    print(config.to_json())
    return
  distributed.initialize()
  trainer = Trainer(config)
  print(
    f"jdistill: mesh {dict(trainer.mesh.shape)}, teachers {trainer.names}, "
    f"{trainer.batcher.rows_per_batch} rows/step, {trainer.batcher.n_skipped_malformed} malformed "
    f"data lines skipped, resuming at step {trainer.step}",
    flush=True,
  )
  before = trainer.evaluate()
  trainer.run()
  after = trainer.evaluate()
  print(format_before_after(before, after))
  if config.export_dir:
    trainer.export(config.export_dir)
    print(f"exported the student to {config.export_dir}")


def format_before_after(before: dict, after: dict) -> str:
  lines = [
    f"{'teacher':<14}{'reverse KL before':>19}{'after':>10}{'teacher logp before':>21}{'after':>10}"
  ]
  for name in before:
    b, a = before[name], after[name]
    lines.append(
      f"{name:<14}{b['reverse_kl']:>19.4f}{a['reverse_kl']:>10.4f}"
      f"{b['teacher_logp']:>21.4f}{a['teacher_logp']:>10.4f}"
    )
  return "\n".join(lines)


def cli():
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.", lock_config=True)
  flags.mark_flag_as_required("config")
  flags.DEFINE_bool("validate_only", False, "Validate the config, print it as JSON and exit.")
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  app.run(main)


if __name__ == "__main__":
  cli()

"""What the training stages (OPD, SFT, RLVR) share: their construction, the compiled step's
shardings and donation, checkpoints, resume, the run, the export.

The stage contract. `TrainingStage(config)` builds every stage in this order, calling the hooks
a stage defines where stages differ:

   1. `config_lib.validate(config)`; the run's identity (`identity`) and directory (`run_dir`)
   2. `build_mesh()`              `mesh` (default `build.mesh`; OPD adds its sampler's mesh)
   3. `tokenizer`
   4. `build_data()`              everything that reads user input (data files, their checks and
                                  counts): before any model loads or the step compiles, so a bad
                                  input fails in seconds
   5. the student: `graphdef`, `model_cfg`, the identity's `model_config`
   6. `build_models(student)`     the other models (teachers, a reference) → the params to train
                                  (default: the student's own)
   7. `optimizer`, `schedule`, `state` ({"params", "opt_state", "step"}), `step` = 0 (the host
      copy of state["step"]: the loop never waits on the device for it), `rng` = key(seed),
      `loop`
   8. `build_step()`              the jitted step (`jit_step`) and what evaluation runs
   9. `resume_or_start()`         restores from `checkpoint.dir` when resuming; records the run
  10. `started()`                 after the restore (default: nothing; SFT probes at step 0)

A stage must define `build_data`, `build_step`, the loop's methods (`jdistill.runtime.loop.Stage`:
`train_one`, `step_tokens`, `log_record`, `progress`, `evaluate`, `describe_eval`) and
`describe_change` (the before → after summary of `run_training`). It may override
`build_mesh`, `build_models`, `started`, `data_state` / `set_data_state` (where its data stream
stands, saved with each checkpoint; default: a `batcher`'s `data_iter`), `pending_state` /
`set_pending_state` (work done ahead of the next step, saved with each checkpoint), and the class
attributes `curve` (the plot of its records), `token_label` and `done` (see `TrainingStage`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jdistill import config as config_lib
from jdistill.data import prompts as data_lib
from jdistill.models import hf
from jdistill.report import card
from jdistill.report import html as report
from jdistill.runtime import build, plots, run_log, wandb_log
from jdistill.runtime import checkpoint as ckpt
from jdistill.runtime import loop as loop_lib
from jdistill.runtime.io import write_json_atomic, writing
from jdistill.runtime.run_dir import open_run_dir, run_identity

log = logging.getLogger("jdistill")


def shardings(tree):
  """The shardings of a pytree of arrays (None stays None)."""
  return jax.tree.map(lambda x: x.sharding, tree)


class TrainingStage:
  """Base of `opd.OPDTrainer`, `sft.SFTTrainer` and `rlvr.RLVRTrainer`: builds a stage from a
  config (the contract: this module's docstring) and runs it with `loop.Loop`."""

  curve = staticmethod(plots.learning_curves)  # the plot of the stage's records
  token_label = "generated"  # the progress line's first tokens/s: which tokens it counts
  done = False  # True once the stage has reached its goal before `end` (the loop stops)
  checkpointer: ckpt.Checkpointer | None = None  # config.checkpoint.dir's (`resume_or_start`)
  switches: dict | None = None  # teachers that switched stage (SFT's overlap warmup)

  def __init__(self, config):
    config_lib.validate(config)
    self.config = c = config
    self.identity = run_identity(c)
    self.run_dir = open_run_dir(c, self.identity)
    # Everything that reads user input runs before the models load and the step compiles.
    self.build_mesh()
    self.tokenizer = build.tokenizer(c)
    self.build_data()

    student = build.student(c, self.mesh)
    self.graphdef, self.model_cfg = student.graphdef, student.cfg
    self.identity["model_config"] = dataclasses.asdict(student.cfg)
    params = self.build_models(student)
    self.optimizer, self.schedule = build.optimizer(c)
    self.state = build.train_state(params, self.optimizer, self.mesh)
    self.step = 0  # host copy of state["step"]: the loop never waits on the device for it
    self.rng = jax.random.key(c.seed)
    self.loop = loop_lib.Loop(
      log_every=c.train.log_every, eval_every=c.train.eval_every, nonfinite=c.loss.nonfinite
    )
    self.build_step()
    self.resume_or_start()
    self.started()

  # --- the hooks ---------------------------------------------------------------------------

  def build_mesh(self) -> None:
    """Sets `mesh`, the training mesh."""
    self.mesh = build.mesh(self.config)

  def build_data(self) -> None:
    """Reads and checks the stage's data (its only reads of user input besides the config and
    the models); sets what `data_state` / `set_data_state` and the step's batches use."""
    raise NotImplementedError

  def build_models(self, student: build.Student):
    """Loads the models the step needs besides the student → the params to train."""
    return student.params

  def build_step(self) -> None:
    """Builds the stage's jitted step (`jit_step`; it compiles on its first call) and what its
    evaluation runs."""
    raise NotImplementedError

  def started(self) -> None:
    """Runs once the stage is built and restored (or fresh)."""

  def jit_step(self, fn, *in_shardings):
    """`fn(state, *args) -> (state, metrics)` compiled once: the train state's shardings in
    and out, the state donated (the caller rebinds `self.state` to the result),
    `in_shardings` those of `args` in order; metrics are placed as XLA chooses."""
    state_shardings = shardings(self.state)
    return jax.jit(
      fn,
      in_shardings=(state_shardings, *in_shardings),
      out_shardings=(state_shardings, None),
      donate_argnums=(0,),
    )

  # --- the run ---------------------------------------------------------------------------

  @property
  def params(self):
    return self.state["params"]

  @property
  def skipped_updates(self) -> int:
    """Non-finite updates skipped so far (this session)."""
    return self.loop.skipped_updates

  def encode_prompt(self, record: dict) -> list[int]:
    """A held-out prompt record's token ids as the student sees it (`data.use_chat_template`;
    longer than `data.max_prompt_len`: its last tokens)."""
    c = self.config
    return data_lib.encode_prompt(
      record, self.tokenizer, use_chat_template=c.data.use_chat_template,
      max_prompt_len=c.data.max_prompt_len, overlong="truncate_left",
    )  # fmt: skip

  def rollout_key(self, step: int):
    """The sampler's key for the rollouts of `step`: `fold_in(key(seed), step)`."""
    return jax.random.fold_in(self.rng, step)

  def data_state(self) -> dict:
    return self.data_iter.get_state()

  def set_data_state(self, data_state: dict) -> None:
    self.data_iter = self.batcher.iterator()
    self.data_iter.set_state(data_state)

  def pending_state(self) -> tuple[dict, dict] | None:
    """What the stage computed ahead of the next step and a checkpoint must keep for an exact
    resume: `(host arrays (nested dicts), JSON description)`, or None (default: nothing)."""
    return None

  def set_pending_state(self, saved: dict | None) -> None:
    """Takes back `pending_state()` from a restored checkpoint: `{"description", "arrays"}`, or None
    for a checkpoint written before pending state was saved. Default: nothing to take."""

  def resume_or_start(self) -> None:
    """Opens `config.checkpoint.dir`, restores from it when resuming, records the run."""
    c = self.config
    self.checkpointer = build.checkpointer(c)
    if self.checkpointer is not None:
      self.checkpointer.write_model_config(self.model_cfg)  # refuses another architecture
      if c.checkpoint.resume:
        self.restore(None if c.checkpoint.restore_step < 0 else c.checkpoint.restore_step)
    self.run_dir.record_identity(self.identity["config_hash"], c.to_json_best_effort())
    dropped = run_log.truncate(c.output_dir, self.step)
    if dropped:
      log.info("resuming at step %d: dropped %d later metrics records", self.step, dropped)

  def restore(self, step: int | None = None) -> bool:
    """Restores `step` (default: the latest) of `config.checkpoint.dir`; False if none."""
    restored = ckpt.restore_train_state(self.checkpointer, self.state, step)
    if restored is None:
      return False
    saved_hash = restored[3].get("identity", {}).get("config_hash")
    if self.config.run_mode == "auto" and saved_hash not in (None, self.identity["config_hash"]):
      raise ValueError(
        f"{self.checkpointer.directory} holds checkpoints of a run with another config (hash "
        f"{saved_hash}, this config {self.identity['config_hash']}); pass --resume to "
        "continue it with this config, or --new_run to start afresh (moved aside, not deleted)"
      )
    self.state, self.rng, data_state, meta = restored
    self.step = int(jax.device_get(self.state["step"]))
    self.set_data_state(data_state)
    self.set_pending_state(meta.get("pending"))
    log.info("restored step %d from %s", self.step, self.checkpointer.directory)
    return True

  def save(self, force: bool = False) -> bool:
    if self.checkpointer is None:
      return False
    return ckpt.save_train_state(
      self.checkpointer,
      self.step,
      self.state,
      rng=self.rng,
      data_state=self.data_state(),
      identity=self.identity,
      pending=self.pending_state(),
      force=force,
    )

  def preempted(self, step: int) -> bool:
    """The platform's preemption notice, the same step on every host (orbax)."""
    return self.checkpointer is not None and self.checkpointer.manager.reached_preemption(step)

  def run(self, steps: int | None = None) -> list[dict]:
    """Trains until `train.steps` (or `steps` more); returns the logged records."""
    end = self.config.train.steps if steps is None else self.step + steps
    wandb = wandb_log.options(self.config, self.identity["config_hash"])
    return self.loop.run_to(self, end, self.config.output_dir, self.curve, wandb=wandb)

  def export(self, out_dir: str) -> None:
    """The student as a Hugging Face folder (safetensors, config, tokenizer) with its model
    card (README.md: `jdistill.report.card`)."""
    with writing(out_dir):  # a full or unwritable disk: one line; a previous export kept
      hf.to_hf(nnx.merge(self.graphdef, self.params), out_dir, tokenizer=self.tokenizer)
      if jax.process_index() == 0:
        card.write_model_card(
          out_dir, self.config, step=self.step, config_hash=self.identity["config_hash"]
        )


def evaluate_start(trainer: TrainingStage, output_dir: str) -> dict:
  """The starting student's evaluation, measured at step 0 and kept in `output_dir`
  (`eval_before.json`; with several processes one file each, as a process evaluates its own
  rows): a resumed run reports the uninterrupted run's "before", not an evaluation of the
  student it resumed. `evaluate` is collective, so the processes read only if every one has
  its file."""
  name = (
    "eval_before.json" if jax.process_count() == 1 else f"eval_before.{jax.process_index()}.json"
  )
  path = os.path.join(output_dir, name)
  kept = trainer.step > 0 and os.path.exists(path)
  if jax.process_count() > 1:
    kept = bool(np.all(multihost_utils.process_allgather(np.array(kept))))
  if kept:
    with open(path) as f:
      return json.load(f)
  before = json.loads(json.dumps(trainer.evaluate(), default=float))  # as a resume reads it
  if trainer.step == 0:
    write_json_atomic(path, before)
  return before


class InputError(Exception):
  """Bad input found while building a stage (config, files, models): a one-line error."""


def run_training(stage_cls, config) -> dict:
  """Builds `stage_cls(config)`, evaluates, trains to `train.steps`, evaluates again and
  exports the student (`export_dir`) → a summary of the run."""
  try:
    trainer = stage_cls(config)
  except (ValueError, FileNotFoundError) as e:
    raise InputError(str(e)) from e
  log.info(
    "stage %s, mesh %s, resuming at step %d", config.stage, dict(trainer.mesh.shape), trainer.step
  )
  before = evaluate_start(trainer, config.output_dir)
  trainer.run()
  after = trainer.evaluate()
  print(trainer.describe_change(before, after), flush=True)
  if jax.process_index() == 0:
    log.info("the run's report: %s", report.write_report(config.output_dir))
  if config.export_dir:
    trainer.export(config.export_dir)
    log.info("exported the student to %s", config.export_dir)
  summary = {"step": trainer.step, "eval_before": before, "eval_after": after}
  if trainer.switches:
    summary["switches"] = trainer.switches
  return summary

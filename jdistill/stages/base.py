"""What the training stages (OPD, SFT, RLVR) share: checkpoints, resume, the run, the export."""

from __future__ import annotations

import logging

import jax
from flax import nnx

from jdistill.models import hf
from jdistill.runtime import build, plots, run_log
from jdistill.runtime import checkpoint as ckpt

log = logging.getLogger("jdistill")


class TrainingStage:
  """Base of `train.OPDTrainer`, `sft.SFTTrainer` and `rlvr.RLVRTrainer`.

  A subclass's constructor sets `config`, `state` ({"params", "opt_state", "step"}), `step`,
  `rng`, `identity`, `loop`, `graphdef`, `model_cfg`, `tokenizer` and `run_dir`, then calls
  `resume_or_start()`. It defines `data_state()` and `set_data_state(d)` (where its data
  stream stands, saved with each checkpoint) and may set `curve` (the plot of its records).
  """

  curve = staticmethod(plots.learning_curves)

  @property
  def params(self):
    return self.state["params"]

  def data_state(self) -> dict:
    return self.data_iter.get_state()

  def set_data_state(self, data_state: dict) -> None:
    self.data_iter = self.batcher.iterator()
    self.data_iter.set_state(data_state)

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
      print(f"jdistill: resuming at step {self.step}: dropped {dropped} later metrics records")

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
    self.state, self.rng, data_state, _ = restored
    self.step = int(jax.device_get(self.state["step"]))
    self.set_data_state(data_state)
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
      force=force,
    )

  def preempted(self, step: int) -> bool:
    """The platform's preemption notice, the same step on every host (orbax)."""
    return self.checkpointer is not None and self.checkpointer.manager.reached_preemption(step)

  def run(self, steps: int | None = None) -> list[dict]:
    """Trains until `train.steps` (or `steps` more); returns the logged records."""
    end = self.config.train.steps if steps is None else self.step + steps
    return self.loop.run_to(self, end, self.config.output_dir, self.curve)

  def export(self, out_dir: str) -> None:
    """The student as a Hugging Face folder (safetensors, config, tokenizer)."""
    hf.to_hf(nnx.merge(self.graphdef, self.params), out_dir, tokenizer=self.tokenizer)


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
  before = trainer.evaluate()
  trainer.run()
  after = trainer.evaluate()
  print(trainer.describe_change(before, after), flush=True)
  if config.export_dir:
    trainer.export(config.export_dir)
    log.info("exported the student to %s", config.export_dir)
  summary = {"step": trainer.step, "eval_before": before, "eval_after": after}
  if getattr(trainer, "switches", None):
    summary["switches"] = trainer.switches
  return summary

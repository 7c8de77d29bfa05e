"""The training loop every stage shares: step cadence, non-finite policy, progress, eval, saves.

A stage (`jdistill.stages`: OPD, SFT, RLVR) hands the loop an object with

  step: int                        host copy of its step counter
  train_one(diagnostics) -> metrics  one compiled update; device metrics with "finite",
                                   "loss" and "grad_norm" scalars. `diagnostics` is True on
                                   the steps that will be logged: the stage may skip costly
                                   diagnostics on the others
  step_tokens(metrics) -> dict     {"generated": n, "total": n} tokens of that step (device
                                   scalars are fine: they are read only at log steps)
  log_record(metrics) -> dict      the host floats to log at a log step
  progress(record) -> str          the stage's part of the progress line
  evaluate() -> dict               held-out results
  describe_eval(results) -> str    one line for the console
  save(force) -> bool              a checkpoint on its interval (or forced)
  preempted(step) -> bool          the platform's preemption notice (orbax / JAX sync point)
  done: bool                       True when the stage has reached its goal before `end`
                                   (the overlap-triggered warmup); else False
  token_label: str                 what the progress line's first tokens/s counts
                                   ("generated", SFT's "completion")
  checkpointer                     its `checkpoint.Checkpointer` (`run_to` waits for its last
                                   save to commit), or None without checkpoints
  take_samples() -> list[dict]     (optional) the sample rollouts recorded since the last call
                                   (OPD's `SampleRecorder` records): the run log's W&B table

and the loop does the rest the same way for every stage.

Preemption and interrupts: while the loop runs, SIGTERM and SIGINT (Ctrl-C) do not kill the
process. The step under way finishes, a checkpoint is written (and the caller waits for it to
commit), and `run` raises `Stopped`, which the command line turns into a one-line message and
exit status 128 + the signal number. A second signal aborts at once (`os._exit`); a save still
in flight is then left uncommitted, and committed checkpoints are never touched. On TPU/GCE
pods the preemption notice reaches every host at the same step through `stage.preempted`
(orbax's `CheckpointManager.reached_preemption`), so all hosts save the same step.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Protocol

from jdistill.runtime.run_log import RunLog

log = logging.getLogger("jdistill")

if TYPE_CHECKING:
  from jdistill.runtime.checkpoint import Checkpointer


class Stage(Protocol):
  """What the loop reads of a stage (`stages.base.TrainingStage` gives the defaults)."""

  step: int
  done: bool
  token_label: str
  checkpointer: Checkpointer | None

  def train_one(self, diagnostics: bool = True) -> dict: ...
  def step_tokens(self, metrics: dict) -> dict: ...
  def log_record(self, metrics: dict) -> dict: ...
  def progress(self, record: dict) -> str: ...
  def evaluate(self) -> dict: ...
  def describe_eval(self, results: dict) -> str: ...
  def save(self, force: bool = False) -> bool: ...
  def preempted(self, step: int) -> bool: ...


class Stopped(Exception):
  """The run stopped early on a signal or a preemption notice, after saving; `code` is the
  exit status the command line should use."""

  def __init__(self, message: str, code: int):
    super().__init__(message)
    self.code = code


class StopSignals:
  """While active, the first SIGTERM/SIGINT only asks the loop to stop after the current
  step; a second one exits at once."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.received is not None:
      print(
        f"jdistill: second signal ({name}): aborting now; committed checkpoints are untouched",
        flush=True,
      )
      os._exit(128 + signum)
    self.received = signum
    print(
      f"jdistill: received {name}: finishing this step, then saving a checkpoint and "
      "exiting (send it again to abort at once)",
      flush=True,
    )


def format_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Loop:
  """Runs a stage to a step, counting skipped (non-finite) updates across calls."""

  def __init__(self, *, log_every: int, eval_every: int, nonfinite: str):
    """`nonfinite`: "skip" (count, warn, go on) or "stop" (raise FloatingPointError)."""
    self.log_every = log_every
    self.eval_every = eval_every
    self.nonfinite = nonfinite
    self.skipped_updates = 0

  def check_finite(self, stage: Stage, metrics: dict) -> None:
    # one scalar per step: NaN/Inf never goes unnoticed, also between log steps
    if bool(metrics["finite"]):
      return
    loss, norm = float(metrics["loss"]), float(metrics["grad_norm"])
    msg = f"step {stage.step}: non-finite loss {loss} or grad norm {norm}"
    if self.nonfinite == "stop":
      raise FloatingPointError(msg + " (config.loss.nonfinite='stop')")
    self.skipped_updates += 1
    log.warning(
      "%s: update skipped (config.loss.nonfinite='skip'; %d so far)", msg, self.skipped_updates
    )

  def run_to(self, stage: Stage, end: int, out_dir: str, plot, wandb=None) -> list[dict]:
    """`run` with the stage's metrics in `out_dir` (metrics.jsonl, TensorBoard, `plot`'s
    PNG, W&B with `wandb`: `wandb_log.Options`), waiting for the stage's last checkpoint to
    commit (`stage.checkpointer`)."""
    log = RunLog(out_dir, plot=plot, wandb=wandb)
    try:
      return self.run(stage, end, log)
    finally:
      try:
        if stage.checkpointer is not None:
          stage.checkpointer.wait()
      finally:
        log.close()

  def run(self, stage: Stage, end: int, log: RunLog) -> list[dict]:
    """Trains `stage` until its step reaches `end`; returns the records logged.

    tokens/s are over the steps since the previous log line (generated tokens and all
    tokens, both labelled); the ETA is extrapolated from the steps after the first one
    of this call, so compile time does not inflate it. Raises `Stopped` after saving when a
    signal or a preemption notice arrives (see the module docstring).
    """
    if stage.step < end:
      print(f"step {stage.step}/{end} | compiling…", flush=True)
    with StopSignals() as signals:
      return self._run(stage, end, log, signals)

  def _run(self, stage: Stage, end: int, log: RunLog, signals: StopSignals) -> list[dict]:
    records = []
    t_start = time.time()
    t_compiled = step_compiled = None
    t_last, pending = t_start, []
    while stage.step < end and not stage.done:
      upcoming = stage.step + 1
      logged = upcoming % self.log_every == 0 or upcoming == end
      metrics = stage.train_one(diagnostics=logged)
      self.check_finite(stage, metrics)
      step = stage.step
      pending.append(stage.step_tokens(metrics))
      now = time.time()
      if t_compiled is None:
        t_compiled, step_compiled = now, step
      if step % self.log_every == 0 or step == end or stage.done:
        record = stage.log_record(metrics)
        generated = sum(float(t["generated"]) for t in pending)
        total = sum(float(t["total"]) for t in pending)
        pending = []
        interval = max(now - t_last, 1e-9)
        t_last = now
        record.update(
          step=step,
          skipped_updates=self.skipped_updates,
          generated_tokens_per_s=generated / interval,
          tokens_per_s=total / interval,
          elapsed_s=now - t_start,
        )
        if step > step_compiled:
          eta = format_eta((end - step) * (now - t_compiled) / (step - step_compiled))
        else:
          eta = "after the first step"
        records.append(record)
        log.write(record)
        take_samples = getattr(stage, "take_samples", None)
        if take_samples is not None:
          log.write_samples(step, take_samples())
        print(
          f"step {step}/{end} | {stage.progress(record)} | "
          f"{record['generated_tokens_per_s']:,.0f} {stage.token_label} tok/s, "
          f"{record['tokens_per_s']:,.0f} tok/s in all | ETA {eta}",
          flush=True,
        )
      if self.eval_every and step % self.eval_every == 0:
        results = stage.evaluate()
        log.write_eval(step, results)
        print(f"eval step {step} | {stage.describe_eval(results)}", flush=True)
      stage.save()
      if signals.received is not None or stage.preempted(step):
        stage.save(force=True)
        why = signal.Signals(signals.received).name if signals.received else "a preemption notice"
        code = 128 + signals.received if signals.received else 143
        raise Stopped(
          f"stopped by {why} after step {step}; a checkpoint of step {step} was written "
          "(if checkpoints are on): run the same command again to resume",
          code,
        )
    stage.save(force=True)
    return records

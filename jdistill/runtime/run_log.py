"""Where a run's metrics go: `metrics.jsonl`, TensorBoard (`tb/`), PNG learning curves and, with
`train.wandb`, Weights & Biases (`jdistill.runtime.wandb_log`: scalars, evals, sample rollouts).

A record is a dict with an int `"step"`, float scalars, and optionally nested dicts of
floats (e.g. `"teachers": {name: {metric: value}}`, flattened to `name/metric` in
TensorBoard).

`metrics.jsonl` only ever holds whole records: a record whose append fails (a full disk) is cut
off again, and the run stops with `io.WriteFailed`; a torn last line (a crash mid-append) is
not read as a record.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING

from jdistill.runtime.io import atomic_write, writing

if TYPE_CHECKING:
  from jdistill.runtime.wandb_log import Options


def read_records(path: str) -> list[dict]:
  """The JSON records of a metrics.jsonl file (none if it does not exist)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
  records = []
  for k, (n, line) in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if k < len(lines) - 1 or line.endswith("\n"):
        raise ValueError(f"{path}:{n}: not a metrics record") from None
      # a torn last line: an append cut short by a crash; the step is logged again on resume
  return records


def truncate(out_dir: str, step: int) -> int:
  """Drops the records after `step` from `<out_dir>/metrics.jsonl` (a resumed run logs them
  again, so each step appears once); returns how many were dropped."""
  path = os.path.join(out_dir, "metrics.jsonl")
  records = read_records(path)
  kept = [r for r in records if r.get("step", 0) <= step]
  if len(kept) != len(records) or _torn(path):
    with atomic_write(path) as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
  return len(records) - len(kept)


def _torn(path: str) -> bool:
  """Whether the file's last byte is not a newline (its last line was cut short)."""
  if not os.path.exists(path) or not os.path.getsize(path):
    return False
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) != b"\n"


class RunLog:
  """Appends records of one run under `out_dir`; `close()` draws the PNG curves."""

  def __init__(self, out_dir: str, plot=None, wandb: Options | None = None):
    """`plot(history, path)`: draws the records logged in this session into `path`;
    `wandb`: also log to Weights & Biases (None: `wandb` is not imported)."""
    os.makedirs(out_dir, exist_ok=True)
    self.out_dir = out_dir
    self._plot = plot
    self.history: list[dict] = []
    self._path = os.path.join(out_dir, "metrics.jsonl")
    with writing(self._path):
      self._jsonl = open(self._path, "ab", buffering=0)  # noqa: SIM115
    self._tb = _tensorboard(os.path.join(out_dir, "tb"))
    self._wandb = None
    if wandb is not None:
      from jdistill.runtime.wandb_log import WandbLog

      self._wandb = WandbLog(out_dir, wandb)

  def write(self, record: dict) -> None:
    """A training record: JSONL, TensorBoard, W&B (if on), and kept for the curves."""
    self.history.append(record)
    self._write_json(record)
    scalars = _flatten(record)
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, value, record["step"])
    if self._wandb is not None:
      self._wandb.log(record["step"], scalars)

  def write_eval(self, step: int, results: dict) -> None:
    self._write_json({"step": step, "eval": results})
    if self._wandb is not None:
      self._wandb.log(step, _flatten({"eval": results}))

  def write_samples(self, step: int, records: list[dict]) -> None:
    """The sample rollouts recorded at `step` (`SampleRecorder.record`, which writes
    samples.jsonl itself): to W&B as a table, if it is on."""
    if self._wandb is not None and records:
      self._wandb.samples(step, records)

  def _write_json(self, record: dict) -> None:
    data = memoryview((json.dumps(record) + "\n").encode())
    start = self._jsonl.seek(0, os.SEEK_END)
    try:
      with writing(self._path):
        while data:
          data = data[self._jsonl.write(data) :]
    except BaseException:
      with contextlib.suppress(OSError):  # the file keeps whole records only
        os.ftruncate(self._jsonl.fileno(), start)
      raise

  def close(self) -> str | None:
    """Closes the files; returns the learning-curve PNG path, if one was drawn. The curves
    cover the whole run, every session of it, as metrics.jsonl holds it."""
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.close()
    records = read_records(os.path.join(self.out_dir, "metrics.jsonl"))
    history = [r for r in records if "eval" not in r] or self.history
    if self._plot is None or not history:
      return None
    return self._plot(history, os.path.join(self.out_dir, "learning_curves.png"))


def _flatten(record: dict, prefix: str = "") -> dict[str, float]:
  out = {}
  for key, value in record.items():
    if key == "step" and not prefix:
      continue
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}/" if prefix or key != "teachers" else ""))
    elif isinstance(value, (int, float)):
      out[f"{prefix}{key}"] = value
  return out


def _tensorboard(path):
  try:
    from tensorboardX import SummaryWriter
  except ImportError:  # optional
    return None
  # made here, not by tensorboardX, whose check-then-create races between the processes of a
  # multi-process run writing one output folder (FileExistsError killed one of them)
  os.makedirs(path, exist_ok=True)
  return SummaryWriter(path)

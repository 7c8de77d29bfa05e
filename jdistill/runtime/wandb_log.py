"""Weights & Biases beside TensorBoard (`train.wandb`): the run log's optional third sink.

`RunLog` hands this module the same flattened scalars it gives TensorBoard, the eval results
(`eval/<name>`) and the OPD sample rollouts, each with its step. The rollouts go in as a
`wandb.Table` per recorded step, one row per sampled rollout:

  step, teacher, row, prompt, completion, mean_log_ratio, tokens

where `completion` is the rollout's completion text, `tokens` its model tokens (a multi-turn
episode's environment tokens left out) and `mean_log_ratio` the mean over those tokens of
`student_logp - teacher_logp` (the per-token reverse-KL estimate OPD minimises).

`wandb` is imported only when a mode is set, so a run without W&B never imports it. `offline`
writes under `<output_dir>/wandb/` and needs no network (`wandb sync` uploads it later);
`online` streams to the W&B server. The run's W&B id is kept in `<output_dir>/wandb/run_id`:
a resumed run (`checkpoint.resume`, `run_mode=resume`) continues the same W&B run, while
`run_mode=new` moves the output directory aside with its id, so the fresh run gets a new one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets

import jax

RUN_ID = "run_id"  # under <output_dir>/wandb/
COLUMNS = ("step", "teacher", "row", "prompt", "completion", "mean_log_ratio", "tokens")


@dataclasses.dataclass(frozen=True)
class Options:
  mode: str  # "offline" or "online"
  project: str
  config: dict  # the run's config, as W&B shows it
  config_hash: str  # the first part of a new run's id


def options(config, config_hash: str) -> Options | None:
  """The W&B options of a run of `config` (`train.wandb`, `train.wandb_project`); None when
  W&B is off, and on every process but the first (one W&B run per training run)."""
  if not config.train.wandb or jax.process_index() != 0:
    return None
  return Options(
    mode=config.train.wandb,
    project=config.train.wandb_project,
    config=json.loads(config.to_json_best_effort()),
    config_hash=config_hash,
  )


def run_id(out_dir: str, config_hash: str) -> str:
  """The W&B id of the run in `out_dir`: the stored one, or a new `<hash>-<random>` stored."""
  path = os.path.join(out_dir, "wandb", RUN_ID)
  if os.path.exists(path):
    with open(path) as f:
      return f.read().strip()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  new = f"{config_hash[:8]}-{secrets.token_hex(4)}"
  with open(path, "w") as f:
    f.write(new + "\n")
  return new


def sample_rows(records: list[dict]) -> list[list]:
  """`SampleRecorder.record`'s records (`jdistill/report/samples.py`) → the table's rows."""
  rows = []
  for r in records:
    model = [t for t in r["tokens"] if not t.get("environment")]
    ratios = [t["student_logp"] - t["teacher_logp"] for t in model]
    completion = "".join(t["text"] for t in r["tokens"])
    mean = sum(ratios) / len(ratios) if ratios else float("nan")
    rows.append([r["step"], r["teacher"], r["row"], r["prompt"], completion, mean, len(model)])
  return rows


class WandbLog:
  """One W&B run: `wandb.init` on construction, `wandb.log(..., step=step)` per call."""

  def __init__(self, out_dir: str, options: Options):
    os.environ.setdefault("WANDB_SILENT", "true")  # the console keeps jdistill's progress lines
    import wandb

    self._wandb = wandb
    self.run = wandb.init(
      project=options.project,
      dir=out_dir,
      mode=options.mode,
      config=options.config,
      id=run_id(out_dir, options.config_hash),
      resume="allow",
      settings=wandb.Settings(console="off"),  # stdout stays ours, not mirrored to W&B
    )

  def log(self, step: int, scalars: dict) -> None:
    if scalars:
      self.run.log(scalars, step=step)

  def samples(self, step: int, records: list[dict]) -> None:
    table = self._wandb.Table(columns=list(COLUMNS), data=sample_rows(records))
    self.run.log({"samples": table}, step=step)

  def close(self) -> None:
    self.run.finish()

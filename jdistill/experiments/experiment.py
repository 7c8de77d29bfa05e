"""The support-overlap experiment: which OPD recipe teaches a student its teachers' skills?

  make experiment                      # the full grid, about an hour on 2 CPU cores
  python -m jdistill experiment --out=runs/experiment [--seeds=3] [--losses=...] ...

On the task world (`jdistill.experiments.task_world`: three verifiable domains, a weak base, lineage
teachers forked from it, external teachers from other inits in another surface style) it
runs every cell of

  loss     sampled_token | topk_teacher (k=8, tail bucket) | reverse_kl | overlap_aware
  world    lineage | external                              (which teachers)
  warmup   none | sft (fixed steps) | overlap (SFT until the calibrated overlap crosses)
  seed     0 .. seeds-1

with the same OPD steps and rollouts per cell, from the base (or its warmed-up copy). The
warmup SFT data are the teachers' own verified completions of the training prompts (one
generation per world, shared by its cells). Each cell records per-domain greedy accuracy on
the held-out prompts and each teacher's full-vocab reverse KL and calibrated overlap, every
`eval_every` steps. Output under `--out`: results.json (every number), table.md (mean ±
std over seeds), accuracy.png (accuracy vs step), overlap.png (overlap of the base's
rollouts, lineage vs external). Finished cells are cached (cell.json) and skipped on a
re-run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time

import ml_collections
import numpy as np

from jdistill.config import base_config, teacher_config
from jdistill.experiments import task_world, tasks
from jdistill.losses import registry
from jdistill.runtime.io import write_json_atomic
from jdistill.stages import pipeline

LOSSES = registry.check_names(
  ("sampled_token", "topk_teacher", "reverse_kl", "overlap_aware"), "experiment LOSSES"
)
WORLDS = ("lineage", "external")
WARMUPS = ("none", "sft", "overlap")
VERIFIER = "jdistill.experiments.tasks:verify"


@dataclasses.dataclass(frozen=True)
class Grid:
  losses: tuple[str, ...] = LOSSES
  worlds: tuple[str, ...] = WORLDS
  warmups: tuple[str, ...] = WARMUPS
  seeds: int = 3
  opd_steps: int = 200
  eval_every: int = 50
  warmup_steps: int = 60  # SFT steps of "sft"; the most the "overlap" warmup may take
  until_overlap: float = 0.7
  slots_per_teacher: int = 16
  warmup_data: str = "verified"  # the teachers' completions SFT learns: verified | all
  lr: float = 2e-3
  max_new_tokens: int = 48

  def cells(self):
    return list(itertools.product(self.worlds, self.warmups, range(self.seeds), self.losses))


def _common(config, world: str, kind: str, seed: int, grid: Grid) -> None:
  """Fields every stage of the experiment shares: tokenizer, prompts, teachers of `kind`,
  the devices (`task_world.NUM_DEVICES`)."""
  config.num_devices = task_world.NUM_DEVICES
  config.seed = seed
  config.tokenizer = os.path.join(world, "tokenizer")
  config.teachers = ml_collections.ConfigDict(
    {
      d: teacher_config(os.path.join(world, f"{kind}_{d}"), d, param_dtype="float32")
      for d in tasks.DOMAINS
    }
  )
  d = config.data
  d.train_files = os.path.join(world, "train.jsonl")
  d.eval_files = os.path.join(world, "eval.jsonl")
  d.use_chat_template = False
  d.max_prompt_len = 24
  d.slots_per_teacher = grid.slots_per_teacher
  s = config.sampling
  s.max_new_tokens = grid.max_new_tokens
  s.prompt_buckets = (24,)
  s.stop_at_eos = True
  config.loss.chunk_size = 16
  config.loss.topk = 8
  config.optimizer.b2 = 0.99
  config.train.eval_every = 0


def opd_config(world, kind, loss, student, out_dir, seed, grid: Grid):
  c = base_config()
  _common(c, world, kind, seed, grid)
  for d in tasks.DOMAINS:
    c.teachers[d].loss = loss
  c.student.path = student
  c.output_dir = out_dir
  c.optimizer.lr = grid.lr
  c.train.steps = grid.opd_steps
  c.optimizer.warmup_steps = min(5, grid.opd_steps)
  c.train.log_every = 10
  c.train.sample_rows = 0  # a grid of short cells: its report is the answer and the table
  c.eval.verifier = VERIFIER
  return c


def generate_config(world, kind, out_dir, grid: Grid):
  c = base_config()
  _common(c, world, kind, 0, grid)
  c.stage = "generate"
  c.student.path = os.path.join(world, "base")
  c.generate.model = "teachers"
  c.generate.out_dir = out_dir
  c.generate.samples_per_prompt = 1
  c.generate.prompts_per_batch = 64
  c.generate.verifier = VERIFIER
  c.generate.keep = grid.warmup_data  # "verified": rejection sampling, correct answers only
  c.sampling.temperature = 0.0
  return c


def warmup_config(world, kind, warmup, data_files, out_dir, seed, grid: Grid):
  c = base_config()
  _common(c, world, kind, seed, grid)
  c.stage = "sft"
  c.student.path = os.path.join(world, "base")
  c.output_dir = out_dir
  c.export_dir = os.path.join(out_dir, "final")
  c.sft.train_files = data_files
  c.sft.max_len = 96
  c.sft.rows_per_step = 16
  c.optimizer.lr = 3e-3
  c.train.steps = grid.warmup_steps
  c.optimizer.warmup_steps = min(5, grid.warmup_steps)
  c.train.log_every = 10
  if warmup == "overlap":
    c.sft.until_overlap = grid.until_overlap
    c.sft.overlap_every = 10
    c.sft.overlap_rows = 8
  return c


def _once(config, out_dir: str, run) -> dict:
  """`run(config)`'s summary, computed once: cached in `<out_dir>/DONE.json`."""
  return pipeline.run_once(config, out_dir, run)


def warmed_up(exp, world, kind, warmup, seed, grid: Grid) -> tuple[str, dict]:
  """The student a cell starts OPD from, and what its warmup did."""
  if warmup == "none":
    return os.path.join(world, "base"), {}
  from jdistill.stages import generate, run_stage

  gen = generate_config(world, kind, os.path.join(exp, kind, "teacher_data"), grid)
  _once(gen, gen.generate.out_dir, run_stage)
  files = ",".join(generate.output_files(gen))
  out = os.path.join(exp, kind, f"warmup_{warmup}", f"seed{seed}")
  config = warmup_config(world, kind, warmup, files, out, seed, grid)
  summary = _once(config, out, run_stage)
  return config.export_dir, summary


def run_cell(exp, world, kind, warmup, seed, loss, grid: Grid) -> dict:
  """One cell: warmup (cached), then OPD with accuracy every `eval_every` steps."""
  out = os.path.join(exp, kind, f"warmup_{warmup}", f"seed{seed}", loss)
  cached = os.path.join(out, "cell.json")
  if os.path.exists(cached):
    with open(cached) as f:
      return json.load(f)
  student, warm = warmed_up(exp, world, kind, warmup, seed, grid)
  from jdistill.stages.opd import OPDTrainer

  config = opd_config(world, kind, loss, student, out, seed, grid)
  config.run_mode = "new"
  trainer = OPDTrainer(config)
  curve = []
  while True:
    curve.append({"step": trainer.step, **trainer.evaluate()})
    if trainer.step >= grid.opd_steps:
      break
    trainer.run(steps=min(grid.eval_every, grid.opd_steps - trainer.step))
  result = {
    "world": kind, "warmup": warmup, "seed": seed, "loss": loss,
    "warmup_steps": warm.get("step", 0), "switches": warm.get("switches", {}),
    "curve": curve,
  }  # fmt: skip
  write_json_atomic(cached, result)
  return result


def accuracy_of(point: dict) -> dict[str, float]:
  """Per-domain accuracy of an evaluation point (each teacher owns one domain)."""
  return {name: point[name]["accuracy"] for name in tasks.DOMAINS}


def overlap_of(point: dict, names=tasks.DOMAINS) -> float:
  """The mean calibrated overlap over the teachers `names` of an evaluation point."""
  return float(np.mean([point[name]["overlap"] for name in names]))


def table(results: list[dict]) -> str:
  """Markdown: one row per (world, warmup, loss); per-domain accuracy mean ± std over seeds,
  and the teachers' mean calibrated overlap before → after OPD."""
  head = ["world", "warmup", "loss", *tasks.DOMAINS, "mean", "overlap before → after"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  keys = sorted({(r["world"], r["warmup"], r["loss"]) for r in results}, key=_order)
  for key in keys:
    cells = [r for r in results if (r["world"], r["warmup"], r["loss"]) == key]
    finals = [accuracy_of(r["curve"][-1]) for r in cells]
    row = list(key)
    for d in tasks.DOMAINS:
      values = [f[d] for f in finals]
      row.append(f"{np.mean(values):.2f} ± {np.std(values):.2f}")
    means = [np.mean(list(f.values())) for f in finals]
    row.append(f"{np.mean(means):.2f} ± {np.std(means):.2f}")
    before = np.mean([overlap_of(r["curve"][0]) for r in cells])
    after = np.mean([overlap_of(r["curve"][-1]) for r in cells])
    row.append(f"{before:.2f} → {after:.2f}")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def _order(key):
  world, warmup, loss = key
  rank = lambda seq, x: seq.index(x) if x in seq else len(seq)  # noqa: E731
  return (rank(WORLDS, world), rank(WARMUPS, warmup), rank(LOSSES, loss))


def plot(results: list[dict], out_dir: str) -> str:
  """accuracy.png: mean accuracy over domains vs OPD step, a panel per (world, warmup), a
  line per loss (mean over seeds)."""
  from jdistill.runtime.plots import plt

  worlds = [w for w in WORLDS if any(r["world"] == w for r in results)]
  warmups = [w for w in WARMUPS if any(r["warmup"] == w for r in results)]
  fig, axes = plt.subplots(
    len(worlds), len(warmups), figsize=(4.5 * len(warmups), 3.5 * len(worlds)), squeeze=False
  )
  for (i, world), (j, warmup) in itertools.product(enumerate(worlds), enumerate(warmups)):
    ax = axes[i][j]
    for loss in LOSSES:
      runs = [r for r in results if (r["world"], r["warmup"], r["loss"]) == (world, warmup, loss)]
      if not runs:
        continue
      steps = [p["step"] for p in runs[0]["curve"]]
      acc = np.mean(
        [[np.mean(list(accuracy_of(p).values())) for p in r["curve"]] for r in runs], axis=0
      )
      ax.plot(steps, acc, marker="o", label=loss)
    ax.set_title(f"{world} teachers, warmup {warmup}")
    ax.set_xlabel("OPD step")
    ax.set_ylabel("held-out accuracy (mean of domains)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(out_dir, "accuracy.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def overlap_plot(results: list[dict], out_dir: str) -> str:
  """overlap.png: each teacher's calibrated overlap with the base's rollouts (step 0 of the
  no-warmup cells), lineage vs external, one bar per domain and world."""
  from jdistill.runtime.plots import plt

  fig, ax = plt.subplots(figsize=(6, 3.5))
  width = 0.38
  for k, world in enumerate(WORLDS):
    runs = [r for r in results if r["world"] == world]
    runs = [r for r in runs if r["warmup"] == "none"] or runs  # the base's own rollouts first
    if not runs:
      continue
    values = [np.mean([r["curve"][0][d]["overlap"] for r in runs]) for d in tasks.DOMAINS]
    xs = np.arange(len(tasks.DOMAINS)) + (k - 0.5) * width
    ax.bar(xs, values, width, label=f"{world} teachers")
  ax.set_xticks(np.arange(len(tasks.DOMAINS)), tasks.DOMAINS)
  ax.set_ylim(0, 1)
  ax.set_ylabel("overlap 1 − TV with the base's rollouts")
  ax.set_title("support overlap before OPD")
  ax.legend()
  fig.tight_layout()
  path = os.path.join(out_dir, "overlap.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def teacher_table(world: str) -> dict:
  with open(os.path.join(world, "world.json")) as f:
    return json.load(f)["accuracy"]


def run(out: str, grid: Grid = Grid(), world_root: str | None = None, spec=None) -> dict:
  """Builds (or reuses) the world, runs every cell not yet done, writes the outputs."""
  t0 = time.time()
  spec = spec or task_world.WorldSpec()
  world_root = world_root or task_world.usable_world(os.path.join(out, "world"), spec)
  world_summary = task_world.build(world_root, spec)
  cells = grid.cells()
  results = []
  for i, (kind, warmup, seed, loss) in enumerate(cells):
    elapsed = time.time() - t0
    eta = "" if not i else f", ETA {elapsed / i * (len(cells) - i) / 60:.0f} min"
    print(
      f"experiment cell {i + 1}/{len(cells)}: {kind} teachers, warmup {warmup}, "
      f"seed {seed}, {loss} ({elapsed / 60:.1f} min so far{eta})",
      flush=True,
    )
    results.append(run_cell(out, world_root, kind, warmup, seed, loss, grid))
  summary = {
    "grid": dataclasses.asdict(grid),
    "world": world_summary,
    "cells": results,
    "seconds": time.time() - t0,
  }
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(summary, f)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(table(results) + "\n")
  plot(results, out)
  overlap_plot(results, out)
  return summary


def report(out: str) -> dict:
  """table.md, the plots and results.json from every finished cell under `out` (a grid run
  in parts, or stopped early, reports what it has)."""
  results = []
  for dirpath, _, names in sorted(os.walk(out)):
    if "cell.json" in names:
      with open(os.path.join(dirpath, "cell.json")) as f:
        results.append(json.load(f))
  results.sort(key=lambda r: (*_order((r["world"], r["warmup"], r["loss"])), r["seed"]))
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"cells": results}, f)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(table(results) + "\n")
  plot(results, out)
  overlap_plot(results, out)
  return {"cells": results}


def main(argv):
  del argv
  from absl import flags
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  grid = Grid(
    losses=tuple(f.losses),
    worlds=tuple(f.worlds),
    warmups=tuple(f.warmups),
    seeds=f.seeds,
    opd_steps=f.opd_steps,
    eval_every=f.eval_every,
  )
  for field, values, allowed in (
    ("losses", grid.losses, LOSSES),
    ("worlds", grid.worlds, WORLDS),
    ("warmups", grid.warmups, WARMUPS),
  ):
    bad = [v for v in values if v not in allowed]
    if bad:
      raise SystemExit(f"--{field}: {bad} invalid; allowed: {list(allowed)}")
  if f.report_only:
    print(table(report(f.out)["cells"]))
    return
  result = run(f.out, grid, world_root=f.world or None)
  print(table(result["cells"]))
  print(f"experiment: {len(result['cells'])} cells in {result['seconds'] / 60:.1f} min; "
        f"outputs in {f.out} (table.md, results.json, accuracy.png, overlap.png)")  # fmt: skip


def cli():
  from absl import app, flags

  flags.DEFINE_string("out", "runs/experiment", "Output directory (finished cells are reused).")
  flags.DEFINE_string("world", "", "Task world directory (default: <out>/world, built once).")
  flags.DEFINE_list("losses", list(LOSSES), "Losses of the grid.")
  flags.DEFINE_list("worlds", list(WORLDS), "Teacher kinds of the grid.")
  flags.DEFINE_list("warmups", list(WARMUPS), "Warmups of the grid.")
  flags.DEFINE_integer("seeds", 3, "Seeds per cell.")
  flags.DEFINE_integer("opd_steps", Grid.opd_steps, "OPD steps per cell.")
  flags.DEFINE_integer("eval_every", Grid.eval_every, "Steps between accuracy evaluations.")
  flags.DEFINE_bool("report_only", False, "Only rewrite the table and plots from finished cells.")
  app.run(main)


if __name__ == "__main__":
  cli()

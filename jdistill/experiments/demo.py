"""`make demo`: DeepSeek V4's recipe against Nemotron 3 Ultra's, at high and at low overlap.

The task world (`jdistill.experiments.task_world`, committed under
jdistill/experiments/assets/task_world): a weak base model and teachers each strong at one
domain (two-digit addition, word reversal, letter counting). Two teacher sets, both forks of
the base: the lineage teachers (trained on the base's own style; overlap 0.83 with its
rollouts) and the dial's α = 1 teachers (trained on another style; overlap 0.39). At each,
the two reports' recipes at equal student-token budget, one seed:

  V4     OPD with full-vocab reverse KL from the base, no student RL
  Ultra  RLVR (GRPO) → warmup SFT on the teachers' verified answers → sampled-token OPD
         (PPO clip 0.2, IcePop 5)

This is a reduced cell set of the question's grid (`jdistill.experiments.question`; `make
experiment` runs all of it, with seeds, tuned learning rates and the verdict). It ends with
per-domain test accuracy per recipe and setting and the committed grid's answer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

from absl import app, flags
from absl import logging as absl_logging

from jdistill.experiments import dial, question, task_world, tasks
from jdistill.losses import registry

FLAGS = flags.FLAGS
MARKER = ".jdistill-demo"  # the demo only ever deletes a directory that carries this
LOSSES = registry.check_names(("reverse_kl", "sampled_token"), "demo LOSSES")
RECIPES = {  # name: (warmup, rl, loss)
  "V4": ("none", "none", "reverse_kl"),
  "Ultra": ("sft", "rlvr", "sampled_token"),
}
SETTINGS = ("lineage", "alpha_1")  # high and low overlap
# The learning rates `make experiment`'s sweep chose on the validation split (docs/results/)
LRS = {"none": {"reverse_kl": 2e-3}, "rlvr": {"sampled_token": 1e-4}}  # by RL arm, loss
RL_LR, WARMUP_LR = 1e-4, 3e-3
ANSWER = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "results", "answer.md")
log = logging.getLogger("jdistill")


def accuracy_table(cells: dict) -> str:
  """One row per (recipe, setting): per-domain accuracy before → after, tokens, seconds."""
  head = ["recipe", "teachers (overlap)", *tasks.DOMAINS, "mean", "student tokens (RL + OPD)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for (name, setting), c in cells.items():
    row = [name, f"{setting} ({c['overlap']:.2f})"]
    row += [f"{c['accuracy_before'][d]:.2f} → {c['accuracy'][d]:.2f}" for d in tasks.DOMAINS]
    row.append(f"{c['accuracy_before']['mean']:.2f} → {c['accuracy']['mean']:.2f}")
    row.append(f"{c['rl_student_tokens']:,} + {c['opd_student_tokens']:,}")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def headline() -> str:
  """The committed grid's answer (its first paragraph), if the docs are there."""
  if not os.path.exists(ANSWER):
    return "(run `make experiment` for the answer)"
  with open(ANSWER) as f:
    paragraphs = f.read().split("\n\n")
  return paragraphs[1].strip() if len(paragraphs) > 1 else paragraphs[0].strip()


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  out = os.path.abspath(FLAGS.out)
  if os.path.exists(out):
    if not os.path.exists(os.path.join(out, MARKER)):
      raise SystemExit(
        f"demo: {out} exists and was not written by the demo (no {MARKER} in it); "
        "nothing was deleted — pass another --out"
      )
    log.warning("demo: replacing the previous demo output in %s", out)
    shutil.rmtree(out)
  os.makedirs(out)
  open(os.path.join(out, MARKER), "w").close()
  t0 = time.time()
  world = task_world.usable_world(os.path.join(out, "world"))
  dial_dir = os.path.join(world, "dial")
  if not os.path.isdir(os.path.join(dial_dir, "alpha_1_add")):  # a rebuilt world: its dial too
    dial_dir = os.path.join(out, "dial")
    dial.build(world, dial_dir, (1.0,))
  grid = question.Grid(
    settings=SETTINGS, seeds=1, budget_steps=FLAGS.steps, rl_steps=FLAGS.steps // 12,
    warmup_steps=30, noise_batches=0,
  )  # fmt: skip
  overlaps = question.setting_overlaps(world, dial_dir, SETTINGS)
  print(
    f"demo: task world {world}; V4 (OPD, full-vocab reverse KL) and Ultra (RLVR "
    f"{grid.rl_steps} steps → warmup SFT → sampled-token OPD) at {grid.budget_steps} OPD "
    f"steps' worth of student tokens each, with lineage teachers (overlap "
    f"{overlaps['lineage']:.2f}) and the dial's α = 1 teachers ({overlaps['alpha_1']:.2f})"
  )
  cells = {}
  for setting in SETTINGS:
    for name, (warmup, rl, loss) in RECIPES.items():
      print(f"demo: {name} at {setting}", flush=True)
      cells[name, setting] = question.run_cell(
        out, world, dial_dir, (setting, warmup, rl, loss, 0), LRS, RL_LR, grid, overlaps,
        WARMUP_LR,
      )  # fmt: skip
  table = accuracy_table(cells)
  with open(os.path.join(out, "accuracy.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(out, "demo.json"), "w") as f:
    json.dump({"cells": {f"{n} {s}": c for (n, s), c in cells.items()}}, f)
  print("\nTest accuracy per domain (greedy, exact final answer), before → after:\n" + table)
  for setting in SETTINGS:
    gap = cells["V4", setting]["accuracy"]["mean"] - cells["Ultra", setting]["accuracy"]["mean"]
    print(f"V4 − Ultra at {setting} (overlap {overlaps[setting]:.2f}): {gap:+.2f} (one seed)")
  print(f"\nThe grid's answer (`make experiment`, 3 seeds, docs/results/answer.md):\n{headline()}")
  print(f"\ndemo: done in {time.time() - t0:.0f} s; outputs in {out}: accuracy.md, demo.json, "
        "and per cell metrics.jsonl and learning_curves.png under cells/")  # fmt: skip


def cli():
  flags.DEFINE_string(
    "out", "demo_out", "Output directory (replaced on each run, if the demo wrote it)."
  )
  flags.DEFINE_integer("steps", 60, "OPD steps' worth of student tokens per recipe.")
  app.run(main)


if __name__ == "__main__":
  cli()

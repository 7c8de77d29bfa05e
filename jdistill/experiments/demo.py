"""`make demo`: three specialist teachers merged into one student that then solves their tasks.

The task world (`jdistill.experiments.task_world`, committed under
jdistill/experiments/assets/task_world): a weak
base model and three lineage teachers forked from it, each strong at one domain (two-digit
addition, word reversal, letter counting). The demo is a reduced cell set of the
support-overlap experiment (`jdistill.experiments.experiment`; `make experiment` for the whole
grid):
lineage teachers, a warmup SFT on the teachers' verified answers, then on-policy
distillation with full-vocab reverse KL and with the sampled-token estimator, one seed. It
ends with per-domain greedy accuracy on held-out prompts (student before → after, next to
each teacher's) and says where the plots are.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

from absl import app, flags
from absl import logging as absl_logging

from jdistill.experiments import experiment, task_world, tasks
from jdistill.losses import registry

FLAGS = flags.FLAGS
MARKER = ".jdistill-demo"  # the demo only ever deletes a directory that carries this
LOSSES = registry.check_names(("reverse_kl", "sampled_token"), "demo LOSSES")
WARMUP = "sft"
log = logging.getLogger("jdistill")


def accuracy_table(report: dict, world: dict) -> str:
  """Per domain: the base, the student after warmup + OPD for each loss, the teacher."""
  teachers = world["accuracy"]
  head = ["domain", "base (student before)", *(f"after {loss}" for loss in LOSSES), "teacher"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  by_loss = {c["loss"]: c for c in report["cells"]}
  for d in tasks.DOMAINS:
    row = [d, f"{teachers['base'][d]:.2f}"]
    for loss in LOSSES:
      curve = by_loss[loss]["curve"]
      row.append(f"{curve[-1][d]['accuracy']:.2f}")
    row.append(f"{teachers[f'lineage_{d}'][d]:.2f}")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


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
  world_root = task_world.usable_world(os.path.join(out, "world"))
  grid = experiment.Grid(
    losses=LOSSES, worlds=("lineage",), warmups=(WARMUP,), seeds=1, opd_steps=FLAGS.steps
  )
  print(
    f"demo: task world {world_root}; lineage teachers; warmup SFT on their verified answers, "
    f"then {grid.opd_steps} OPD steps with each of {', '.join(LOSSES)}"
  )
  report = experiment.run(out, grid, world_root=world_root)
  world = report["world"]
  table = accuracy_table(report, world)
  with open(os.path.join(out, "accuracy.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(out, "demo.json"), "w") as f:
    json.dump({"report": report, "seconds": time.time() - t0}, f)
  print("\nHeld-out greedy accuracy per domain (exact match of the final answer):\n" + table)
  print(
    f"\ndemo: done in {time.time() - t0:.0f} s; outputs in {out}: accuracy.md, "
    "accuracy.png (accuracy vs OPD step), overlap.png, table.md, results.json, and per cell "
    "metrics.jsonl and learning_curves.png under lineage/"
  )


def cli():
  flags.DEFINE_string(
    "out", "demo_out", "Output directory (replaced on each run, if the demo wrote it)."
  )
  flags.DEFINE_integer("steps", experiment.Grid.opd_steps, "OPD steps per loss.")
  app.run(main)


if __name__ == "__main__":
  cli()

"""What recording sample rollouts costs an OPD logging step (`jdistill.report.samples`).

A logging step with `train.sample_rows` rows per teacher recorded (one student and one teacher
forward on those rows, decoded and appended to samples.jsonl) against the same logging step
without it, in one process on one trainer: the ratio of their medians. Also the one-off cost of
the first recording (its compiles, one per teacher).

Shape: the task world's committed assets and recipe (`jdistill.experiments.task_world`): its
student and external-data teachers, sampled-token loss.

  python bench/report_samples.py [--steps 8] [--rows 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from jdistill.experiments import task_world
from jdistill.stages import opd


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=8, help="timed steps of each kind")
  parser.add_argument("--rows", type=int, default=2, help="train.sample_rows")
  args = parser.parse_args()
  c = task_world.recipe_config("external", "sampled_token")
  c.output_dir = tempfile.mkdtemp(prefix="jdistill-bench-samples-")
  c.train.steps = 2 * args.steps + 4
  c.train.eval_every = 0
  c.train.sample_rows = args.rows
  c.checkpoint.dir = ""
  trainer = opd.OPDTrainer(c)
  recorder = trainer.samples
  trainer.samples = None
  for _ in range(2):  # compile the step and the sampler
    jax.block_until_ready(trainer.train_one(diagnostics=True))
  trainer.samples = recorder
  t0 = time.perf_counter()
  jax.block_until_ready(trainer.train_one(diagnostics=True))
  first = time.perf_counter() - t0
  times = {"without": [], "with": []}
  for i in range(2 * args.steps):  # alternate, so drift in the machine's load hits both alike
    kind = "with" if i % 2 else "without"
    trainer.samples = recorder if kind == "with" else None
    t0 = time.perf_counter()
    jax.block_until_ready(trainer.train_one(diagnostics=True))
    times[kind].append(time.perf_counter() - t0)
  without, with_ = (float(np.median(times[k])) for k in ("without", "with"))
  rows = sum(1 for _ in open(os.path.join(c.output_dir, "samples.jsonl")))
  print(f"task world, {len(trainer.names)} teachers x {c.data.slots_per_teacher} rows, "
        f"{c.sampling.max_new_tokens} new tokens; {args.rows} rows per teacher recorded "
        f"({rows} rollouts written)")  # fmt: skip
  print(f"logging step without samples: {without * 1e3:.1f} ms (median of {args.steps})")
  print(f"logging step with samples:    {with_ * 1e3:.1f} ms (median of {args.steps})")
  print(f"ratio: {with_ / without:.2f}x; first recording (compiles): {first:.2f} s")


if __name__ == "__main__":
  main()

"""The replay share against a switched domain's erosion in the overlap-triggered warmup.

The loss grid's defect: with `sft.until_overlap`, a teacher whose overlap is already over the
threshold switches to OPD at step 0, and the warmup then trains on the other domains only;
at seed 1 add and count fell from 0.39 / 0.42 to 0.00 before OPD. `sft.replay_share` replays
that share of every later step's rows from the switched teachers' examples. This runs the
lineage warmup at seed(s) `--seeds` for replay shares and learning rates, and scores each
warmed-up student's held-out accuracy (greedy, the world's eval prompts).

    python bench/replay_share.py [--seeds 1] [--out runs/replay]

Writes `replay_share.json` (one row per run) under --out and prints the rows.
"""

from __future__ import annotations

import argparse
import json
import os

from jdistill.experiments import experiment as loss_grid
from jdistill.experiments import question
from jdistill.experiments import task_world as tw
from jdistill.runtime.io import write_json_atomic

RUNS = ((0.0, 3e-3), (0.25, 3e-3), (0.5, 3e-3), (0.0, 3e-4), (0.25, 3e-4))  # (share, lr)


def main() -> None:
  from jdistill.stages import generate, run_stage

  ap = argparse.ArgumentParser()
  ap.add_argument("--seeds", default="1")
  ap.add_argument("--out", default="runs/replay")
  args = ap.parse_args()
  world, grid = tw.COMMITTED, loss_grid.Grid()
  gen = loss_grid.generate_config(world, "lineage", f"{args.out}/lineage/teacher_data", grid)
  loss_grid._once(gen, gen.generate.out_dir, run_stage)
  files = ",".join(generate.output_files(gen))
  teachers = question.teacher_dirs(world, "", "lineage")
  test = os.path.join(world, "eval.jsonl")
  rows = []
  for seed in (int(s) for s in args.seeds.split(",")):
    for share, lr in RUNS:
      tag = f"replay{share:g}" + ("" if lr == 3e-3 else f"_lr{lr:g}")
      out = os.path.join(args.out, tag, f"seed{seed}")
      config = loss_grid.warmup_config(world, "lineage", "overlap", files, out, seed, grid)
      config.sft.replay_share = share
      config.optimizer.lr = lr
      summary = loss_grid._once(config, out, run_stage)
      score = os.path.join(out, "score")
      r = question._cached(score, lambda config=config, score=score, seed=seed: question.run_opd(
        world, teachers, "reverse_kl", config.export_dir, score, seed, lr, 0, question.Grid(),
        test))  # fmt: skip
      rows.append({
        "seed": seed, "replay_share": share, "lr": lr, "warmup_steps": summary.get("step"),
        "switches": summary.get("switches"), "accuracy": r["accuracy"],
      })  # fmt: skip
      print(json.dumps(rows[-1]), flush=True)
  write_json_atomic(os.path.join(args.out, "replay_share.json"), rows, indent=1)


if __name__ == "__main__":
  main()

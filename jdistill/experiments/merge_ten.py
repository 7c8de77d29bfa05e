"""Merge ten: ten lineage teachers, one per domain, distilled into one student at once.

  make merge-ten
  python -m jdistill merge_ten --out=runs/merge_ten [--seeds=4] [--slots_per_teacher=16]

Builds (cached, resumable: `jdistill.experiments.task_world.build`) a world of the ten
domains of `jdistill.experiments.tasks.ALL_DOMAINS`: a base pretrained briefly on their plain
mixture (weak at each) and ten lineage teachers, forks of the base fine-tuned on one domain
each. From that base, on all ten teachers at once and at equal student-token budget (the
question grid's `budget_steps` OPD steps' worth, `jdistill.experiments.budget`), it runs

  V4     multi-teacher OPD with full-vocab reverse KL; no RL, no warmup
  Ultra  RLVR (GRPO over every domain, pure reward, PPO clip 0.2; `rl_steps` steps of group
         `rl_group`) → warmup SFT on the teachers' verified completions → MOPD with the
         sampled-token advantage (PPO clip 0.2, IcePop 5) for the steps the budget leaves

per seed, with the cells of `jdistill.experiments.question` (`rlvr_student`,
`warmup_student`, `run_opd`). The learning rates are the ones the 3-domain question's sweep
chose (`LRS`, from docs/results/results.json), borrowed, not re-tuned on this world. Output
under `--out`: merge_ten.json (every number) and merge_ten.md (per-domain held-out accuracy
before → after per recipe and seed, each teacher's own-domain accuracy, tokens, wall time,
overlap before → after OPD).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from jdistill.experiments import question, tasks
from jdistill.experiments import task_world as tw
from jdistill.runtime.io import write_json_atomic

# The learning rates the 3-domain question sweep chose on its validation split
# (docs/results/sweep.md; tests/experiments/test_merge_ten.py checks they still are).
LRS = {
  "v4_opd": 2e-3,  # reverse_kl, no RL
  "rlvr": 1e-5,  # GRPO
  "warmup_sft": 3e-3,
  "ultra_mopd": 5e-5,  # sampled_token after RLVR
}
LRS_NOTE = (
  "learning rates borrowed from the 3-domain question sweep (docs/results/sweep.md), "
  "not re-tuned on the 10-domain world"
)
RECIPES = ("V4", "Ultra")


@dataclasses.dataclass(frozen=True)
class _Grid(question.Grid):
  """The question grid with the warmup data's filter as a setting (a test's untrained teachers
  verify nothing: it keeps "all")."""

  warmup_data: str = "verified"

  def loss_grid(self):
    return dataclasses.replace(super().loss_grid(), warmup_data=self.warmup_data)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the merge runs on the world: its domains, seeds and the equal budget."""

  domains: tuple[str, ...] = tasks.ALL_DOMAINS
  seeds: int = 4  # docs/results/merge_ten.md's run
  budget_steps: int = 150  # student tokens of this many OPD steps per recipe
  rl_steps: int = 15  # Ultra's GRPO steps (group rl_group: rl_group OPD steps' tokens each)
  rl_group: int = 4
  warmup_steps: int = 60
  slots_per_teacher: int = 16
  max_new_tokens: int = 48
  min_teacher_accuracy: float = 0.9
  warmup_data: str = "verified"  # the teachers' completions the warmup learns: verified | all

  def grid(self) -> question.Grid:
    """The question grid's settings this merge shares (prompts, sampling, stages)."""
    return _Grid(
      warmup_data=self.warmup_data, budget_steps=self.budget_steps, rl_steps=self.rl_steps,
      rl_group=self.rl_group, warmup_steps=self.warmup_steps,
      slots_per_teacher=self.slots_per_teacher, max_new_tokens=self.max_new_tokens,
      noise_batches=0,
    )  # fmt: skip


def build_world(root: str, spec: tw.WorldSpec, plan: Plan, log=print) -> dict:
  """The plan's world under `root` (base and lineage teachers; cached) → world.json's content."""
  return tw.build(root, spec, log, world_domains=plan.domains, kinds=("lineage",))


def teacher_accuracy(world: dict, domains) -> dict[str, float]:
  """Each lineage teacher's greedy held-out accuracy on its own domain."""
  return {d: world["accuracy"][f"lineage_{d}"][d] for d in domains}


def _generated_tokens(exp: str) -> int:
  """Characters of the teachers' warmup completions: their tokens (one per character) that
  the teachers sampled for the warmup SFT, beyond what they score in OPD."""
  total = 0
  for dirpath, _, files in os.walk(os.path.join(exp, "lineage", "teacher_data")):
    for name in files:
      if name.endswith(".jsonl"):
        with open(os.path.join(dirpath, name)) as f:
          total += sum(len(json.loads(line).get("completion", "")) for line in f if line.strip())
  return total


def run_v4(exp, world, teachers, seed, plan: Plan) -> dict:
  """V4 (cached per seed): reverse-KL OPD from the base for the whole budget."""
  out = os.path.join(exp, "v4", f"lr{LRS['v4_opd']:g}", f"seed{seed}")  # a new lr: a new run
  grid = plan.grid()
  test = os.path.join(world, "eval.jsonl")

  def compute():
    r = question.run_opd(
      world, teachers, "reverse_kl", os.path.join(world, "base"), out, seed, LRS["v4_opd"],
      plan.budget_steps, grid, test,
    )  # fmt: skip
    r.update(rl_student_tokens=0, student_tokens=r["opd_student_tokens"])
    return dict(r, opd_steps=plan.budget_steps)

  return question._cached(out, compute)


def run_ultra(exp, world, teachers, seed, plan: Plan) -> dict:
  """Ultra (cached per seed): RLVR → warmup SFT → sampled-token MOPD, at the same budget."""
  lrs = f"rl{LRS['rlvr']:g}_warmup{LRS['warmup_sft']:g}_opd{LRS['ultra_mopd']:g}"
  out = os.path.join(exp, "ultra", lrs, f"seed{seed}")  # new lrs: a new run
  grid = plan.grid()
  test = os.path.join(world, "eval.jsonl")

  def compute():
    t0 = time.time()
    rl_lr = LRS["rlvr"]
    student, _ = question.rlvr_student(exp, world, teachers, seed, rl_lr, grid, test)
    rl_seconds = time.time() - t0
    rl_tokens, steps = question.opd_steps(grid, "rlvr", world, teachers)
    student = question.warmup_student(
      exp, world, "lineage", teachers, student, f"rl_lr{rl_lr:g}", seed, LRS["warmup_sft"], grid
    )
    r = question.run_opd(
      world, teachers, "sampled_token", student, os.path.join(out, "opd"), seed,
      LRS["ultra_mopd"], steps, grid, test,
    )  # fmt: skip
    r["start_accuracy"] = r.pop("accuracy_before")  # after RLVR and warmup: where MOPD starts
    r.update(
      rl_student_tokens=rl_tokens, student_tokens=rl_tokens + r["opd_student_tokens"],
      opd_steps=steps, rl_wall_s=rl_seconds,
      warmup_teacher_tokens=_generated_tokens(exp),
    )  # fmt: skip
    return r

  return question._cached(out, compute)


def run(out: str, spec: tw.WorldSpec | None = None, plan: Plan = Plan(), log=print) -> dict:
  """The world (`spec`, default `WorldSpec()`), then both recipes per seed (each cached);
  writes merge_ten.{json,md} under `out` → the summary."""
  t0 = time.time()
  spec = spec or tw.WorldSpec()
  os.makedirs(out, exist_ok=True)
  world = os.path.join(out, "world")
  built = build_world(world, spec, plan, log)
  teachers_acc = teacher_accuracy(built, plan.domains)
  weak = {d: a for d, a in teachers_acc.items() if a < plan.min_teacher_accuracy}
  if weak:
    log(f"merge_ten: teachers below {plan.min_teacher_accuracy} on their domain: {weak}")
  teachers = {d: os.path.join(world, f"lineage_{d}") for d in plan.domains}
  runs = []
  for seed in range(plan.seeds):
    for recipe, fn in (("V4", run_v4), ("Ultra", run_ultra)):
      log(f"merge_ten: {recipe} seed {seed} ({(time.time() - t0) / 60:.1f} min so far)")
      runs.append({"recipe": recipe, "seed": seed, **fn(out, world, teachers, seed, plan)})
  # Greedy accuracy of the base: what V4's OPD starts from (the same for every seed).
  base = next(r["accuracy_before"] for r in runs if r["recipe"] == "V4")
  summary = {
    "domains": list(plan.domains),
    "spec": dataclasses.asdict(spec),
    "plan": dataclasses.asdict(plan),
    "lrs": dict(LRS, note=LRS_NOTE),
    "teacher_accuracy": teachers_acc,
    "teachers_below_threshold": weak,
    "world_accuracy": built["accuracy"],
    "world_build_seconds": built["build_seconds"],
    "base_accuracy": base,
    "runs": runs,
    "seconds": time.time() - t0,
  }
  write_json_atomic(os.path.join(out, "merge_ten.json"), summary, indent=1)
  with open(os.path.join(out, "merge_ten.md"), "w") as f:
    f.write(report(summary) + "\n")
  return summary


def _mean(runs, key, domain) -> float:
  return float(np.mean([r[key][domain] for r in runs]))


def report(summary: dict) -> str:
  """Markdown: per domain the teacher, the base (before) and each recipe after (mean over
  seeds, then each seed); then tokens, wall time and overlap per recipe and seed."""
  domains = summary["domains"]
  by = {name: [r for r in summary["runs"] if r["recipe"] == name] for name in RECIPES}
  seeds = sorted({r["seed"] for r in summary["runs"]})
  head = ["domain", "teacher", "base (before)"]
  head += [f"{name} after: mean (seeds {', '.join(map(str, seeds))})" for name in RECIPES]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for d in [*domains, "mean"]:
    teacher = summary["teacher_accuracy"].get(d)
    if d == "mean":
      teacher = float(np.mean(list(summary["teacher_accuracy"].values())))
    row = [d, f"{teacher:.2f}", f"{summary['base_accuracy'][d]:.2f}"]
    for name in RECIPES:
      per_seed = ", ".join(f"{r['accuracy'][d]:.2f}" for r in by[name])
      row.append(f"{_mean(by[name], 'accuracy', d):.2f} ({per_seed})")
    lines.append("| " + " | ".join(row) + " |")
  lines += ["", "| recipe | seed | student tokens (RL + OPD) | teacher tokens (OPD + warmup data) "
            "| OPD steps | mean accuracy: base → OPD start → after | overlap before → after OPD "
            "| wall s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
  for r in summary["runs"]:
    start = r.get("start_accuracy", summary["base_accuracy"])["mean"]
    lines.append(
      f"| {r['recipe']} | {r['seed']} | {r['student_tokens']:,} ({r['rl_student_tokens']:,} + "
      f"{r['opd_student_tokens']:,}) | {r['teacher_tokens']:,} + "
      f"{r.get('warmup_teacher_tokens', 0):,} | {r['opd_steps']} | "
      f"{summary['base_accuracy']['mean']:.3f} → {start:.3f} → {r['accuracy']['mean']:.3f} | "
      f"{r['overlap_before']:.2f} → {r['overlap_after']:.2f} | {r['wall_s']:.0f} |"
    )
  lines += ["", f"World (base + {len(domains)} lineage teachers) built in "
            f"{summary['world_build_seconds']:.0f} s; the whole run {summary['seconds']:.0f} s "
            "(cached work counts 0). " + summary["lrs"]["note"].capitalize() + "."]  # fmt: skip
  if summary["teachers_below_threshold"]:
    lines.append(f"Teachers below the threshold: {summary['teachers_below_threshold']}.")
  return "\n".join(lines)


def main(argv):
  del argv
  from absl import flags
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  spec = dataclasses.replace(tw.WorldSpec(), teacher_steps=f.teacher_steps)
  plan = dataclasses.replace(
    Plan(), domains=tuple(f.domains), seeds=f.seeds, slots_per_teacher=f.slots_per_teacher,
    budget_steps=f.budget_steps, rl_steps=f.rl_steps,
  )  # fmt: skip
  summary = run(f.out, spec, plan)
  print(report(summary))
  print(f"merge_ten: outputs in {f.out}")


def cli():
  from absl import app, flags

  flags.DEFINE_string("out", "runs/merge_ten", "Output directory (finished work is reused).")
  flags.DEFINE_list("domains", list(Plan.domains), "The world's domains, one teacher each.")
  flags.DEFINE_integer("seeds", Plan.seeds, "Seeds per recipe.")
  flags.DEFINE_integer("slots_per_teacher", Plan.slots_per_teacher, "Prompts per teacher/step.")
  flags.DEFINE_integer("budget_steps", Plan.budget_steps, "OPD steps' worth of student tokens.")
  flags.DEFINE_integer("rl_steps", Plan.rl_steps, "Ultra's GRPO steps.")
  flags.DEFINE_integer("teacher_steps", tw.WorldSpec.teacher_steps, "SFT steps per teacher.")
  app.run(main)


if __name__ == "__main__":
  cli()

"""A teacher of another tokenizer in the task world (issue 24's experiment).

  python -m jdistill foreign --out=runs/foreign      # builds what is missing, then the table

The world's student is character-level. The *foreign* teacher of a domain learned `Grid.style`
(`tasks.solution`) from a random init with its own byte-level BPE of `Grid.vocab` tokens, learned
on that text (the bytes plus merges such as " answer"), so it speaks another vocabulary, as
Ultra's teachers do. The arms, from the base, each `Grid.steps` steps of `Grid.rows` sequences:

  opd_sampled_token   OPD from it directly, no warmup: the span sampled-token loss (PPO clip 0.2,
                      IcePop 5, as Ultra runs it)
  opd_reverse_kl      the same with the dense loss across tokenizers (reverse KL on the matched
                      vocabulary where a span is one equal token per side)
  opd_reverse_kl_prefix  ... with the teacher read by prefix (`dense_match = "prefix"`: its
                      mass on the tokens that begin with each student token)
  opd_reverse_kl_marginal  ... read at every position (`dense_match = "marginal"`: what it
                      spells next from the partial token it is inside)
  sft                 SFT on its generated completions of the training prompts (greedy, verified
                      ones only): its skill reached through data, as Ultra's warmup does
  opd_char_twin       OPD (reverse KL) from its twin: the same data, init seed and steps in the
                      student's own tokenizer, so the difference to opd_reverse_kl is the tokenizer
  opd_world_teacher   OPD (reverse KL) from the world's teacher of the domain and style (a fork
                      of the base for "plain", an external teacher for "external")

Each arm's lr is chosen on validation prompts (seed 0, `Grid.lrs_of`), then `Grid.seeds` seeds run
on the world's held-out prompts; code computes each arm's interval and the verdicts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from jdistill.experiments import question, tasks, verdict
from jdistill.experiments import task_world as tw
from jdistill.runtime.io import write_json_atomic

# the arms that distil from the foreign teacher directly, and the dense_match each reads it by
ACROSS = {
  "opd_sampled_token": "token", "opd_reverse_kl": "token", "opd_reverse_kl_prefix": "prefix",
  "opd_reverse_kl_marginal": "marginal",
}  # fmt: skip
ARMS = (*ACROSS, "sft", "opd_char_twin", "opd_world_teacher")
WORLD = tw.WorldSpec()  # the committed world's sizes: the foreign teacher is built like its own


@dataclasses.dataclass(frozen=True)
class Grid:
  domain: str = "reverse"
  # what the teachers learn (tasks.STYLES): "plain", the student's own style, leaves the
  # tokenizer the one difference between the foreign teacher and the world's; "external" adds
  # another style (Ultra's teachers), where the pilot at 100 steps taught no arm anything
  style: str = "plain"
  vocab: int = 400  # the foreign BPE's size (the student's is 261: bytes and specials)
  teacher_steps: int = tw.WorldSpec.teacher_steps
  steps: int = 200  # student steps of every arm
  rows: int = 16  # sequences a step: OPD rollouts, SFT examples
  # each arm's sweep, around where the three-domain grid found each kind's best (question.Grid:
  # the sampled estimators diverge at 2e-3, reverse KL's best 2e-3, the warmup SFT's 3e-3),
  # reaching one step past the edge where the first sweep chose (5e-4 for reverse KL, 1e-2 SFT)
  sampled_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
  dense_lrs: tuple[float, ...] = (5e-4, 1e-3, 2e-3, 4e-3)
  sft_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)
  seeds: int = 5
  validation: int = 64  # validation prompts of the domain

  def lrs_of(self, arm: str) -> tuple[float, ...]:
    if arm == "sft":
      return self.sft_lrs
    return self.sampled_lrs if arm == "opd_sampled_token" else self.dense_lrs


def build_teacher(
  out: str, world: str, grid: Grid, kind: str = "foreign", spec=WORLD, log=print
) -> dict:
  """A teacher of `grid.domain` trained from a random init on `grid.style` data (built once
  under `out/<kind>`) → {"path", "tokenizer", "vocab", "accuracy", "train_seconds"}. `kind`
  "foreign": its own byte-level BPE of `grid.vocab` tokens learned on that data; "char": the
  world's (the student's) tokenizer, all else the same: the foreign teacher's twin."""
  from jdistill.data.tokenizer import load_tokenizer, train_tiny_tokenizer
  from jdistill.eval.accuracy import model_accuracy
  from jdistill.stages.sft import SFTTrainer
  from jdistill.testing.toy import random_model_dir

  root = os.path.join(out, kind)
  path = os.path.join(root, "model")
  done = os.path.join(root, "teacher.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  os.makedirs(root, exist_ok=True)
  held_out = {r["prompt"] for r in tw.eval_records(world)}
  data = tasks.write_examples(
    os.path.join(root, f"{grid.style}.jsonl"), [grid.domain], spec.examples_per_domain,
    spec.seed + 10, grid.style, exclude=held_out,
  )  # fmt: skip
  if kind == "foreign":
    with open(data) as f:
      texts = [r["prompt"] + " " + r["completion"] for r in map(json.loads, f)]
    tok_dir = os.path.join(root, "tokenizer")
    tokenizer = train_tiny_tokenizer(tok_dir, texts, vocab_size=grid.vocab)
  elif kind == "char":
    tok_dir = os.path.join(world, "tokenizer")
    tokenizer = load_tokenizer(tok_dir)
  else:
    raise ValueError(f"kind={kind!r}; allowed: ['foreign', 'char']")
  init = random_model_dir(
    os.path.join(root, "init"), spec.model_config(len(tokenizer)), spec.seed + 300, tokenizer
  )
  t0 = time.time()
  config = tw.sft_config(root, "model", init, data, grid.teacher_steps, spec)
  config.tokenizer = tok_dir
  trainer = SFTTrainer(config)
  trainer.run()
  trainer.export(path)
  accuracy = model_accuracy(
    path, tw.eval_records(world), max_new_tokens=spec.max_new_tokens, verifier=tw.VERIFIER,
    tokenizer=tokenizer,
  )  # fmt: skip
  info = {
    "path": path,
    "tokenizer": tok_dir,
    "vocab": len(tokenizer),
    "accuracy": {d: v["accuracy"] for d, v in accuracy.items()},
    "train_seconds": time.time() - t0,
  }
  write_json_atomic(done, info, indent=1)
  log(f"foreign: {kind} teacher of {grid.domain} ({len(tokenizer)} tokens) {info['accuracy']}")
  return info


def _configure(train_file: str, teacher: dict | None, dense_match: str = "token"):
  """Edits an OPD config of the experiment: prompts of the one domain; with `teacher`, its
  one teacher takes the foreign teacher's tokenizer and `dense_match`."""

  def configure(config):
    config.data.train_files = train_file
    if teacher is not None:
      (name,) = list(config.teachers.keys())
      config.teachers[name].tokenizer = teacher["tokenizer"]
      config.teachers[name].dense_match = dense_match

  return configure


def sft_student(out: str, world: str, teacher: dict, grid: Grid, seed: int, lr: float) -> str:
  """The base after SFT on the foreign teacher's verified greedy completions (generated
  once, by the teacher in its own tokenizer; learned as text) → the export dir."""
  from jdistill.experiments import experiment as loss_grid
  from jdistill.stages import generate, run_stage

  lg = question.Grid().loss_grid()
  gen = loss_grid.generate_config(world, "external", os.path.join(out, "teacher_data"), lg)
  gen.teachers = {}
  gen.generate.model = teacher["path"]
  gen.generate.model_name = "foreign"
  gen.tokenizer = teacher["tokenizer"]
  gen.data.train_files = _domain_file(world, "train.jsonl", grid.domain, out)
  loss_grid._once(gen, gen.generate.out_dir, run_stage)
  sft_out = os.path.join(out, "sft", f"lr{lr:g}", f"seed{seed}")
  lg = dataclasses.replace(lg, warmup_steps=grid.steps)
  config = loss_grid.warmup_config(
    world, "external", "sft", ",".join(generate.output_files(gen)), sft_out, seed, lg
  )
  config.teachers = {}
  config.sft.rows_per_step = grid.rows
  config.optimizer.lr = lr
  loss_grid._once(config, sft_out, run_stage)
  return config.export_dir


def _domain_file(world: str, name: str, domain: str, out: str) -> str:
  """`world/name` cut to `domain`'s records (written once under `out`)."""
  path = os.path.join(out, f"{domain}_{name}")
  if not os.path.exists(path):
    with open(os.path.join(world, name)) as f:
      rows = [line for line in f if json.loads(line)["domain"] == domain]
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      f.writelines(rows)
    os.replace(tmp, path)
  return path


def run_arm(out, world, teachers, grid: Grid, arm: str, seed: int, lr: float, eval_files) -> dict:
  """One arm at one seed and lr (cached in its `cell.json`) → {accuracy before/after, tokens};
  `teachers` the built ones, {"foreign": ..., "char": ...} (`build_teacher`)."""
  cell = os.path.join(out, "cells", os.path.basename(eval_files), arm, f"lr{lr:g}", f"seed{seed}")
  cached = os.path.join(cell, "cell.json")
  if os.path.exists(cached):
    with open(cached) as f:
      return json.load(f)
  t0 = time.time()
  qg = dataclasses.replace(question.Grid(), slots_per_teacher=grid.rows)
  d, foreign = grid.domain, teachers["foreign"]
  base = os.path.join(world, "base")
  world_teacher = os.path.join(
    world, f"{'external' if grid.style == 'external' else 'lineage'}_{d}"
  )
  train = _domain_file(world, "train.jsonl", d, out)
  if arm == "sft":
    student = sft_student(out, world, foreign, grid, seed, lr)
    scorer = {d: world_teacher}  # scores only: 0 steps
    configure = _configure(train, None)
    r = question.run_opd(world, scorer, "reverse_kl", student, os.path.join(cell, "score"), seed,
                         lr, 0, qg, eval_files, configure=configure)  # fmt: skip
    before = question.run_opd(world, scorer, "reverse_kl", base, os.path.join(cell, "base"),
                              seed, lr, 0, qg, eval_files, configure=configure)  # fmt: skip
    r["accuracy_before"] = before["accuracy"]
  else:
    path = {"opd_char_twin": teachers["char"]["path"], "opd_world_teacher": world_teacher}
    loss = "sampled_token" if arm == "opd_sampled_token" else "reverse_kl"
    configure = _configure(train, foreign if arm in ACROSS else None, ACROSS.get(arm, "token"))
    r = question.run_opd(world, {d: path.get(arm, foreign["path"])}, loss, base, cell, seed, lr,
                         grid.steps, qg, eval_files, configure=configure)  # fmt: skip
  result = {
    "arm": arm, "seed": seed, "lr": lr, "eval_files": os.path.basename(eval_files),
    "accuracy_before": r["accuracy_before"][d], "accuracy": r["accuracy"][d],
    "opd_student_tokens": r["opd_student_tokens"], "sequences": grid.steps * grid.rows,
    "wall_s": time.time() - t0,
  }  # fmt: skip
  write_json_atomic(cached, result)
  return result


def run(out: str, grid: Grid = Grid(), world: str = tw.COMMITTED, log=print) -> dict:
  """The lr sweep on validation prompts, then every arm at its chosen lr over the seeds."""
  t0 = time.time()
  os.makedirs(out, exist_ok=True)
  _check_grid(out, grid)
  teachers = {k: build_teacher(out, world, grid, k, log=log) for k in ("foreign", "char")}
  validation = os.path.join(out, "validation_all.jsonl")
  if not os.path.exists(validation):
    question.write_validation(world, validation, grid.validation)
  validation = _domain_file(out, "validation_all.jsonl", grid.domain, out)
  test = _domain_file(world, "eval.jsonl", grid.domain, out)
  sweep = [
    run_arm(out, world, teachers, grid, a, 0, lr, validation) for a in ARMS for lr in grid.lrs_of(a)
  ]
  for r in sweep:
    log(f"foreign: validation {r['arm']} lr {r['lr']:g}: {r['accuracy']:.3f}")
  chosen = {
    a: max((r for r in sweep if r["arm"] == a), key=lambda r: (r["accuracy"], -r["lr"]))["lr"]
    for a in ARMS
  }
  cells = [
    run_arm(out, world, teachers, grid, a, s, chosen[a], test)
    for a in ARMS
    for s in range(grid.seeds)
  ]
  summary = {
    "grid": dataclasses.asdict(grid), "teachers": teachers, "chosen_lr": chosen, "sweep": sweep,
    "cells": cells, "seconds": time.time() - t0,
  }  # fmt: skip
  summary["verdicts"] = verdicts(cells)
  write_json_atomic(os.path.join(out, "foreign.json"), summary, indent=1)
  with open(os.path.join(out, "foreign.md"), "w") as f:
    f.write(report(summary) + "\n")
  return summary


def _check_grid(out: str, grid: Grid) -> None:
  """`out` caches one grid's work (its teachers, data and cells by arm, lr and seed): a grid
  whose teachers or cells would differ is refused, naming what differs, not silently reused."""
  path = os.path.join(out, "grid.json")
  fixed = ("domain", "style", "vocab", "teacher_steps", "steps", "rows")
  mine = {k: getattr(grid, k) for k in fixed}
  if os.path.exists(path):
    with open(path) as f:
      theirs = json.load(f)
    if differ := {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}:
      raise ValueError(f"{out} holds another grid's work: {differ} (was, now); use another --out")
  else:
    write_json_atomic(path, mine)


def verdicts(cells: list[dict]) -> list[dict]:
  """Each arm against the base, and direct OPD against SFT on the teacher's data (paired by
  seed): differences of held-out accuracy with 95% intervals, decided by `verdict.decide`."""
  by = {a: [c for c in sorted(cells, key=lambda c: c["seed"]) if c["arm"] == a] for a in ARMS}
  out = []
  for a in ARMS:
    after = [c["accuracy"] for c in by[a]]
    before = [c["accuracy_before"] for c in by[a]]
    iv = verdict.difference_interval(after, before, paired=True)
    out.append(dict(claim=f"{a} raises accuracy over the base", **_iv(iv, "greater")))
  for a in ACROSS:
    iv = verdict.difference_interval(
      [c["accuracy"] for c in by[a]], [c["accuracy"] for c in by["sft"]], paired=True
    )
    out.append(dict(claim=f"{a} beats sft on the teacher's data", **_iv(iv, "greater")))
  for a in (a for a in ACROSS if a != "opd_sampled_token"):  # the dense readings
    iv = verdict.difference_interval(
      [c["accuracy"] for c in by[a]], [c["accuracy"] for c in by["opd_char_twin"]], paired=True
    )
    claim = f"the other tokenizer costs {a} at most {MARGIN} against its char twin"
    out.append(dict(claim=claim, **_iv(iv, "not_less", MARGIN)))
  return out


MARGIN = 0.05  # accuracy a "costs at most" claim allows


def _iv(iv, direction: str, margin: float = 0.0) -> dict:
  decided = verdict.decide(iv, direction, margin)
  return dict(mean=iv.mean, lo=iv.lo, hi=iv.hi, n=iv.n, verdict=decided)


def report(summary: dict) -> str:
  """Markdown: the teacher, the sweep, each arm's held-out accuracy over seeds, the verdicts."""
  g, ts = summary["grid"], summary["teachers"]
  scores = {k: f"{t['accuracy'][g['domain']]:.2f}" for k, t in ts.items()}
  lines = [
    f"Domain `{g['domain']}`, style `{g['style']}`: the foreign teacher ({ts['foreign']['vocab']}"
    f"-token BPE) scores {scores['foreign']} on the held-out prompts, its char twin "
    f"({ts['char']['vocab']} tokens, the student's) {scores['char']}; both trained "
    f"{g['teacher_steps']} steps from a random init. Every arm: {g['steps']} steps of "
    f"{g['rows']} sequences.",
    "",
    "| arm | lr chosen (validation accuracy at each lr tried) | base | after (mean [95% CI]) "
    "| seeds |",
    "|---|---|---|---|---|",
  ]
  for a in ARMS:
    cs = [c for c in summary["cells"] if c["arm"] == a]
    sweep = ", ".join(
      f"{r['lr']:g}: {r['accuracy']:.2f}" for r in summary["sweep"] if r["arm"] == a
    )
    iv = verdict.mean_interval([c["accuracy"] for c in cs])
    lines.append(
      f"| {a} | {summary['chosen_lr'][a]:g} ({sweep}) | "
      f"{np.mean([c['accuracy_before'] for c in cs]):.2f} | {iv.mean:.2f} [{iv.lo:.2f}, "
      f"{iv.hi:.2f}] | {', '.join(format(c['accuracy'], '.2f') for c in cs)} |"
    )
  lines += ["", "| claim | difference [95% CI] | verdict |", "|---|---|---|"]
  for v in summary["verdicts"]:
    lines.append(f"| {v['claim']} | {v['mean']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}] | "
                 f"{v['verdict']} |")  # fmt: skip
  lines += ["", f"The whole run {summary['seconds']:.0f} s (cached work counts 0)."]
  return "\n".join(lines)


def main(argv):
  del argv
  from absl import flags
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  grid = dataclasses.replace(Grid(), domain=f.domain, style=f.style, seeds=f.seeds, steps=f.steps)
  print(report(run(f.out, grid)))


def cli():
  from absl import app, flags

  flags.DEFINE_string("out", "runs/foreign", "Output directory (finished work is reused).")
  flags.DEFINE_string("domain", Grid.domain, "The domain of the foreign teacher.")
  flags.DEFINE_enum("style", Grid.style, list(tasks.STYLES), "What the foreign teacher learns.")
  flags.DEFINE_integer("seeds", Grid.seeds, "Seeds per arm.")
  flags.DEFINE_integer("steps", Grid.steps, "Student steps of every arm.")
  app.run(main)


if __name__ == "__main__":
  cli()

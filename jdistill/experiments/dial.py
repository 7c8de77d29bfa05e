"""The overlap dial: teacher sets forked from the student's start, pushed away by their data.

  python -m jdistill dial --out=runs/dial [--world=DIR] [--alphas=0,0.25,0.5,0.75,1] [--commit]

At share α, each domain's teacher is the task world's `base` fine-tuned (the world's SFT
settings and `teacher_steps`) on a mixture of that domain's worked examples of which a share α
is in the external style and the rest plain: α = 0 is the lineage teacher's own data, α = 1
the external teachers' style from the student's init (as Ultra's teachers: forks of the
student pushed away by other models' data, not by another init). Under `out` it writes

  tokenizer/                 the world's (the SFT stage reads it from here)
  data/alpha_<α>_<d>.jsonl   the mixtures (held-out prompts excluded, as the world's data)
  alpha_<α>_<d>/             the teachers, each with `artifact.json` (a re-run skips them)
  dial.json                  per set: each teacher's greedy accuracy on its own domain and
                             the set's calibrated overlap (1 − TV, token mean over the base's
                             own rollouts) per domain and mean; the world's lineage and
                             external (other init) sets for reference; the spec

`--commit` copies the teachers and dial.json to `<world>/dial/`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import time

from jdistill.experiments import task_world as tw
from jdistill.experiments import tasks
from jdistill.runtime.io import write_json_atomic

log = logging.getLogger("jdistill")

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
REFERENCES = ("lineage", "external")  # the world's own sets: same lineage, other init


KNOBS = ("example", "token")  # what α is a share of: examples in the external style, or tokens
PREFIX = {"example": "alpha_", "token": "notation_"}


def set_name(alpha: float, knob: str = "example") -> str:
  return f"{PREFIX[knob]}{alpha:g}"


def write_mixture(
  path: str, domain: str, n: int, alpha: float, seed: int, exclude=(), knob: str = "example"
) -> str:
  """`n` worked examples of `domain` (`domain`, `prompt`, `completion`), exactly `round(α n)` of
  them external-style and the rest plain. The problems are those `tasks.write_examples(...,
  seed)` draws, so α = 0 and α = 1 equal its plain and external files; the external rows are
  the first ones of one seeded permutation, so a larger α keeps a smaller α's choice."""
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  rng = random.Random(seed)
  exclude = set(exclude)
  order = list(range(n))
  random.Random(seed + 1).shuffle(order)
  external = set(order[: round(alpha * n)])
  with open(path, "w") as f:
    for i in range(n):
      prompt, _ = tasks.make_problem(domain, rng)
      while prompt in exclude:
        prompt, _ = tasks.make_problem(domain, rng)
      if knob == "token":  # every example plain, a share α of its step tokens re-notated
        completion = tasks.notate(tasks.solution(prompt, "plain"), alpha, rng)
      else:
        completion = tasks.solution(prompt, "external" if i in external else "plain")
      record = {"domain": domain, "prompt": prompt, "completion": completion}
      f.write(json.dumps(record) + "\n")
  return path


def world_spec(world: str) -> tw.WorldSpec:
  with open(os.path.join(world, "world.json")) as f:
    return tw.WorldSpec(**json.load(f)["spec"])


def train_teachers(
  world: str, out: str, alphas, spec: tw.WorldSpec, domains=tasks.DOMAINS, log=log.info,
  knob: str = "example",
) -> dict:  # fmt: skip
  """Trains what is missing of the dial's teachers → {set name: {domain: teacher dir}}."""
  os.makedirs(os.path.join(out, "data"), exist_ok=True)
  if not os.path.isdir(os.path.join(out, "tokenizer")):
    shutil.copytree(os.path.join(world, "tokenizer"), os.path.join(out, "tokenizer"))
  held_out = {r["prompt"] for r in tw.eval_records(world)}
  base_hash = tw._read_hash(os.path.join(world, "base"))
  training = (spec.rows_per_step, spec.lr, spec.teacher_steps, spec.seed)
  sets = {}
  for alpha in alphas:
    sets[set_name(alpha, knob)] = {}
    for domain in domains:
      name = f"{set_name(alpha, knob)}_{domain}"
      sets[set_name(alpha, knob)][domain] = path = os.path.join(out, name)
      seed = spec.seed + 10 + tasks.DOMAINS.index(domain)  # the world's per-domain data seed
      version = "dial-v1" if knob == "example" else f"dial-v1-{knob}"  # example: as committed
      digest = tw._hash(base_hash, training, spec.examples_per_domain, alpha, domain, version)
      if tw._done(path, digest):
        continue
      data = os.path.join(out, "data", f"{name}.jsonl")
      write_mixture(data, domain, spec.examples_per_domain, alpha, seed, held_out, knob)
      t0 = time.time()
      base = os.path.join(world, "base")
      tw._train(out, name, base, data, spec.teacher_steps, spec, log)
      tw._mark(path, digest, alpha=alpha, domain=domain, seconds=time.time() - t0)
  return sets


def overlap_config(world: str, teachers: dict[str, str], seed: int = 0):
  """The `overlap` command's config: the world's base as the student, one teacher per domain."""
  c = tw.recipe_config("lineage", "reverse_kl", world)
  c.seed = seed
  for domain in tasks.DOMAINS:
    if domain in teachers:
      c.teachers[domain].path = teachers[domain]
    else:
      del c.teachers[domain]
  return c


def measure_set(world: str, teachers: dict[str, str], spec, rows_per_domain: int) -> dict:
  """One set's teachers' accuracy on their own domains, and its calibrated overlap with the
  base's rollouts (the same rollouts for every set: same prompts, same key)."""
  from jdistill.data.tokenizer import load_tokenizer
  from jdistill.eval.accuracy import model_accuracy
  from jdistill.overlap import probe

  records = tw.eval_records(world)
  tokenizer = load_tokenizer(os.path.join(world, "tokenizer"))
  accuracy = {
    d: model_accuracy(
      path, [r for r in records if r["domain"] == d], max_new_tokens=spec.max_new_tokens,
      verifier=tw.VERIFIER, tokenizer=tokenizer,
    )[d]["accuracy"]
    for d, path in teachers.items()
  }  # fmt: skip
  report = probe.measure(overlap_config(world, teachers), rows_per_domain=rows_per_domain)
  overlap = {d: report["domains"][d]["token_mean"]["overlap"] for d in teachers}
  return {
    "accuracy": accuracy,
    "overlap": overlap,
    "overlap_mean": sum(overlap.values()) / len(overlap),
  }


def build(
  world: str = tw.COMMITTED, out: str = "runs/dial", alphas=ALPHAS, rows_per_domain: int = 64,
  spec: tw.WorldSpec | None = None, references=REFERENCES, domains=tasks.DOMAINS, log=log.info,
  knob: str = "example",
) -> dict:  # fmt: skip
  """Trains the missing teachers and measures every set (and the world's `references`) →
  dial.json's content (`dial_token.json` for the token knob). `spec` (default: the world's)
  sets the SFT sizes and the accuracy's `max_new_tokens`; a smaller one (and fewer
  `domains`) gives the tests a quick dial. `knob`: α is a share of examples in the external
  style, or of step tokens in the shifted notation (`tasks.notate`)."""
  if knob not in KNOBS:
    raise ValueError(f"knob must be one of {KNOBS}, got {knob!r}")
  t0 = time.time()
  alphas = sorted(alphas)
  spec = spec or world_spec(world)
  sets = train_teachers(world, out, alphas, spec, domains, log, knob)
  for kind in references:
    sets[kind] = {d: os.path.join(world, f"{kind}_{d}") for d in domains}
  digest = tw._hash(
    {s: {d: tw._read_hash(p) for d, p in t.items()} for s, t in sets.items()},
    rows_per_domain, spec.max_new_tokens,
  )  # fmt: skip
  path = os.path.join(out, summary_name(knob))
  if os.path.exists(path):
    with open(path) as f:
      summary = json.load(f)
    if summary.get("hash") == digest:
      return summary
  measured = {}
  for name, teachers in sets.items():
    measured[name] = measure_set(world, teachers, spec, rows_per_domain)
    log(f"dial: {name} overlap {measured[name]['overlap_mean']:.3f}")
  dial = [measured[set_name(a, knob)]["overlap_mean"] for a in alphas]
  summary = {
    "hash": digest,
    "spec": dataclasses.asdict(spec),
    "alphas": alphas,
    "knob": knob,
    "rows_per_domain": rows_per_domain,
    "sets": {n: dict(m, alpha=_alpha(n)) for n, m in measured.items()},
    "monotone": all(a > b for a, b in zip(dial, dial[1:])),
    "span": [min(dial), max(dial)],
    "min_teacher_accuracy": min(
      v for a in alphas for v in measured[set_name(a, knob)]["accuracy"].values()
    ),
    "build_seconds": time.time() - t0,
  }
  write_json_atomic(path, summary, indent=1)
  return summary


def summary_name(knob: str) -> str:
  return "dial.json" if knob == "example" else f"dial_{knob}.json"


def _alpha(name: str) -> float | None:
  for prefix in PREFIX.values():
    if name.startswith(prefix):
      return float(name.removeprefix(prefix))
  return None


def table(summary: dict) -> str:
  """A markdown table: one row per set, each teacher's own-domain accuracy and the overlap."""
  ds = [d for d in tasks.DOMAINS if d in next(iter(summary["sets"].values()))["overlap"]]
  head = ["set", *(f"acc {d}" for d in ds), *(f"overlap {d}" for d in ds), "overlap mean"]
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for name, s in summary["sets"].items():
    cells = [f"{s['accuracy'][d]:.2f}" for d in ds] + [f"{s['overlap'][d]:.3f}" for d in ds]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['overlap_mean']:.3f} |")
  return "\n".join(lines)


def commit(out: str, world: str = tw.COMMITTED) -> str:
  """Copies the dial's teachers and dial.json to `<world>/dial/` (no data or run folders)."""
  dest = os.path.join(world, "dial")
  if os.path.exists(dest):
    shutil.rmtree(dest)
  os.makedirs(dest)
  with open(os.path.join(out, "dial.json")) as f:
    summary = json.load(f)
  for a in summary["alphas"]:
    for d in tasks.DOMAINS:
      name = f"{set_name(a, summary.get('knob', 'example'))}_{d}"
      shutil.copytree(os.path.join(out, name), os.path.join(dest, name))
  shutil.copy(os.path.join(out, "dial.json"), os.path.join(dest, "dial.json"))
  return dest


def main(argv):
  del argv
  from absl import flags

  f = flags.FLAGS
  alphas = [float(a) for a in f.alphas.split(",")]
  summary = build(f.world, f.out, alphas, f.rows_per_domain, knob=f.knob)
  print(table(summary))
  print(
    f"monotone: {summary['monotone']}, span {summary['span'][0]:.3f} → {summary['span'][1]:.3f}, "
    f"weakest teacher {summary['min_teacher_accuracy']:.2f}, built in "
    f"{summary['build_seconds']:.0f} s"
  )
  if f.commit:
    log.info("copied the dial to %s", commit(f.out, f.world))


def cli():
  from absl import app, flags

  flags.DEFINE_string("world", tw.COMMITTED, "The task world whose base the teachers fork.")
  flags.DEFINE_string("out", "runs/dial", "Where the dial's teachers and data are built.")
  flags.DEFINE_string("alphas", ",".join(f"{a:g}" for a in ALPHAS), "External-style shares.")
  flags.DEFINE_enum("knob", "example", list(KNOBS), "α is a share of: examples | tokens.")
  flags.DEFINE_integer("rows_per_domain", 64, "Base rollouts per domain the overlap is over.")
  flags.DEFINE_bool("commit", False, "Copy the teachers and dial.json to <world>/dial/.")
  app.run(main)

"""The agentic world: the lookup task (`jdistill.experiments.lookup`) as a domain of the task
world, teachers that call its tool, and OPD from them on the student's own multi-turn episodes.

  make agentic
  python -m jdistill agentic --out=runs/agentic --build_only   # models only, once
  python -m jdistill agentic --out=runs/agentic [--seeds=3] [--shard=0/2]

The student is the committed task world's base: it has never seen the tool (success 0). Built
once under `--out` (cached, resumable: each model carries the hash of what made it):

  lineage_lookup   a fork of the base fine-tuned on expert episodes in the student's tool
                   syntax, `[get <key>]` (DeepSeek-V4 style: one base, forked)
  external_lookup  another random init trained on expert episodes in another syntax,
                   `lookup(<key>)` (as gpt-oss's and Qwen's call formats differ): its support
                   differs from the student's from the first token of a call
  prompts          keys of one hidden 256-key table (`TABLE_SEED`), split into train,
                   validation and test keys; expert episodes draw a fresh random value per
                   example, so a teacher must read the value from the tool's observation

Then per teacher kind and loss (full-vocab reverse KL as V4 runs it, full-vocab forward KL,
sampled-token as Ultra runs it: PPO clip 0.2 and IcePop 5) an lr sweep on the validation
keys (seed 0, `lrs_of`), and `--seeds` seeds at the chosen lr on the test keys, each cell OPD on
the student's episodes (environment tokens masked: `jdistill.step.common`) for `STEPS` steps.
Against them, student RL without a teacher (`RLVR_GROUPS`: GRPO on the environment's reward
at group sizes 4, 8 and 16, the same episodes a step) from the warmed-up student, its group
size and lr chosen on the validation keys too.
Accuracy is the mean reward of one greedy episode per test prompt
(`jdistill.eval.accuracy.episode_accuracy`). Output under `--out`: agentic.json (every
number) and agentic.md (the table, the sweep).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import string
import time

import ml_collections
import numpy as np

from jdistill.config import base_config, teacher_config
from jdistill.experiments import lookup
from jdistill.experiments import task_world as tw
from jdistill.runtime.io import write_json_atomic

TABLE_SEED, TABLE_SIZE = 7, 256
SPLITS = {"test": 64, "validation": 32, "train": 160}  # keys per split, disjoint
KINDS = {"lineage": "get", "external": "call"}  # teacher kind → its tool syntax
LOSSES = ("reverse_kl", "forward_kl", "sampled_token")  # full vocab: both directions
# student RL without a teacher: GRPO on the environment's reward, G episodes of each key a
# step, ROWS in all (as many as an OPD step); G is tuned with the lr: at a low sampled success
# rate a small group is mostly all-wrong, an advantage of 0
RLVR_GROUPS = {"rlvr": 4, "rlvr_g8": 8, "rlvr_g16": 16}
LRS = (1e-3, 3e-3, 1e-2)
# the sampled estimator diverges at the full-vocab losses' lrs once the student is warm
SAMPLED_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
RLVR_LRS = (3e-5, 1e-4, 3e-4, 1e-3)
STEPS = 300
WARMUPS = ("none", "sft")
WARMUP_STEPS = 80  # SFT steps on the teacher's episodes: some success, far from the teacher's
ROWS = 16  # episodes per OPD step
MAX_TURN_TOKENS, MAX_TURNS, MAX_TOTAL_TOKENS = 16, 3, 40
MAX_PROMPT_LEN = 32
ENVIRONMENT = "jdistill.experiments.agentic:world_env"
TEACHER_STEPS = {"lineage": 300, "external": 600}  # a random init learns the format too
EXPERT_EXAMPLES = 4000


def lrs_of(loss: str) -> tuple[float, ...]:
  """The learning rates the sweep tries for `loss` (or an RLVR variant, `RLVR_GROUPS`)."""
  if loss in RLVR_GROUPS:
    return RLVR_LRS
  return SAMPLED_LRS if loss == "sampled_token" else LRS


def world_env() -> lookup.LookupEnv:
  """The agentic world's environment: the 256-key table, no hints (a malformed turn ends the
  episode with reward 0)."""
  return lookup.LookupEnv(TABLE_SEED, hints=False, size=TABLE_SIZE)


def split_keys() -> dict[str, list[str]]:
  """The table's keys split into disjoint `SPLITS`, a function of the table."""
  keys = sorted(lookup.make_table(TABLE_SEED, TABLE_SIZE))
  random.Random(TABLE_SEED).shuffle(keys)
  out, start = {}, 0
  for name, n in SPLITS.items():
    out[name], start = keys[start : start + n], start + n
  return out


def write_split(path: str, split: str) -> str:
  """Prompt records `{"domain", "prompt", "key", "answer"}` for every key of `split`."""
  table = lookup.make_table(TABLE_SEED, TABLE_SIZE)
  with open(path, "w") as f:
    for key in split_keys()[split]:
      record = {"domain": lookup.DOMAIN, "prompt": lookup.prompt_of(key), "key": key}
      f.write(json.dumps({**record, "answer": table[key]}) + "\n")
  return path


def expert_turns(key: str, value: str, syntax: str) -> list[dict]:
  """An expert's episode: call the tool in `syntax` (`lookup.SYNTAXES`), read, answer."""
  return [
    {"origin": "model", "text": lookup.SYNTAXES[syntax].format(key=key)},
    {"origin": "environment", "text": f" {key}={value} "},
    {"origin": "model", "text": f"answer: {value}"},
  ]


def write_expert_episodes(path: str, n: int, seed: int, syntax: str) -> str:
  """`n` multi-turn SFT records (`jdistill.data.packing`) over random keys and values: the
  value is in the observation only, never a function of the key."""
  rng = random.Random(seed)
  with open(path, "w") as f:
    for _ in range(n):
      key = "".join(rng.choice(string.ascii_lowercase) for _ in range(3))
      value = f"{rng.randrange(100):02d}"
      turns = expert_turns(key, value, syntax)
      f.write(json.dumps({"prompt": lookup.prompt_of(key), "turns": turns}) + "\n")
  return path


def episode_limits():
  from jdistill.sampling.episodes import EpisodeParams

  return EpisodeParams(
    max_turns=MAX_TURNS, max_turn_tokens=MAX_TURN_TOKENS, max_total_tokens=MAX_TOTAL_TOKENS,
    stop_strings=lookup.STOP_STRINGS,
  )  # fmt: skip


def success(model_dir: str, records: list[dict], tokenizer, pass_k: int = 0) -> dict:
  """{"accuracy", "prompts", "turns" (, "pass@k")}: greedy episodes of the model in
  `model_dir` on `records`."""
  from jdistill.eval.accuracy import model_accuracy

  out = model_accuracy(
    model_dir, records, environment=world_env(), episode=episode_limits(), tokenizer=tokenizer,
    pass_k=pass_k, prompt_buckets=(MAX_PROMPT_LEN + MAX_TOTAL_TOKENS,),
  )  # fmt: skip
  return out[lookup.DOMAIN]


def _tokenizer(base_world: str):
  from jdistill.data.tokenizer import load_tokenizer

  return load_tokenizer(os.path.join(base_world, "tokenizer"))


def _read(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def train_on_experts(root, name, syntax, steps, init=None, base_world=tw.COMMITTED, log=print):
  """A model `name` under `root` fine-tuned for `steps` SFT steps on expert episodes in
  `syntax` (`lookup.SYNTAXES`), from `init` (None: a random init of the world's shape);
  cached by a hash of what made it → its dir."""
  from jdistill.data.tokenizer import load_tokenizer
  from jdistill.stages.sft import SFTTrainer
  from jdistill.testing.toy import random_model_dir

  spec = tw.WorldSpec()
  out = os.path.join(root, name)
  digest = tw._hash(
    tw._read_hash(init) if init else "random", syntax, steps, EXPERT_EXAMPLES,
    dataclasses.asdict(spec), "agentic-v1",
  )  # fmt: skip
  if tw._done(out, digest):
    return out
  os.makedirs(os.path.join(root, "data"), exist_ok=True)
  data = os.path.join(root, "data", f"{name}.jsonl")
  write_expert_episodes(data, EXPERT_EXAMPLES, len(name), syntax)
  tokenizer_dir = os.path.join(base_world, "tokenizer")
  if init is None:
    init = os.path.join(root, "init", name)
    tokenizer = load_tokenizer(tokenizer_dir)
    random_model_dir(init, spec.model_config(len(tokenizer)), spec.seed + 300, tokenizer)
  c = tw.sft_config(root, name, init, data, steps, spec)
  c.tokenizer = tokenizer_dir
  trainer = SFTTrainer(c)
  trainer.run()
  trainer.export(out)
  tw._mark(out, digest)
  log(f"agentic world: trained {name} ({steps} steps)")
  return out


def build(root: str, base_world: str = tw.COMMITTED, teacher_steps=TEACHER_STEPS, log=print):
  """Prompts, expert data, the teachers of `teacher_steps`' kinds and their warmed-up
  students (`warm_student`) under `root` (cached) → {model: success on the test keys} of the
  base and the teachers, also in `root`/world.json."""
  from jdistill.data.tokenizer import load_tokenizer

  os.makedirs(root, exist_ok=True)
  for split in SPLITS:
    write_split(os.path.join(root, f"{split}.jsonl"), split)
  tokenizer = load_tokenizer(os.path.join(base_world, "tokenizer"))
  base = os.path.join(base_world, "base")
  models = {"base": base}
  for kind, steps in teacher_steps.items():
    init = base if kind == "lineage" else None
    models[f"{kind}_lookup"] = train_on_experts(
      root, f"{kind}_lookup", KINDS[kind], steps, init, base_world, log
    )
    warm_student(root, kind, base_world, log)  # the warmup arm's student, trained here once
  test = _read(os.path.join(root, "test.jsonl"))
  key = tw._hash([tw._read_hash(p) if p != base else "base" for p in models.values()], SPLITS)
  summary_path = os.path.join(root, "world.json")
  if os.path.exists(summary_path):
    summary = json.load(open(summary_path))
    if summary.get("hash") == key:
      return summary["success"]
  result = {n: success(p, test, tokenizer, pass_k=4) for n, p in models.items()}
  write_json_atomic(summary_path, {"hash": key, "success": result}, indent=1)
  return result


def opd_config(
  root, kind, loss, lr, seed, out_dir, eval_split, steps=STEPS, base_world=tw.COMMITTED
):
  """The OPD stage: the base learns from the `kind` teacher with `loss` on its own episodes
  of the train keys; accuracy on `eval_split`'s keys at the end."""
  c = base_config()
  c.stage = "opd"
  c.num_devices = tw.NUM_DEVICES
  c.run_mode = "new"
  c.seed = seed
  c.student.path = os.path.join(base_world, "base")
  c.tokenizer = os.path.join(base_world, "tokenizer")
  c.output_dir = out_dir
  c.teachers = ml_collections.ConfigDict(
    {"lookup": teacher_config(os.path.join(root, f"{kind}_lookup"), "lookup", loss=loss,
                              param_dtype="float32")}
  )  # fmt: skip
  if loss == "sampled_token":  # as Ultra runs it
    c.loss.clip_eps = 0.2
    c.loss.icepop_c = 5.0
  d = c.data
  d.train_files = os.path.join(root, "train.jsonl")
  d.eval_files = os.path.join(root, f"{eval_split}.jsonl")
  d.use_chat_template = False
  d.max_prompt_len = MAX_PROMPT_LEN
  d.slots_per_teacher = ROWS
  s = c.sampling
  s.max_new_tokens = MAX_TURN_TOKENS
  s.prompt_buckets = (MAX_PROMPT_LEN + MAX_TOTAL_TOKENS,)
  s.stop_at_eos = True
  e = c.episode
  e.environment = ENVIRONMENT
  e.max_turns = MAX_TURNS
  e.max_total_tokens = MAX_TOTAL_TOKENS
  e.stop_strings = lookup.STOP_STRINGS
  c.loss.chunk_size = 16
  c.optimizer.lr = lr
  c.optimizer.b2 = 0.99
  c.optimizer.warmup_steps = min(5, steps)
  c.train.steps = steps
  c.train.log_every = 10
  c.train.eval_every = 0
  c.train.sample_rows = 0  # no report samples: each cell would pay their compile
  return c


def rlvr_config(
  root, kind, lr, seed, out_dir, eval_split, group, steps=STEPS, base_world=tw.COMMITTED
):
  """The RLVR stage on the same episodes without a teacher: GRPO on the environment's reward,
  `group` episodes of each of `ROWS // group` train keys a step (as many episodes as an OPD
  step samples), advantages normalised per group. `kind` only names the teacher whose
  warmed-up student it starts from (set `student.path`)."""
  c = opd_config(root, kind, "reverse_kl", lr, seed, out_dir, eval_split, steps, base_world)
  c.stage = "rlvr"
  c.teachers = ml_collections.ConfigDict()
  c.rl.group_size = group
  c.data.slots_per_teacher = ROWS // group
  return c


def trained_success(trainer, records: list[dict]) -> dict:
  """{"accuracy", "prompts", "turns"}: greedy episodes of a trainer's current student on
  `records` (`episode_accuracy`, as `OPDTrainer.accuracy` scores the OPD cells)."""
  from jdistill.eval.accuracy import episode_accuracy

  c = trainer.config
  out = episode_accuracy(
    trainer.sampler, trainer.state["params"], trainer.tokenizer, records,
    encode=trainer.encode_prompt, environment=trainer.environment,
    episode=trainer.episode_params, prompt_buckets=c.sampling.prompt_buckets,
  )  # fmt: skip
  return out[lookup.DOMAIN]


def warm_student(root, kind, base_world=tw.COMMITTED, log=print) -> str:
  """The base after a warmup SFT of `WARMUP_STEPS` steps on the `kind` teacher's episodes (in
  its syntax: the teachers succeed on every prompt, so their episodes are the expert ones)."""
  base = os.path.join(base_world, "base")
  return train_on_experts(root, f"warm_{kind}", KINDS[kind], WARMUP_STEPS, base, base_world, log)


def run_cell(
  root, kind, loss, lr, seed, eval_split, warmup="none", steps=STEPS, base_world=tw.COMMITTED
):
  """One OPD run (or with `loss` in `RLVR_GROUPS` an RLVR run, no teacher) cached in its folder's
  cell.json, from the base (`warmup` "none") or the warmed-up student ("sft") → {accuracy
  before/after, tokens, wall}."""
  from jdistill.experiments import budget
  from jdistill.stages.opd import OPDTrainer

  out = _cell_dir(root, kind, loss, lr, seed, eval_split, warmup)
  path = os.path.join(out, "cell.json")
  student = os.path.join(base_world, "base")
  if warmup == "sft":
    student = warm_student(root, kind, base_world)
  made_of = {
    "teacher_hash": tw._read_hash(os.path.join(root, f"{kind}_lookup")),
    **({"student_hash": tw._read_hash(student)} if warmup == "sft" else {}),
  }
  if os.path.exists(path):
    with open(path) as f:
      cell = {"warmup": "none", **json.load(f)}
    if all(cell.get(k) == v for k, v in made_of.items()) and cell["steps"] == steps:
      return cell
  t0 = time.time()
  if loss in RLVR_GROUPS:
    from jdistill.stages.rlvr import RLVRTrainer

    c = rlvr_config(root, kind, lr, seed, out, eval_split, RLVR_GROUPS[loss], steps, base_world)
    c.student.path = student
    trainer = RLVRTrainer(c)
    records = _read(c.data.eval_files)

    def measure():
      return trained_success(trainer, records)

  else:
    c = opd_config(root, kind, loss, lr, seed, out, eval_split, steps, base_world)
    c.student.path = student
    trainer = OPDTrainer(c)

    def measure():
      return trainer.accuracy()[lookup.DOMAIN]

  before = measure()
  trainer.run(steps=steps)
  after = measure()
  cell = {
    "kind": kind, "loss": loss, "lr": lr, "seed": seed, "split": eval_split,
    "warmup": warmup, "steps": steps,
    "accuracy_before": before["accuracy"], "accuracy": after["accuracy"],
    "turns": after["turns"], "student_tokens": budget.step_tokens(c) * steps,
    "wall_s": time.time() - t0, **made_of,
  }  # fmt: skip
  write_json_atomic(path, cell, indent=1)
  return cell


def start_noise(root, kind, warmup, batches=4, base_world=tw.COMMITTED) -> dict:
  """Sampled-token's gradient noise on the student's own episodes before OPD: its distance
  from the exact reverse-KL gradient on the same batch as a share of it
  (`jdistill.experiments.noise.gradient_noise`, `batches` batches of the train keys), cached."""
  from jdistill.experiments.noise import gradient_noise
  from jdistill.stages.opd import OPDTrainer

  out = os.path.join(root, "noise", f"{kind}_{warmup}")
  path = os.path.join(out, "noise.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  c = opd_config(root, kind, "sampled_token", 1e-3, 0, out, "validation", 1, base_world)
  if warmup == "sft":
    c.student.path = warm_student(root, kind, base_world)
  result = gradient_noise(OPDTrainer(c), batches)
  write_json_atomic(path, result, indent=1)
  return result


def training_metrics(cell_dir: str) -> dict:
  """The teacher's metrics on the student's rollouts at the first and last logged step of a
  cell's OPD (its metrics.jsonl): reverse KL, forward KL, overlap (1 − TV) and the share of
  student tokens off the teacher's support (None for an RLVR cell), and the training
  episodes' reward."""
  with open(os.path.join(cell_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  out = {}
  fields = ("reverse_kl", "forward_kl", "overlap", "off_support")
  for when, r in (("first", records[0]), ("last", records[-1])):
    t = r.get("teachers", {}).get(lookup.DOMAIN, {})  # RLVR has no teacher
    out[when] = {k: t.get(k) for k in fields}
    out[when]["reward"] = r["episodes"]["reward"]
    out[when]["step"] = r["step"]
  return out


def interval(values) -> tuple[float, float, float]:
  """Mean and a 95% t interval over seeds."""
  from jdistill.experiments.verdict import mean_interval

  i = mean_interval(list(values))
  return i.mean, i.lo, i.hi


_KEY = ("kind", "loss", "lr", "seed", "split", "warmup")


def _cell_dir(root, kind, loss, lr, seed, split, warmup="none") -> str:
  tag = "" if warmup == "none" else f"_{warmup}"
  return os.path.join(root, "cells", f"{kind}_{loss}_lr{lr:g}_s{seed}_{split}{tag}")


def run(root: str, seeds: int = 3, base_world: str = tw.COMMITTED, log=print, shard=(0, 1)):
  """Builds the world, sweeps, runs the seeds → agentic.json's content (also written), or
  None while cells are missing. `shard` = (i, n): this process runs only every n-th missing
  cell from the i-th, the seeds once the whole sweep is in (so two rounds of n processes
  and one collecting call finish it, as `make agentic` does)."""
  t0 = time.time()
  world = build(root, base_world, log=log)
  index, count = shard

  def cells(jobs):
    done = [os.path.exists(os.path.join(_cell_dir(root, *j), "cell.json")) for j in jobs]
    for k, job in enumerate(j for j, d in zip(jobs, done) if not d):
      if k % count == index:
        run_cell(root, *job, base_world=base_world)
    if not all(os.path.exists(os.path.join(_cell_dir(root, *j), "cell.json")) for j in jobs):
      return None
    return [run_cell(root, *job, base_world=base_world) for job in jobs]  # cached: reads

  # RLVR only from the warm students: the base's episodes all earn 0 (pass@4 0.00), so every
  # group advantage is 0 and GRPO has nothing to follow
  recipes = [(k, loss, w) for w in WARMUPS for k in KINDS for loss in LOSSES]
  recipes += [(k, loss, "sft") for k in KINDS for loss in RLVR_GROUPS]
  sweep = cells(
    [(k, loss, lr, 0, "validation", w) for k, loss, w in recipes for lr in lrs_of(loss)]
  )
  if sweep is None:
    return None
  chosen = {}
  for kind, loss, warmup in recipes:
    rows = [r for r in sweep if (r["kind"], r["loss"], r["warmup"]) == (kind, loss, warmup)]
    chosen[f"{kind}/{loss}/{warmup}"] = max(rows, key=lambda r: (r["accuracy"], -r["lr"]))["lr"]
  # the RL arm of each kind: the group size (with its lr) that the validation keys chose
  rlvr = {
    kind: max(
      (r for r in sweep if r["kind"] == kind and r["loss"] in RLVR_GROUPS),
      key=lambda r: (r["accuracy"], -r["lr"], -RLVR_GROUPS[r["loss"]]),
    )["loss"]
    for kind in KINDS
  }
  tests = cells(
    [(k, loss, chosen[f"{k}/{loss}/{w}"], s, "test", w) for k, loss, w in recipes
     for s in range(seeds)]
  )  # fmt: skip
  if tests is None:
    return None
  for cell in tests:
    cell["training"] = training_metrics(_cell_dir(root, *(cell[k] for k in _KEY)))
  test = _read(os.path.join(root, "test.jsonl"))
  tokenizer = _tokenizer(base_world)
  warm = {
    f"warm_{k}": success(warm_student(root, k, base_world), test, tokenizer, pass_k=4)
    for k in KINDS
  }
  result = {
    "world": world, "warm": warm, "sweep": sweep, "lr": chosen, "rlvr": rlvr, "cells": tests
  }  # fmt: skip
  result["noise"] = {f"{k}/{w}": start_noise(root, k, w, base_world=base_world)
                     for w in WARMUPS for k in KINDS}  # fmt: skip
  result["seconds"] = time.time() - t0
  write_json_atomic(os.path.join(root, "agentic.json"), result, indent=1)
  with open(os.path.join(root, "agentic.md"), "w") as f:
    f.write(report(result))
  return result


def claim_lines(cells: list[dict]) -> list[str]:
  """Ultra's finding on agentic tasks, "sampled-token beats full-vocab", per warmup, teacher
  kind and full-vocab loss: the difference in test success (sampled-token − full-vocab,
  Welch's 95% interval over seeds) and its verdict (`jdistill.experiments.verdict.decide`)."""
  from jdistill.experiments import verdict

  lines = []
  for warmup in WARMUPS:
    for kind in KINDS:
      recipe = {loss: (warmup, kind, loss) for loss in LOSSES}
      of = {
        loss: [c["accuracy"] for c in cells if (c["warmup"], c["kind"], c["loss"]) == key]
        for loss, key in recipe.items()
      }
      for full in ("reverse_kl", "forward_kl"):
        if not of["sampled_token"] or not of[full]:
          continue
        d = verdict.difference_interval(of["sampled_token"], of[full], paired=False)
        lines.append(
          f"- warmup {warmup}, {kind} teacher: sampled_token − {full} = {d}: "
          f"{verdict.decide(d, 'greater')}"
        )
  return lines


def rl_lines(cells: list[dict], rlvr: dict[str, str], margin: float = 0.05) -> list[str]:
  """Per teacher kind, from the warm student at equal episodes: each OPD loss's test success
  minus that of RLVR's variant `rlvr[kind]` (Welch's 95% interval over seeds) and whether
  OPD without student RL is not worse than RLVR by more than `margin` (`verdict.decide`,
  "not_less")."""
  from jdistill.experiments import verdict

  lines = []
  for kind, arm in rlvr.items():
    of = {
      loss: [
        c["accuracy"] for c in cells if (c["warmup"], c["kind"], c["loss"]) == ("sft", kind, loss)
      ]
      for loss in (*LOSSES, arm)
    }
    for loss in LOSSES:
      if not of[loss] or not of[arm]:
        continue
      d = verdict.difference_interval(of[loss], of[arm], paired=False)
      answer = verdict.decide(d, "not_less", margin)
      lines.append(f"- {kind} teacher: {loss} − {arm} = {d}, not below −{margin:g}: {answer}")
  return lines


def report(result: dict) -> str:
  """agentic.md: success per model and per OPD recipe (mean, 95% interval over seeds)."""
  lines = [
    "# The agentic domain: lookup, multi-turn, environment tokens masked",
    "",
    "Greedy episode success on the test keys (a reward-1 episode calls the tool and answers "
    "with the value it read); pass@4 at temperature 1; the greedy episodes' model turns.",
    "",
    "| model | success | pass@4 | turns |",
    "|---|---|---|---|",
  ]
  for name, v in {**result["world"], **result["warm"]}.items():
    lines.append(f"| {name} | {v['accuracy']:.2f} | {v['pass@4']:.2f} | {v['turns']:.2f} |")
  lines += [
    "",
    f"OPD, {STEPS} steps of {ROWS} episodes, from the base (warmup none) or from the student "
    f"after {WARMUP_STEPS} warmup SFT steps on that teacher's episodes (sft), at the lr the "
    "validation keys chose; `rlvr_g<G>` (`rlvr`: G = 4) is GRPO on the environment's reward "
    f"with no teacher, {ROWS} // G keys × G episodes a step (the same episodes), from the warm "
    "student; the teacher's metrics on the student's training episodes at the first and last "
    "logged step:",
    "",
    "| warmup | teacher | loss | lr | success before → after (95% CI over seeds) | seeds "
    "| turns | reverse KL | forward KL | overlap |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for warmup in WARMUPS:
    for kind in KINDS:
      for loss in (*LOSSES, *RLVR_GROUPS):
        recipe = (warmup, kind, loss)
        rows = [c for c in result["cells"] if (c["warmup"], c["kind"], c["loss"]) == recipe]
        if not rows:
          continue
        m, lo, hi = interval(c["accuracy"] for c in rows)
        before = np.mean([c["accuracy_before"] for c in rows])
        turns = np.mean([c["turns"] for c in rows])

        def moved(field, rows=rows):
          if rows[0]["training"]["first"][field] is None:  # RLVR: no teacher
            return "—"
          a, b = (np.mean([c["training"][w][field] for c in rows]) for w in ("first", "last"))
          return f"{a:.2f} → {b:.2f}"

        lines.append(
          f"| {warmup} | {kind} | {loss} | {rows[0]['lr']:g} | {before:.2f} → {m:.2f} "
          f"[{lo:.2f}, {hi:.2f}] | {len(rows)} | {turns:.2f} | {moved('reverse_kl')} "
          f"| {moved('forward_kl')} | {moved('overlap')} |"
        )
  lines += [
    "",
    "Sampled-token's gradient on the student's own episodes before OPD, against the exact "
    "reverse-KL gradient on the same batch (mean of 4 batches of 16 episodes):",
    "",
    "| warmup | teacher | noise ‖g − g_exact‖/‖g_exact‖ | cosine | ‖g‖/‖g_exact‖ |",
    "|---|---|---|---|---|",
  ]
  for key, v in result.get("noise", {}).items():
    kind, warmup = key.split("/")
    lines.append(
      f"| {warmup} | {kind} | {v['noise']:.2f} | {v['cosine']:.2f} | {v['norm_ratio']:.2f} |"
    )
  lines += ["", "Ultra's finding on agentic tasks, sampled-token ahead of full-vocab, here:", ""]
  lines += claim_lines(result["cells"])
  lines += [
    "",
    "OPD from the teacher against student RL (the group size the validation keys chose) at "
    "the same episodes, both from the warm student:",
    "",
  ]
  lines += rl_lines(result["cells"], result["rlvr"])
  lines += ["", "Sweep (validation keys, seed 0):", ""]
  lines += ["| warmup | teacher | loss | lr | success |", "|---|---|---|---|---|"]
  for r in result["sweep"]:
    lines.append(
      f"| {r['warmup']} | {r['kind']} | {r['loss']} | {r['lr']:g} | {r['accuracy']:.2f} |"
    )
  tokens = result["cells"][0]["student_tokens"] if result["cells"] else 0
  wall = sum(c["wall_s"] for c in result["cells"] + result["sweep"])
  lines += ["", f"Student tokens per cell (bound): {tokens}; cell time in all {wall / 60:.1f} min."]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  from absl import flags

  if flags.FLAGS.build_only:  # before the shards, which would race to build what is missing
    print(json.dumps(build(flags.FLAGS.out), indent=1))
    return
  i, n = (int(x) for x in flags.FLAGS.shard.split("/"))
  result = run(flags.FLAGS.out, flags.FLAGS.seeds, shard=(i, n))
  print(report(result) if result else f"agentic: shard {i}/{n} done; cells of others missing")


def cli():
  from absl import app, flags

  flags.DEFINE_string("out", "runs/agentic", "Where the agentic world and its cells live.")
  flags.DEFINE_integer("seeds", 3, "Seeds per recipe at the chosen lr.")
  flags.DEFINE_string("shard", "0/1", "i/n: run every n-th missing cell from the i-th.")
  flags.DEFINE_bool("build_only", False, "Build the teachers and warm students, run no cell.")
  app.run(main)


if __name__ == "__main__":
  cli()

"""The question's grid: can engineered support overlap replace student RL?

  make experiment
  python -m jdistill question --out=runs/question [--seeds=3] [--settings=lineage,alpha_1] ...

At each dial setting (a teacher set: `lineage` = forks of the base on their domain's own
plain data, high overlap; `alpha_<α>` = the dial's forks on a share α of external-style data,
`jdistill.experiments.dial`; `external` = other inits), every recipe

  loss     reverse_kl | sampled_token (Ultra: PPO clip 0.2, IcePop 5) | sampled_token_baseline
           | forward_kl | topk_teacher (k = 8, tail bucket)
  rl       none | rlvr (GRPO before OPD, Ultra's order) | unified (the whole budget in one
           GRPO stage whose advantage adds the teachers' term to the reward's: reverse_kl as a
           dense full-vocab KL loss, sampled_token as λ·sg[log p_T − log q] per token)
  warmup   none | sft (the teachers' verified completions, after RL: Ultra's order)

runs from the world's base at **equal budget**: `budget_steps` OPD steps' worth of student
tokens, of which the rlvr arm spends `rl_steps` GRPO steps (group `rl_group`) and OPD the rest
(`jdistill.experiments.budget`); the unified arm spends it all in its GRPO stage. Pruned,
for the 2-core budget: warmup SFT runs only at `warmup_settings`, teachers whose data is not
the student's own style (the lineage teachers' data *is* the base's; claims 1-2 concern
external-data teachers), and only with `warmup_losses`; the rlvr arm only with `rl_losses`,
the unified arm only with `unified_losses` and without warmup (claims 5-7 compare the RL arms
with no RL; forward KL and top-k answer the mechanism question, the KL direction and
truncation, against reverse_kl without RL); the unified arm, forward KL and top-k only at the
dial's two ends (`ends_only`).

Learning rates are tuned, not shared: `sweep` runs each loss at `lrs` and RLVR at `rl_lrs`
(seed 0, the dial's ends) and scores them on a **validation** split (`validation.jsonl`:
prompts kept apart from the training and the test prompts); each recipe then runs at its best
lr. Each cell records held-out test accuracy, overlap before and after OPD (after RL and
warmup: "before" is the student OPD starts from), the estimator's gradient noise at the
start (`jdistill.experiments.noise`), student and teacher tokens and wall time, in the format
`jdistill.experiments.verdict` reads; `answer.md` is its verdict. Cells, stages and the sweep
are cached under `--out`: a re-run resumes where the last one stopped.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import random
import time

import ml_collections
import numpy as np

from jdistill.experiments import budget, dial, tasks, verdict
from jdistill.experiments import experiment as loss_grid
from jdistill.experiments import task_world as tw
from jdistill.losses import registry
from jdistill.runtime.io import atomic_write, write_json_atomic

LOSSES = registry.check_names(
  ("reverse_kl", "sampled_token", "sampled_token_baseline", "forward_kl", "topk_teacher"),
  "question LOSSES",
)
SAMPLED = ("sampled_token", "sampled_token_baseline")
RLS = ("none", "rlvr", "unified")


@dataclasses.dataclass(frozen=True)
class Grid:
  # the dial by falling overlap: lineage (α = 0), the token knob at α = 0.5 and 1, the example
  # knob at α = 1; the sweep runs at the first and the last
  settings: tuple[str, ...] = ("lineage", "notation_0.5", "notation_1", "alpha_1")
  losses: tuple[str, ...] = LOSSES
  rl_losses: tuple[str, ...] = ("reverse_kl", "sampled_token")  # the losses with an rlvr arm
  unified_losses: tuple[str, ...] = ("reverse_kl", "sampled_token")  # ... with a unified arm
  rls: tuple[str, ...] = RLS
  warmups: tuple[str, ...] = ("none", "sft")
  warmup_settings: tuple[str, ...] = ("alpha_1",)  # where the sft warmup runs (see above)
  warmup_losses: tuple[str, ...] = ("reverse_kl", "sampled_token", "sampled_token_baseline")
  # the unified arm, forward KL and top-k run at the dial's ends only (2-core budget): every
  # claim about them pools the high (lineage) or low (alpha_1) regime, which the ends hold
  ends_only: tuple[str, ...] = ("unified", "forward_kl", "topk_teacher")
  seeds: int = 3
  seeds_if_straddling: int = 5  # where an answer's interval straddles zero (straddling_cells)
  budget_steps: int = 150  # student tokens of this many OPD steps per cell
  rl_steps: int = 15  # GRPO steps of the rlvr arm (group rl_group: 4 OPD steps' tokens each)
  rl_group: int = 4
  warmup_steps: int = 60
  # The RL arms' lists reach one step below every lr a sweep chose at their low edge (2.5e-4
  # for reverse_kl after RLVR, 5e-5 for sampled_token, 3e-5 and 1e-5 for RLVR, 3e-5 for the
  # unified arm). Still at an edge, not extended for the 2-core budget: top-k (1e-3, low) and
  # the warmup SFT (3e-3, high).
  lrs: tuple[float, ...] = (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3)
  # the sampled estimators diverge at 2e-3 (the loss grid): their sweep reaches lower
  sampled_lrs: tuple[float, ...] = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3)
  # forward KL and top-k: around reverse_kl's best (2e-3), to save 2-core time
  other_lrs: tuple[float, ...] = (1e-3, 2e-3, 4e-3)
  rl_lrs: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
  unified_lrs: tuple[float, ...] = (3e-5, 1e-4, 5e-4, 2e-3)  # spans GRPO's best and reverse_kl's
  warmup_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)  # the warmup SFT's
  validation_per_domain: int = 64
  noise_batches: int = 2
  slots_per_teacher: int = 16
  max_new_tokens: int = 48

  def loss_grid(self) -> loss_grid.Grid:
    """The loss grid's settings this grid shares (prompts, sampling, the warmup's SFT)."""
    return loss_grid.Grid(
      opd_steps=self.budget_steps,
      warmup_steps=self.warmup_steps,
      slots_per_teacher=self.slots_per_teacher,
      max_new_tokens=self.max_new_tokens,
    )

  def lrs_of(self, loss: str) -> tuple[float, ...]:
    """The learning rates the sweep tries for `loss` (OPD without RL)."""
    if loss in SAMPLED:
      return self.sampled_lrs
    return self.lrs if loss in ("reverse_kl",) else self.other_lrs

  def cells(self):
    """(setting, warmup, rl, loss, seed) of every cell, pruned as the module docstring says."""
    out = []
    for setting in self.settings:
      for warmup in self.warmups:
        if warmup == "sft" and setting not in self.warmup_settings:
          continue
        for rl in self.rls:
          for loss in self.losses:
            if rl == "rlvr" and loss not in self.rl_losses:
              continue
            if rl == "unified" and (loss not in self.unified_losses or warmup != "none"):
              continue
            if warmup == "sft" and loss not in self.warmup_losses:
              continue
            ends = (self.settings[0], self.settings[-1])
            if (rl in self.ends_only or loss in self.ends_only) and setting not in ends:
              continue
            out += [(setting, warmup, rl, loss, seed) for seed in range(self.seeds)]
    return out


def teacher_dirs(world: str, dial_dir: str, setting: str) -> dict[str, str]:
  """{domain: teacher dir} of a dial setting."""
  if setting in ("lineage", "external"):
    return {d: os.path.join(world, f"{setting}_{d}") for d in tasks.DOMAINS}
  return {d: os.path.join(dial_dir, f"{setting}_{d}") for d in tasks.DOMAINS}


def write_validation(world: str, path: str, per_domain: int, seed: int = 4242) -> str:
  """Validation prompts: `per_domain` distinct problems per domain, none of them a training
  or a test prompt of the world (the lr sweep scores on these, never on the test prompts)."""
  taken = set()
  for name in ("train.jsonl", "eval.jsonl"):
    with open(os.path.join(world, name)) as f:
      taken |= {json.loads(line)["prompt"] for line in f if line.strip()}
  rng = random.Random(seed)
  rows = []
  for domain in tasks.DOMAINS:
    seen = set()
    while len(seen) < per_domain:
      prompt, answer = tasks.make_problem(domain, rng)
      if prompt not in taken and prompt not in seen:
        seen.add(prompt)
        rows.append({"domain": domain, "prompt": prompt, "answer": answer})
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  os.replace(tmp, path)
  return path


def _teachers(config, teachers: dict[str, str]) -> None:
  """Points the config's teachers at `teachers` ({domain: dir}); another set of domains (a
  world other than the default, `jdistill.experiments.merge_ten`) replaces them, each with the
  settings of the config's first teacher."""
  if teachers and set(teachers) != set(config.teachers.keys()):
    template = next(iter(config.teachers.values())).to_dict()
    config.teachers = ml_collections.ConfigDict(
      {d: dict(template, path=path, domains=d) for d, path in teachers.items()}
    )
  for d, path in teachers.items():
    config.teachers[d].path = path


def rlvr_config(world, teachers, out_dir, seed, lr, grid: Grid, eval_files: str):
  """Pure GRPO (no teacher term) over all domains, PPO clip 0.2: Ultra's RLVR stage."""
  c = loss_grid.opd_config(world, "lineage", "reverse_kl", os.path.join(world, "base"),
                           out_dir, seed, grid.loss_grid())  # fmt: skip
  _teachers(c, teachers)
  c.stage = "rlvr"
  c.data.eval_files = eval_files
  c.export_dir = os.path.join(out_dir, "final")
  c.train.steps = grid.rl_steps
  c.optimizer.lr = lr
  c.optimizer.warmup_steps = min(5, grid.rl_steps)
  c.rl.group_size = grid.rl_group
  c.rl.verifier = loss_grid.VERIFIER
  c.rl.reward_weight = 1.0
  c.rl.eval_prompts = 64
  c.loss.kl_weight = 0.0
  c.loss.clip_eps = 0.2
  return c


def rlvr_student(exp, world, teachers, seed, lr, grid: Grid, eval_files: str) -> tuple[str, dict]:
  """The base after the rlvr arm's GRPO (cached per seed and lr; no teacher term, so every
  dial setting shares it) → (its dir, the stage summary)."""
  from jdistill.stages import run_stage

  out = os.path.join(exp, "rlvr", f"lr{lr:g}", f"seed{seed}")
  config = rlvr_config(world, teachers, out, seed, lr, grid, eval_files)
  summary = loss_grid._once(config, out, run_stage)
  return config.export_dir, summary


def unified_config(world, teachers, out_dir, seed, lr, grid: Grid, eval_files, loss, steps):
  """The unified arm's one stage: GRPO over all domains (group reward advantage, w_R = 1, PPO
  clip 0.2) whose objective adds the teachers' term: `reverse_kl` as a full-vocab reverse KL
  loss to each row's teacher (rl.dense_weight = 1), `sampled_token` as λ = 1 times the
  per-token advantage sg[log p_T − log q], IcePop 5 as Ultra's MOPD."""
  c = rlvr_config(world, teachers, out_dir, seed, lr, grid, eval_files)
  c.train.steps = steps
  c.optimizer.warmup_steps = min(5, steps)
  if loss == "reverse_kl":
    c.rl.dense_weight = 1.0
  elif loss == "sampled_token":
    c.loss.kl_weight = 1.0
    c.loss.icepop_c = 5.0
  else:
    raise ValueError(f"unified loss {loss!r}; allowed: ['reverse_kl', 'sampled_token']")
  return c


def unified_steps(grid: Grid, world: str) -> int:
  """GRPO steps of the unified arm: as many student tokens as `budget_steps` OPD steps."""
  lg = grid.loss_grid()
  opd = loss_grid.opd_config(world, "lineage", "reverse_kl", "", "", 0, lg)
  rl_cfg = rlvr_config(world, {}, "", 0, 1e-3, grid, "")
  return round(grid.budget_steps * budget.step_tokens(opd) / budget.step_tokens(rl_cfg))


def run_unified(world, teachers, loss, out, seed, lr, grid: Grid, eval_files, noise=0) -> dict:
  """The unified arm from the base: its stage (cached under `out`/unified), scored before
  and after as `run_opd` scores a cell (the noise is its distillation term's, at the start)."""
  from jdistill.stages import run_stage

  steps = unified_steps(grid, world)
  base = os.path.join(world, "base")
  start = run_opd(world, teachers, loss, base, os.path.join(out, "start"), seed, lr, 0, grid,
                  eval_files, noise=noise)  # fmt: skip
  config = unified_config(world, teachers, os.path.join(out, "unified"), seed, lr, grid,
                          eval_files, loss, steps)  # fmt: skip
  loss_grid._once(config, os.path.join(out, "unified"), run_stage)
  end = run_opd(world, teachers, loss, config.export_dir, os.path.join(out, "end"), seed, lr, 0,
                grid, eval_files)  # fmt: skip
  rl_tokens = budget.step_tokens(config) * steps
  return dict(
    start, accuracy=end["accuracy"], overlap_after=end["overlap_before"], unified_steps=steps,
    rl_student_tokens=rl_tokens, opd_student_tokens=0, teacher_tokens=rl_tokens,
  )  # fmt: skip


def _teacher_data(exp, world, setting, teachers, grid: Grid) -> str:
  """The setting's teachers' verified completions of the training prompts (generated once)."""
  from jdistill.stages import generate, run_stage

  gen = loss_grid.generate_config(
    world, "lineage", os.path.join(exp, setting, "teacher_data"), grid.loss_grid()
  )
  _teachers(gen, teachers)
  loss_grid._once(gen, gen.generate.out_dir, run_stage)
  _stamp_teachers(gen.generate.out_dir, teachers)
  return ",".join(generate.output_files(gen))


def warmup_student(exp, world, setting, teachers, student, tag, seed, lr, grid: Grid) -> str:
  """`student` after warmup SFT at `lr` on the setting's teachers' verified completions
  (cached)."""
  from jdistill.stages import run_stage

  lg = grid.loss_grid()
  files = _teacher_data(exp, world, setting, teachers, grid)
  out = os.path.join(exp, setting, "warmup_sft", f"{tag}_lr{lr:g}", f"seed{seed}")
  config = loss_grid.warmup_config(world, "lineage", "sft", files, out, seed, lg)
  _teachers(config, teachers)
  config.student.path = student
  config.optimizer.lr = lr
  loss_grid._once(config, out, run_stage)
  _stamp_teachers(out, teachers)
  return config.export_dir


def _accuracy(point: dict, domains=tasks.DOMAINS) -> dict[str, float]:
  acc = {d: point[d]["accuracy"] for d in domains}
  return dict(acc, mean=float(np.mean(list(acc.values()))))


def run_opd(
  world, teachers, loss, student, out, seed, lr, steps, grid, eval_files, noise=0, configure=None
):
  """OPD from `student` for `steps` steps at `lr` → {accuracy before/after on `eval_files`,
  overlap before/after, tokens, noise}; `configure(config)`, if given, edits the stage's config
  last (`jdistill.experiments.foreign`: a teacher's own tokenizer)."""
  from jdistill.experiments.noise import gradient_noise
  from jdistill.stages.opd import OPDTrainer

  lg = dataclasses.replace(grid.loss_grid(), lr=lr, opd_steps=max(steps, 1))  # 0: score only
  config = loss_grid.opd_config(world, "lineage", loss, student, out, seed, lg)
  _teachers(config, teachers)
  config.data.eval_files = eval_files
  config.run_mode = "new"
  if loss == "sampled_token":  # as Ultra runs it
    config.loss.clip_eps = 0.2
    config.loss.icepop_c = 5.0
  if configure is not None:
    configure(config)
  trainer = OPDTrainer(config)
  before = trainer.evaluate()
  noise_stats = gradient_noise(trainer, noise) if noise else {}
  if steps:
    trainer.run(steps=steps)
  after = trainer.evaluate() if steps else before
  domains = list(teachers)

  def overlap(point):  # NaN where a teacher has no calibrated overlap (another tokenizer's)
    if all("overlap" in point[d] for d in domains):
      return loss_grid.overlap_of(point, domains)
    return float("nan")

  return {
    "accuracy_before": _accuracy(before, domains),
    "accuracy": _accuracy(after, domains),
    "overlap_before": overlap(before),
    "overlap_after": overlap(after),
    "opd_student_tokens": budget.step_tokens(config) * steps,
    "teacher_tokens": budget.step_tokens(config) * steps,
    "noise": noise_stats,
    # where the loss's weight sits at the start: on tokens off the teachers' support
    "off_support_loss_share": float(
      np.mean([before[d].get("off_support_loss_share", np.nan) for d in domains])
    ),
    "off_support_tokens": float(np.mean([before[d].get("off_support", np.nan) for d in domains])),
  }


def opd_steps(grid: Grid, rl: str, world: str, teachers=None) -> tuple[int, int]:
  """(RL student tokens, OPD steps) of a cell of arm `rl` at the grid's budget, with
  `teachers` ({domain: dir}; default: the world's three)."""
  if rl == "none":
    return 0, grid.budget_steps
  if rl == "unified":
    rl_cfg = rlvr_config(world, {}, "", 0, 1e-3, grid, "")
    return budget.step_tokens(rl_cfg) * unified_steps(grid, world), 0
  lg = grid.loss_grid()
  opd = loss_grid.opd_config(world, "lineage", "reverse_kl", "", "", 0, lg)
  _teachers(opd, teachers or {})
  rl_cfg = rlvr_config(world, teachers or {}, "", 0, 1e-3, grid, "")
  rl_tokens = budget.step_tokens(rl_cfg) * grid.rl_steps
  rl_as_opd_steps = budget.opd_steps_for_budget(rl_tokens, 0, budget.step_tokens(opd))
  if rl_as_opd_steps >= grid.budget_steps:
    raise ValueError(f"rl_steps={grid.rl_steps} spend the whole budget of {grid.budget_steps}")
  return rl_tokens, grid.budget_steps - rl_as_opd_steps


def sweep(exp, world, dial_dir, grid: Grid, progress=print, shard=(0, 1)) -> dict | None:
  """The lr sweep on the validation split (seed 0): every loss at `lrs` at the dial's two
  ends (no RL, no warmup), RLVR at `rl_lrs` → {"table": rows, "lr": {loss: best},
  "rl_lr": best} (cached in sweep.json), or None while another shard's jobs are unfinished.
  `shard` = (i, n): run only every n-th job from the i-th ((0, 0): none, only collect)."""
  path = os.path.join(exp, "sweep.json")
  key = dataclasses.asdict(grid)
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if cached.get("grid") == key:
      return cached
  validation = os.path.join(exp, "validation.jsonl")
  ends = tuple(dict.fromkeys((grid.settings[0], grid.settings[-1])))
  jobs = [(loss, lr, s) for loss in grid.losses for lr in grid.lrs_of(loss) for s in ends]
  jobs += [("rlvr", lr, None) for lr in grid.rl_lrs]
  if "unified" in grid.rls:
    jobs += [(f"unified:{loss}", lr, s)
             for loss in grid.unified_losses for lr in grid.unified_lrs for s in ends]  # fmt: skip
  if "sft" in grid.warmups:
    jobs += [("warmup", lr, ends[-1]) for lr in grid.warmup_lrs]
  index, count = shard
  for k, (loss, lr, setting) in enumerate(jobs):
    if not count or k % count != index:  # count 0: collect only
      continue
    progress(f"sweep {k + 1}/{len(jobs)}: {loss} lr {lr:g}" + (f" at {setting}" if setting else ""))
    if loss == "rlvr":
      lineage = teacher_dirs(world, dial_dir, ends[0])
      out = os.path.join(exp, "sweep", "rlvr", f"lr{lr:g}")
      _cached(out, lambda out=out, lr=lr, lineage=lineage: run_opd(
        world, lineage, "reverse_kl", rlvr_student(exp, world, lineage, 0, lr, grid, validation)[0],
        out, 0, grid.lrs[0], 0, grid, validation), lineage)  # fmt: skip
    elif loss.startswith("unified:"):
      name = loss.split(":")[1]
      out = os.path.join(exp, "sweep", setting, f"{name}_unified", f"lr{lr:g}")
      _cached(
        out,
        lambda out=out, setting=setting, name=name, lr=lr: run_unified(
          world, teacher_dirs(world, dial_dir, setting), name, out, 0, lr, grid, validation
        ),
        teacher_dirs(world, dial_dir, setting),
      )
    elif loss == "warmup":
      teachers = teacher_dirs(world, dial_dir, setting)
      base = os.path.join(world, "base")
      out = os.path.join(exp, "sweep", "warmup", f"lr{lr:g}")
      _cached(out, lambda out=out, setting=setting, teachers=teachers, lr=lr: run_opd(
        world, teachers, "reverse_kl",
        warmup_student(exp, world, setting, teachers, base, "sweep", 0, lr, grid), out, 0,
        grid.lrs[0], 0, grid, validation,
      ), teachers)  # fmt: skip
    else:
      out = os.path.join(exp, "sweep", setting, loss, f"lr{lr:g}")
      teachers = teacher_dirs(world, dial_dir, setting)
      _cached(out, lambda out=out, teachers=teachers, loss=loss, lr=lr: run_opd(
        world, teachers, loss, os.path.join(world, "base"),
        out, 0, lr, grid.budget_steps, grid, validation), teachers)  # fmt: skip
  rows, rl_rows, warmup_rows, unified_rows = [], [], [], []  # every shard's, once all are in
  fingerprints = {s: teachers_fingerprint(teacher_dirs(world, dial_dir, s)) for s in ends}
  for loss, lr, setting in jobs:
    sub = (loss, f"lr{lr:g}") if loss in ("rlvr", "warmup") else (setting, loss, f"lr{lr:g}")
    if loss.startswith("unified:"):
      sub = (setting, f"{loss.split(':')[1]}_unified", f"lr{lr:g}")
    r = _read_cell(os.path.join(exp, "sweep", *sub), fingerprints[setting or ends[0]])
    if r is None:
      return None
    if loss == "rlvr":
      rl_rows.append({"lr": lr, "accuracy": r["accuracy"]})
    elif loss.startswith("unified:"):
      unified_rows.append({"setting": setting, "loss": loss.split(":")[1], "lr": lr, **r})
    elif loss == "warmup":
      warmup_rows.append({"lr": lr, "setting": setting, "accuracy": r["accuracy"]})
    else:
      rows.append({"setting": setting, "loss": loss, "lr": lr, **r})
  best = best_lrs(rows, grid.losses, grid.lrs_of)
  rl_lr = max(rl_rows, key=lambda r: r["accuracy"]["mean"])["lr"]
  warmup_lr = max(warmup_rows, key=lambda r: r["accuracy"]["mean"])["lr"] if warmup_rows else None
  # Phase 2, once the RLVR lr is known: the OPD lr of each RL recipe (OPD after that RLVR,
  # for the steps its budget leaves), at the same ends and lrs.
  after_rl = [(loss, lr, s) for loss in grid.rl_losses for lr in grid.lrs_of(loss) for s in ends]
  _, rl_opd_steps = opd_steps(grid, "rlvr", world)
  lineage = teacher_dirs(world, dial_dir, ends[0])
  missing = [(loss, lr, s) for loss, lr, s in after_rl
             if not os.path.exists(os.path.join(_after_rlvr_dir(exp, s, loss, rl_lr, lr),
                                                "cell.json"))]  # fmt: skip
  if missing and count:  # the RLVR student they share: built by one shard, never two at once
    if index == 0:
      rlvr_student(exp, world, lineage, 0, rl_lr, grid, validation)
    while not os.path.exists(os.path.join(exp, "rlvr", f"lr{rl_lr:g}", "seed0", "DONE.json")):
      time.sleep(20)
  for k, (loss, lr, setting) in enumerate(after_rl):
    if not count or k % count != index:
      continue
    progress(f"sweep after RLVR {k + 1}/{len(after_rl)}: {loss} lr {lr:g} at {setting}")
    out = _after_rlvr_dir(exp, setting, loss, rl_lr, lr)
    _cached(out, lambda out=out, setting=setting, loss=loss, lr=lr, lineage=lineage: run_opd(
      world, teacher_dirs(world, dial_dir, setting), loss,
      rlvr_student(exp, world, lineage, 0, rl_lr, grid, validation)[0], out, 0, lr,
      rl_opd_steps, grid, validation), teacher_dirs(world, dial_dir, setting))  # fmt: skip
  rl_rows_opd = []
  for loss, lr, setting in after_rl:
    r = _read_cell(_after_rlvr_dir(exp, setting, loss, rl_lr, lr), fingerprints[setting])
    if r is None:
      return None
    rl_rows_opd.append({"setting": setting, "loss": loss, "lr": lr, **r})
  best_rl = best_lrs(rl_rows_opd, grid.rl_losses, grid.lrs_of)
  lrs = {"none": best, "rlvr": best_rl}
  if unified_rows:
    lrs["unified"] = best_lrs(unified_rows, grid.unified_losses, lambda _: grid.unified_lrs)
  result = {
    "grid": key, "table": rows, "rl_table": rl_rows, "warmup_table": warmup_rows,
    "after_rl_table": rl_rows_opd, "unified_table": unified_rows, "lr": lrs,
    "rl_lr": rl_lr, "warmup_lr": warmup_lr,
  }  # fmt: skip
  write_json_atomic(path, result, indent=1)
  return result


def _after_rlvr_dir(exp, setting, loss, rl_lr, lr) -> str:
  """A sweep cell of OPD after RLVR: keyed by both lrs (a new RLVR lr makes it stale)."""
  return os.path.join(exp, "sweep", setting, f"{loss}_after_rlvr_lr{rl_lr:g}", f"lr{lr:g}")


def best_lrs(rows: list[dict], losses, lrs_of) -> dict[str, float]:
  """{loss: the lr of `lrs_of(loss)` whose rows (one per setting) have the highest mean
  validation accuracy}: one lr per recipe, chosen over the dial's ends together."""
  best = {}
  for loss in losses:
    by_lr = {
      lr: np.mean([r["accuracy"]["mean"] for r in rows if r["loss"] == loss and r["lr"] == lr])
      for lr in lrs_of(loss)
    }
    best[loss] = max(by_lr, key=by_lr.get)
  return best


def teachers_fingerprint(teachers: dict[str, str]) -> str:
  """A hash of the teachers' weights ({domain: dir} → 16 hex digits). A result's folder names
  its lrs, not its teachers: retrained teachers (the same recipe retrains to other weights)
  would otherwise find the old teachers' results."""
  h = hashlib.sha256()
  for domain in sorted(teachers):
    h.update(domain.encode())
    for path in sorted(glob.glob(os.path.join(teachers[domain], "*.safetensors"))):
      with open(path, "rb") as f:
        h.update(f.read())
  return h.hexdigest()[:16]


def _stamp_teachers(out: str, teachers: dict[str, str]) -> None:
  """Marks `out`, a finished cached stage (the teachers' SFT data, a warmup student), with its
  teachers' fingerprint, or refuses it when it was made with other teachers. Called after the
  stage: a new stage's run moves a non-empty folder aside first. A folder made before the
  stamp existed is stamped with today's teachers (nothing else to compare)."""
  path, fingerprint = os.path.join(out, "teachers_fingerprint"), teachers_fingerprint(teachers)
  if os.path.exists(path):
    with open(path) as f:
      made_with = f.read().strip()
    if made_with != fingerprint:
      raise ValueError(
        f"{out} was made with other teachers (weights {made_with}, now {fingerprint}: "
        "retrained?); move that folder aside to make it with these"
      )
    return
  os.makedirs(out, exist_ok=True)
  with atomic_write(path) as f:
    f.write(fingerprint)


def _read_cell(out: str, fingerprint: str | None) -> dict | None:
  """`out`/cell.json, or None if it is not there; refused if it records teachers other than
  `fingerprint`'s (a restored result, or a call without a fingerprint, compares nothing)."""
  path = os.path.join(out, "cell.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    cached = json.load(f)
  made_with = cached.get("teachers_fingerprint")
  if fingerprint is not None and made_with is not None and made_with != fingerprint:
    raise ValueError(
      f"{path} was computed with other teachers (weights {made_with}, now {fingerprint}: "
      "retrained?); move that folder aside to compute it with these"
    )
  return cached


def _cached(out: str, compute, teachers: dict[str, str] | None = None) -> dict:
  """`out`/cell.json, computed once. With `teachers`, the result records their fingerprint and
  a cached one made with other teachers is refused (`_read_cell`)."""
  fingerprint = teachers_fingerprint(teachers) if teachers is not None else None
  cached = _read_cell(out, fingerprint)
  if cached is not None:
    return cached
  t0 = time.time()
  result = dict(compute(), wall_s=time.time() - t0)
  if fingerprint is not None:
    result["teachers_fingerprint"] = fingerprint
  os.makedirs(out, exist_ok=True)
  write_json_atomic(os.path.join(out, "cell.json"), result)
  return result


def cell_dir(exp, cell, lr, rl_lr, warmup_lr) -> str:
  """A cell's folder, keyed by every lr it ran at (a new sweep choice makes it stale)."""
  setting, warmup, rl, loss, seed = cell
  rl_tag = f"rl_{rl}" + (f"_lr{rl_lr:g}" if rl == "rlvr" else "")
  warmup_tag = f"warmup_{warmup}" + (f"_lr{warmup_lr:g}" if warmup == "sft" else "")
  return os.path.join(exp, "cells", setting, warmup_tag, rl_tag, f"{loss}_lr{lr:g}", f"seed{seed}")


def run_cell(
  exp, world, dial_dir, cell, lrs: dict, rl_lr: float, grid: Grid, overlaps, warmup_lr=3e-4,
  cached_only: bool = False,
) -> dict | None:  # fmt: skip
  """One cell (cached): RL, warmup, OPD at its recipe's lr `lrs[rl][loss]`. `cached_only`:
  None for a cell not yet computed (a report of what a running grid has)."""
  setting, warmup, rl, loss, seed = cell
  lr = lrs[rl][loss]
  out = cell_dir(exp, cell, lr, rl_lr, warmup_lr)
  rl_tag = f"rl_{rl}" + (f"_lr{rl_lr:g}" if rl == "rlvr" else "")
  teachers = teacher_dirs(world, dial_dir, setting)
  test = os.path.join(world, "eval.jsonl")

  def compute():
    t0 = time.time()
    if rl == "unified":
      r = run_unified(world, teachers, loss, out, seed, lr, grid, test, noise=grid.noise_batches)
      r["student_tokens"] = r["rl_student_tokens"]
      r["opd_steps"] = 0
      r["stages_wall_s"] = time.time() - t0
      return r
    student, rl_tokens = os.path.join(world, "base"), 0
    if rl == "rlvr":
      student, _ = rlvr_student(exp, world, teachers, seed, rl_lr, grid, test)
    rl_tokens, steps = opd_steps(grid, rl, world)
    if warmup == "sft":
      student = warmup_student(
        exp, world, setting, teachers, student, rl_tag, seed, warmup_lr, grid
      )
    r = run_opd(world, teachers, loss, student, out, seed, lr, steps, grid, test,
                noise=grid.noise_batches)  # fmt: skip
    r["rl_student_tokens"] = rl_tokens
    r["student_tokens"] = rl_tokens + r["opd_student_tokens"]
    r["opd_steps"] = steps
    r["stages_wall_s"] = time.time() - t0
    return r

  if cached_only and not os.path.exists(os.path.join(out, "cell.json")):
    return None
  r = _cached(out, compute, teachers)
  alpha = dial._alpha(setting)
  return {
    "setting": setting, "alpha": 0.0 if setting == "lineage" else alpha,
    "overlap": overlaps[setting], "loss": loss, "rl": rl, "warmup": warmup, "seed": seed,
    "lr": lr, **r,
  }  # fmt: skip


_CELL_KEYS = ("setting", "alpha", "overlap", "loss", "rl", "warmup", "seed", "lr")


# The grid's fields a cell's or sweep run's result depends on beyond the lrs its path names:
# a restored result is only valid for a grid that has the same.
RESULT_FIELDS = ("budget_steps", "rl_steps", "rl_group", "warmup_steps", "validation_per_domain",
                 "noise_batches", "slots_per_teacher", "max_new_tokens")  # fmt: skip


def restore(exp: str, results_path: str, grid: Grid) -> int:
  """Writes under `exp` the cached result of every cell and sweep run a finished grid's
  results.json holds (each marked `restored`; a result already there is kept) → how many.
  A grid changed since in what it runs (more lrs, seeds, settings) then computes only what it
  adds: the paths key every lr a result depends on, so a new sweep choice finds none of the
  old results. A grid that changed how a run runs (`RESULT_FIELDS`) is refused, naming it."""
  with open(results_path) as f:
    done = json.load(f)
  swept, written = done["sweep"], 0
  for name in RESULT_FIELDS:
    if swept["grid"][name] != getattr(grid, name):
      raise ValueError(
        f"{results_path} ran with {name}={swept['grid'][name]}, this grid has "
        f"{getattr(grid, name)}: its results are not this grid's (restore none, or run as it)"
      )

  def put(out, r, drop):
    nonlocal written
    path = os.path.join(out, "cell.json")
    if not os.path.exists(path):
      os.makedirs(out, exist_ok=True)
      write_json_atomic(path, {**{k: v for k, v in r.items() if k not in drop}, "restored": True})
      written += 1

  for c in done["cells"]:
    cell = tuple(c[k] for k in ("setting", "warmup", "rl", "loss", "seed"))
    put(cell_dir(exp, cell, c["lr"], swept["rl_lr"], swept["warmup_lr"]), c, _CELL_KEYS)
  row_keys = ("setting", "loss", "lr")
  sweep_dir = os.path.join(exp, "sweep")
  for r in swept["table"]:
    put(os.path.join(sweep_dir, r["setting"], r["loss"], f"lr{r['lr']:g}"), r, row_keys)
  for r in swept["after_rl_table"]:
    put(_after_rlvr_dir(exp, r["setting"], r["loss"], swept["rl_lr"], r["lr"]), r, row_keys)
  for r in swept["unified_table"]:
    put(os.path.join(sweep_dir, r["setting"], f"{r['loss']}_unified", f"lr{r['lr']:g}"), r,
        row_keys)  # fmt: skip
  for r in swept["rl_table"]:
    put(os.path.join(sweep_dir, "rlvr", f"lr{r['lr']:g}"), r, ("lr",))
  for r in swept["warmup_table"]:
    put(os.path.join(sweep_dir, "warmup", f"lr{r['lr']:g}"), r, ("lr", "setting"))
  return written


def setting_overlaps(world, dial_dir, settings) -> dict[str, float]:
  """Each setting's measured calibrated overlap with the base's rollouts (the dial's x-axis),
  from dial.json (measured before any stage: `jdistill.experiments.dial`)."""
  sets = {}
  paths = [os.path.join(world, "dial", "dial.json")]  # the committed dial, then those built here
  paths += [os.path.join(dial_dir, dial.summary_name(k)) for k in dial.KNOBS]
  for path in paths:
    if os.path.exists(path):
      with open(path) as f:
        sets.update(json.load(f)["sets"])
  missing = [s for s in settings if s not in sets]
  if missing:
    raise ValueError(f"settings {missing} have no measured overlap in {dial_dir}/dial.json")
  return {s: sets[s]["overlap_mean"] for s in settings}


def table(cells: list[dict]) -> str:
  """Markdown: one row per recipe and setting; accuracy mean and 95% interval over seeds,
  overlap before → after OPD, the estimator's noise, tokens and wall time."""
  head = ["setting (overlap)", "warmup", "rl", "loss", "lr", "accuracy (95% CI)",
          "overlap before → after", "grad noise", "off-support loss share", "student tokens",
          "wall s"]  # fmt: skip
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  keys = list(dict.fromkeys((c["setting"], c["warmup"], c["rl"], c["loss"]) for c in cells))
  for key in keys:
    group = [c for c in cells if (c["setting"], c["warmup"], c["rl"], c["loss"]) == key]
    acc = verdict.mean_interval([c["accuracy"]["mean"] for c in group])
    noise = [c["noise"].get("noise") for c in group if c.get("noise")]
    lines.append("| " + " | ".join([
      f"{key[0]} ({group[0]['overlap']:.2f})", key[1], key[2], key[3], f"{group[0]['lr']:g}",
      f"{acc}", f"{np.mean([c['overlap_before'] for c in group]):.2f} → "
      f"{np.mean([c['overlap_after'] for c in group]):.2f}",
      f"{np.mean(noise):.2f}" if noise else "-",
      f"{np.mean([c.get('off_support_loss_share', np.nan) for c in group]):.2f}",
      f"{int(np.mean([c['student_tokens'] for c in group])):,}",
      f"{np.mean([c['wall_s'] for c in group]):.0f}",
    ]) + " |")  # fmt: skip
  return "\n".join(lines)


def sweep_table(result: dict) -> str:
  """Markdown: every swept (recipe, lr, setting) and its validation accuracy (seed 0)."""
  lines = ["| recipe | lr | setting | validation accuracy |", "|---|---|---|---|"]
  for rl, table in (("none", result["table"]), ("rlvr", result.get("after_rl_table", []))):
    for r in table:
      chosen = " (chosen)" if result["lr"][rl][r["loss"]] == r["lr"] else ""
      name = r["loss"] + (" after RLVR" if rl == "rlvr" else "")
      lines.append(
        f"| {name} | {r['lr']:g}{chosen} | {r['setting']} | {r['accuracy']['mean']:.3f} |"
      )
  for r in result.get("unified_table", []):
    chosen = " (chosen)" if result["lr"]["unified"][r["loss"]] == r["lr"] else ""
    lines.append(
      f"| unified GRPO + {r['loss']} | {r['lr']:g}{chosen} | {r['setting']} | "
      f"{r['accuracy']['mean']:.3f} |"
    )
  for r in result["rl_table"]:
    chosen = " (chosen)" if result["rl_lr"] == r["lr"] else ""
    lines.append(f"| rlvr alone | {r['lr']:g}{chosen} | - | {r['accuracy']['mean']:.3f} |")
  for r in result.get("warmup_table", []):
    chosen = " (chosen)" if result["warmup_lr"] == r["lr"] else ""
    lines.append(
      f"| warmup SFT alone | {r['lr']:g}{chosen} | {r['setting']} | {r['accuracy']['mean']:.3f} |"
    )
  return "\n".join(lines)


def shard_of(cell, count: int) -> int:
  """The shard of a cell: by seed and RL arm, so the stages cells share (a seed's RLVR, its
  warmups) are trained by one process only."""
  _, _, rl, _, seed = cell
  return (seed + (rl != "none")) % count


def run(out: str, grid: Grid = Grid(), world: str = tw.COMMITTED, dial_dir: str = "runs/dial",
        progress=print, shard=(0, 1), report_only: bool = False) -> dict | None:  # fmt: skip
  """The sweep, then every cell not yet done; writes results.json, table.md, sweep.md,
  answer.md and the plots under `out`. `shard` = (i, n): this process runs its n-th of the
  sweep, then (once the sweep is complete) of the cells, and writes no report (run it again
  unsharded to collect). `report_only`: the report of the finished cells, computing nothing
  (the sweep must be done)."""
  t0 = time.time()
  os.makedirs(out, exist_ok=True)
  index, count = shard
  for knob, prefix in dial.PREFIX.items():  # shards find the dial built (`make experiment`)
    alphas = sorted({dial._alpha(s) for s in grid.settings if s.startswith(prefix)})
    if alphas and count == 1 and not report_only:
      dial.build(world, dial_dir, alphas, knob=knob)
  overlaps = setting_overlaps(world, dial_dir, grid.settings)
  validation = os.path.join(out, "validation.jsonl")
  if not os.path.exists(validation):
    write_validation(world, validation, grid.validation_per_domain)
  shared = grid.warmup_settings if index == 0 and not report_only else ()
  for setting in shared:  # the warmup data the shards' warmups share
    if "sft" in grid.warmups and setting in grid.settings:
      _teacher_data(out, world, setting, teacher_dirs(world, dial_dir, setting), grid)
  swept = sweep(out, world, dial_dir, grid, progress, shard)
  while swept is None:  # a shard waits for the others' share of the sweep (and runs its own
    time.sleep(20)  # share of the second phase when the first is complete)
    swept = sweep(out, world, dial_dir, grid, lambda _: None, shard)
  if report_only:  # the finished cells, whatever is still running
    found = [
      run_cell(out, world, dial_dir, cell, swept["lr"], swept["rl_lr"], grid, overlaps,
               swept["warmup_lr"], cached_only=True)
      for cell in grid.cells() + [c for c in _more_seeds(grid) if c not in grid.cells()]
    ]  # fmt: skip
    return report(out, [c for c in found if c is not None], swept, time.time() - t0)
  todo = [c for c in grid.cells() if shard_of(c, count) == index]
  for i, cell in enumerate(todo):
    elapsed = time.time() - t0
    progress(f"question cell {i + 1}/{len(todo)}: {cell} ({elapsed / 60:.1f} min so far)")
    run_cell(out, world, dial_dir, cell, swept["lr"], swept["rl_lr"], grid, overlaps,
             swept["warmup_lr"])  # fmt: skip

  def finished(todo):
    found = [run_cell(out, world, dial_dir, c, swept["lr"], swept["rl_lr"], grid, overlaps,
                      swept["warmup_lr"], cached_only=True) for c in todo]  # fmt: skip
    return None if None in found else found

  everything = finished(grid.cells())
  while everything is None:  # a shard waits for the others' cells: the extra seeds need all
    time.sleep(20)
    everything = finished(grid.cells())
  extra = [c for c in straddling_cells(everything, grid) if shard_of(c, count) == index]
  for cell in extra:  # more seeds where an interval straddles zero
    progress(f"question cell (more seeds): {cell}")
    run_cell(out, world, dial_dir, cell, swept["lr"], swept["rl_lr"], grid, overlaps,
             swept["warmup_lr"])  # fmt: skip
  if count > 1:
    return None
  return report(out, everything + finished(straddling_cells(everything, grid)), swept,
                time.time() - t0)  # fmt: skip


def _more_seeds(grid: Grid) -> list[tuple]:
  """Every cell the extra seeds could add (a report finds those that ran)."""
  extra = range(grid.seeds, grid.seeds_if_straddling)
  return [(*c[:4], seed) for c in grid.cells() if c[4] == 0 for seed in extra]


def straddling_cells(cells: list[dict], grid: Grid) -> list[tuple]:
  """More seeds (`seeds` … `seeds_if_straddling` − 1) for the comparisons the answer makes
  whose finite 95% interval straddles zero at a setting: no-RL vs each RL arm (the arm's
  losses, no warmup) and full-vocab vs each other loss (no RL, no warmup) → the cells of
  both arms."""
  p = verdict.Params()
  cold = [c for c in cells if c["warmup"] == "none"]
  arm_losses = {"rlvr": grid.rl_losses, "unified": grid.unified_losses}
  comparisons = [
    ("rl", "none", arm, [c for c in cold if c["rl"] in ("none", arm)],
     lambda c, arm=arm: c[2] in ("none", arm) and c[3] in arm_losses[arm])
    for arm in arm_losses if arm in grid.rls
  ]  # fmt: skip
  no_rl = [c for c in cold if c["rl"] == "none"]
  for other in (p.sampled, *(x for x in verdict.OTHER_LOSSES if x in grid.losses)):
    comparisons.append(
      ("loss", p.full_vocab, other, no_rl,
       lambda c, other=other: c[2] == "none" and c[3] in (p.full_vocab, other))
    )  # fmt: skip
  wanted = set()
  for factor, a, b, pool, member in comparisons:
    for _, d, group in verdict._per_setting(pool, "accuracy", factor, a, b, p):
      if np.isfinite(d.lo) and d.lo < 0 < d.hi:
        setting = group[0]["setting"]
        wanted |= {c[:4] for c in grid.cells() if c[0] == setting and c[1] == "none" and member(c)}
  extra = range(grid.seeds, grid.seeds_if_straddling)
  return [(*key, seed) for key in sorted(wanted) for seed in extra]


def _recipe(c: dict) -> str:
  return f"{c['loss']}, rl {c['rl']}, warmup {c['warmup']}"


def plot(cells: list[dict], out: str) -> str:
  """answer.png: (left) test accuracy vs the setting's measured overlap per recipe, mean and
  95% interval band over seeds; (middle) full-vocab − sampled-token and (right) each RL arm −
  no RL (equal budget) accuracy per setting, with intervals, no warmup."""
  from jdistill.runtime.plots import plt

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  ax = axes[0]
  for recipe in dict.fromkeys(map(_recipe, cells)):
    group = [c for c in cells if _recipe(c) == recipe]
    xs = sorted({c["overlap"] for c in group})
    iv = [verdict.mean_interval([c["accuracy"]["mean"] for c in group if c["overlap"] == x])
          for x in xs]  # fmt: skip
    ax.plot(xs, [i.mean for i in iv], marker="o", label=recipe)
    lo = [max(i.lo, 0.0) if np.isfinite(i.lo) else i.mean for i in iv]
    hi = [min(i.hi, 1.0) if np.isfinite(i.hi) else i.mean for i in iv]
    ax.fill_between(xs, lo, hi, alpha=0.15)
  ax.set_xlabel("teachers' overlap with the base's rollouts (1 − TV)")
  ax.set_ylabel("test accuracy (mean of domains)")
  ax.set_title("accuracy after the recipe, 95% CI over seeds")
  ax.legend(fontsize=7)
  cold = [c for c in cells if c["warmup"] == "none"]
  p = verdict.Params()
  panels = (
    (axes[1], "loss", [(p.full_vocab, p.sampled)], "full-vocab − sampled-token (no RL, no warmup)"),
    (axes[2], "rl", [(arm, "none") for arm in RLS[1:]], "RL arm − no RL, equal budget (no warmup)"),
  )  # fmt: skip
  for ax, factor, pairs, title in panels:
    for k, (a, b) in enumerate(pairs):
      pool = [c for c in cold if factor == "rl" or c["rl"] == "none"]
      points = verdict.per_setting(pool, "accuracy", factor, a, b, p)
      if not points:
        continue
      ax.errorbar(
        [o + 0.005 * k for o, _ in points], [d.mean for _, d in points], capsize=4, marker="o",
        label=f"{a} − {b}",
        yerr=np.array([[d.mean - d.lo, d.hi - d.mean] if np.isfinite(d.lo) else [0, 0]
                       for _, d in points]).T.reshape(2, -1),
      )  # fmt: skip
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("overlap")
    ax.set_ylabel("accuracy difference")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(out, "answer.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def report(out: str, cells: list[dict], swept: dict, seconds: float) -> dict:
  summary = {"cells": cells, "sweep": swept, "seconds": seconds}
  write_json_atomic(os.path.join(out, "results.json"), summary, indent=1)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(table(cells) + "\n")
  with open(os.path.join(out, "sweep.md"), "w") as f:
    f.write(sweep_table(swept) + "\n")
  verdict.write_answer(cells, os.path.join(out, "answer.md"))
  plot(cells, out)
  return summary


def main(argv):
  del argv
  from absl import flags
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  grid = dataclasses.replace(
    Grid(), seeds=f.seeds, settings=tuple(f.settings), losses=tuple(f.losses),
    budget_steps=f.budget_steps, rl_steps=f.rl_steps,
  )  # fmt: skip
  index, count = (int(x) for x in f.shard.split("/"))
  for path in f.restore:
    print(f"question: {restore(f.out, path, grid)} results restored from {path}")
  result = run(f.out, grid, dial_dir=f.dial, shard=(index, count), report_only=f.report_only)
  if result is None:
    print(f"question: shard {index}/{count} done; run again without --shard to collect")
    return
  print(table(result["cells"]))
  with open(os.path.join(f.out, "answer.md")) as fh:
    print(fh.read())
  print(f"question: {len(result['cells'])} cells in {result['seconds'] / 60:.1f} min; "
        f"outputs in {f.out}")  # fmt: skip


def cli():
  from absl import app, flags

  flags.DEFINE_string("out", "runs/question", "Output directory (finished work is reused).")
  flags.DEFINE_string("dial", "runs/dial", "The dial's directory (its teachers are built there).")
  flags.DEFINE_integer("seeds", Grid.seeds, "Seeds per recipe.")
  flags.DEFINE_list("settings", list(Grid.settings), "Dial settings (teacher sets).")
  flags.DEFINE_list("losses", list(Grid.losses), "OPD losses.")
  flags.DEFINE_integer("budget_steps", Grid.budget_steps, "OPD steps' worth of student tokens.")
  flags.DEFINE_integer("rl_steps", Grid.rl_steps, "GRPO steps of the rlvr arm.")
  flags.DEFINE_bool("report_only", False, "Report the finished cells; compute nothing.")
  flags.DEFINE_list(
    "restore",
    [],
    "Finished grids' results.json files, in order (e.g. docs/results/results.json): their "
    "cells and sweep runs are reused; only what the grid adds since is computed.",
  )
  flags.DEFINE_string("shard", "0/1", "i/n: run every n-th job from the i-th (parallel runs).")
  app.run(main)


if __name__ == "__main__":
  cli()

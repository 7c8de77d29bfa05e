"""Equal budget: every recipe at one dial setting samples the same number of student tokens.

Student RL is not free: a recipe that runs RLVR before OPD samples student tokens in both
stages, so a recipe without RL only "skips RL" fairly when it spends those tokens on more OPD
steps. Per cell (the results format of `jdistill.experiments.verdict`):

  rl_student_tokens    completion tokens the student sampled in its RL stage (0 without RL)
  opd_student_tokens   completion tokens the student sampled in OPD
  student_tokens       their sum: the budget compared across recipes
  teacher_tokens       tokens the teachers scored (reported, not equalised)
  wall_s               wall time of the cell (reported, not equalised)

`opd_steps_for_budget` gives the OPD steps of the recipe without RL; `check_equal_budget`
flags dial settings whose cells differ by more than a tolerance.
"""

from __future__ import annotations

import math
from collections import defaultdict


def cell_budget(cell: dict) -> dict:
  """The cell's budget: student tokens sampled across RL and OPD, teacher tokens scored, wall
  seconds. `student_tokens`, when present, must equal the sum of its two parts."""
  rl = int(cell.get("rl_student_tokens", 0))
  opd = int(cell.get("opd_student_tokens", 0))
  total = rl + opd
  if "student_tokens" in cell:
    if (rl or opd) and int(cell["student_tokens"]) != total:
      raise ValueError(
        f"cell student_tokens={cell['student_tokens']} != rl_student_tokens {rl} + "
        f"opd_student_tokens {opd}"
      )
    total = int(cell["student_tokens"])
  return {
    "student_tokens": total,
    "rl_student_tokens": rl,
    "opd_student_tokens": opd,
    "teacher_tokens": int(cell.get("teacher_tokens", 0)),
    "wall_s": float(cell.get("wall_s", 0.0)),
  }


def step_tokens(config) -> int:
  """Student completion tokens one step of `config.stage` samples at full length (the exact
  count with `sampling.stop_at_eos=False`; an upper bound otherwise): OPD samples one rollout
  per prompt, `data.slots_per_teacher` prompts per teacher; RLVR `rl.group_size` per prompt,
  per teacher group (one group without teachers). A multi-turn episode
  (`episode.environment`) counts its model turns' bound: `episode.max_turns` turns of
  `sampling.max_new_tokens`, at most `episode.max_total_tokens` (the environment's excluded)."""
  groups = max(len(config.teachers.keys()), 1)
  rows = config.data.slots_per_teacher * groups
  if config.stage == "rlvr":
    rows *= config.rl.group_size
  elif config.stage != "opd":
    raise ValueError(f"config.stage={config.stage!r}: only opd and rlvr sample the student")
  per_row = config.sampling.max_new_tokens
  if config.get("episode") and config.episode.environment:
    per_row = min(config.episode.max_turns * per_row, config.episode.max_total_tokens)
  return rows * per_row


def opd_steps_for_budget(rl_stage_tokens: int, rl_opd_steps: int, opd_tokens_per_step: int) -> int:
  """OPD steps of the recipe without RL so it samples as many student tokens as a recipe that
  spent `rl_stage_tokens` in RL and then ran `rl_opd_steps` OPD steps of
  `opd_tokens_per_step` each. Raises when the RL tokens are not a whole number of OPD steps
  (pick step sizes that divide, so the budgets are equal exactly, not approximately)."""
  if opd_tokens_per_step <= 0 or rl_stage_tokens < 0 or rl_opd_steps < 0:
    raise ValueError(
      f"opd_tokens_per_step={opd_tokens_per_step} must be > 0 and rl_stage_tokens="
      f"{rl_stage_tokens}, rl_opd_steps={rl_opd_steps} >= 0"
    )
  extra, rest = divmod(rl_stage_tokens, opd_tokens_per_step)
  if rest:
    raise ValueError(
      f"rl_stage_tokens={rl_stage_tokens} is not a multiple of opd_tokens_per_step="
      f"{opd_tokens_per_step} ({rest} tokens left over): the budgets could not be equal"
    )
  return rl_opd_steps + extra


def setting_of(cell: dict):
  """The dial setting a cell belongs to: its `setting` name when given (e.g. "foreign" for a
  teacher set off the dial), else its `alpha`, else its measured overlap (3 decimals)."""
  if cell.get("setting") is not None:
    return ("setting", str(cell["setting"]))
  alpha = cell.get("alpha")
  return ("alpha", float(alpha)) if alpha is not None else ("overlap", round(cell["overlap"], 3))


def check_equal_budget(cells: list[dict], tolerance: float = 0.05) -> list[dict]:
  """Dial settings whose cells' student tokens (RL + OPD) differ by more than `tolerance`
  (relative to the smallest) → one flag per setting: {setting, min, max, spread, cells}
  (`cells`: (loss, rl, warmup, seed) of the smallest and the largest). Empty: budgets equal."""
  by_setting = defaultdict(list)
  for cell in cells:
    by_setting[setting_of(cell)].append(cell)
  flags = []
  for setting, group in sorted(by_setting.items()):
    tokens = [(cell_budget(c)["student_tokens"], c) for c in group]
    (low, lo_cell), (high, hi_cell) = min(tokens, key=_first), max(tokens, key=_first)
    spread = math.inf if low == 0 and high > 0 else (high - low) / max(low, 1)
    if spread > tolerance:
      flags.append(
        {
          "setting": setting,
          "min": low,
          "max": high,
          "spread": spread,
          "cells": [_recipe(lo_cell), _recipe(hi_cell)],
        }
      )
  return flags


def _first(pair):
  return pair[0]


def _recipe(cell: dict) -> tuple:
  return (cell.get("loss"), cell.get("rl"), cell.get("warmup"), cell.get("seed"))

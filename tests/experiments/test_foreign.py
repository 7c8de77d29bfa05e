"""The foreign-tokenizer experiment's verdicts and report, on constructed cells (the run itself
is `python -m jdistill foreign`: minutes of training, docs/results/foreign.md)."""

import numpy as np
from scipy import stats

from jdistill.experiments import foreign


def _cells(after: dict[str, list[float]], before: float = 0.03) -> list[dict]:
  return [
    {"arm": arm, "seed": s, "lr": 1e-3, "accuracy_before": before, "accuracy": a}
    for arm, values in after.items()
    for s, a in enumerate(values)
  ]


def test_verdicts_pair_seeds_and_name_each_claim():
  """SFT well above the base and above the direct arms; the dense arm 0.2 below its char
  twin, the prefix arm level with it: every claim decided from paired per-seed differences
  (a shuffled seed order gives the same intervals, an arm's cells taken for another's do
  not)."""
  after = {
    "opd_sampled_token": [0.0, 0.02, 0.01],
    "opd_reverse_kl": [0.05, 0.10, 0.08],
    "opd_reverse_kl_prefix": [0.27, 0.32, 0.30],
    "opd_reverse_kl_marginal": [0.15, 0.20, 0.18],
    "sft": [0.70, 0.75, 0.72],
    "opd_char_twin": [0.25, 0.30, 0.28],
    "opd_world_teacher": [0.30, 0.25, 0.35],
  }
  cells = _cells(after)
  got = {v["claim"]: v for v in foreign.verdicts(cells)}
  assert got["sft raises accuracy over the base"]["verdict"] == "supported"
  assert got["opd_sampled_token raises accuracy over the base"]["verdict"] != "supported"
  assert got["opd_reverse_kl_marginal raises accuracy over the base"]["verdict"] == "supported"
  assert got["opd_reverse_kl beats sft on the teacher's data"]["verdict"] == "refuted"
  cost = got[f"the other tokenizer costs opd_reverse_kl at most {foreign.MARGIN} against its "
             "char twin"]  # fmt: skip
  assert cost["verdict"] == "refuted" and abs(cost["mean"] + 0.2) < 1e-9
  prefix = got[f"the other tokenizer costs opd_reverse_kl_prefix at most {foreign.MARGIN} "
               "against its char twin"]  # fmt: skip
  assert prefix["verdict"] == "supported" and abs(prefix["mean"] - 0.02) < 1e-9
  assert foreign.verdicts(list(reversed(cells))) == foreign.verdicts(cells)
  # paired by seed: the interval is the t-interval of the per-seed differences (unpaired,
  # Welch's, it would be wider), and shuffling one arm's seeds changes it
  pair = got["opd_reverse_kl beats sft on the teacher's data"]
  diffs = np.subtract(after["opd_reverse_kl"], after["sft"])
  half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
  np.testing.assert_allclose([pair["lo"], pair["hi"]], [diffs.mean() - half, diffs.mean() + half])
  shuffled = [dict(c, seed=(c["seed"] + 1) % 3) if c["arm"] == "sft" else c for c in cells]
  moved = {v["claim"]: v for v in foreign.verdicts(shuffled)}
  assert moved["opd_reverse_kl beats sft on the teacher's data"]["lo"] != pair["lo"]


def test_report_has_every_arm_and_verdict():
  after = {a: [0.1, 0.2, 0.3] for a in foreign.ARMS}
  cells = _cells(after)
  teacher = {"vocab": 400, "accuracy": {"reverse": 0.9}}
  summary = {
    "grid": {"domain": "reverse", "style": "plain", "teacher_steps": 500, "steps": 200,
             "rows": 16},
    "teachers": {"foreign": teacher, "char": dict(teacher, vocab=261)},
    "chosen_lr": {a: 1e-3 for a in foreign.ARMS},
    "sweep": [dict(c, lr=1e-3) for c in cells if c["seed"] == 0],
    "cells": cells,
    "verdicts": foreign.verdicts(cells),
    "seconds": 1.0,
  }  # fmt: skip
  text = foreign.report(summary)
  for a in foreign.ARMS:
    assert f"| {a} | 0.001 (0.001: 0.10) | 0.03 | 0.20 [" in text
  assert text.count("| inconclusive |") + text.count("| supported |") == len(summary["verdicts"])


def test_an_output_folder_of_another_grid_is_refused(tmp_path):
  """Its cached teachers and cells are another domain's (or style's, steps'): refused, named."""
  import dataclasses

  import pytest

  foreign._check_grid(str(tmp_path), foreign.Grid())
  foreign._check_grid(str(tmp_path), foreign.Grid())  # the same grid: fine
  with pytest.raises(ValueError, match=r"another grid's work: \{'domain': \('reverse', 'add'\)"):
    foreign._check_grid(str(tmp_path), dataclasses.replace(foreign.Grid(), domain="add"))

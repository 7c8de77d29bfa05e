"""The foreign-tokenizer experiment's verdicts and report, on constructed cells (the run itself
is `python -m jdistill foreign`: minutes of training, docs/results/foreign.md)."""

from jdistill.experiments import foreign


def _cells(after: dict[str, list[float]], before: float = 0.03) -> list[dict]:
  return [
    {"arm": arm, "seed": s, "lr": 1e-3, "accuracy_before": before, "accuracy": a}
    for arm, values in after.items()
    for s, a in enumerate(values)
  ]


def test_verdicts_pair_seeds_and_name_each_claim():
  """SFT well above the base and above both direct arms; the dense arm 0.2 below its char
  twin: every claim decided from paired per-seed differences (a shuffled seed order gives
  the same intervals, an arm's cells taken for another's do not)."""
  after = {
    "opd_sampled_token": [0.0, 0.02, 0.01],
    "opd_reverse_kl": [0.05, 0.10, 0.08],
    "sft": [0.70, 0.75, 0.72],
    "opd_char_twin": [0.25, 0.30, 0.28],
    "opd_world_teacher": [0.30, 0.25, 0.35],
  }
  cells = _cells(after)
  got = {v["claim"]: v for v in foreign.verdicts(cells)}
  assert got["sft raises accuracy over the base"]["verdict"] == "supported"
  assert got["opd_sampled_token raises accuracy over the base"]["verdict"] != "supported"
  assert got["opd_reverse_kl beats sft on the teacher's data"]["verdict"] == "refuted"
  cost = got[f"the other tokenizer costs opd_reverse_kl at most {foreign.MARGIN} against its "
             "char twin"]  # fmt: skip
  assert cost["verdict"] == "refuted" and abs(cost["mean"] + 0.2) < 1e-9
  assert foreign.verdicts(list(reversed(cells))) == foreign.verdicts(cells)
  # paired by seed: the dense arm's mean difference to sft is exactly the mean of the pairs
  pair = got["opd_reverse_kl beats sft on the teacher's data"]
  assert abs(pair["mean"] - (0.23 - 2.17) / 3) < 1e-9 and pair["n"] == 3


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

"""Merge ten: its borrowed learning rates, and one whole (tiny) run of both recipes."""

import json
import os

from jdistill import cli
from jdistill.experiments import budget, merge_ten
from jdistill.experiments import task_world as tw

RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "results", "results.json")


def test_the_learning_rates_are_the_ones_the_question_sweep_chose():
  swept = json.load(open(RESULTS))["sweep"]
  assert merge_ten.LRS["v4_opd"] == swept["lr"]["none"]["reverse_kl"]
  assert merge_ten.LRS["ultra_mopd"] == swept["lr"]["rlvr"]["sampled_token"]
  assert merge_ten.LRS["rlvr"] == swept["rl_lr"]
  assert merge_ten.LRS["warmup_sft"] == swept["warmup_lr"]
  assert "merge_ten" in cli.TOOLS


def test_a_tiny_merge_reports_both_recipes_per_domain_at_equal_student_tokens(tmp_path):
  """Two domains, a few steps: per-domain accuracy before and after for V4 and Ultra, the
  teachers' own-domain accuracy, equal student tokens (Ultra's RL tokens included), and a
  re-run that reuses every result. Untrained teachers verify nothing, so the warmup keeps
  all their completions."""
  spec = tw.WorldSpec(
    hidden=32, layers=1, mlp=64, base_steps=4, teacher_steps=4, examples_per_domain=64,
    eval_per_domain=4, train_prompts_per_domain=16,
  )  # fmt: skip
  plan = merge_ten.Plan(
    domains=("add", "sub"), seeds=1, budget_steps=6, rl_steps=1, rl_group=2, warmup_steps=2,
    slots_per_teacher=4, warmup_data="all",
  )  # fmt: skip
  out = str(tmp_path / "merge")
  summary = merge_ten.run(out, spec, plan, log=lambda *_: None)
  domains = {"add", "sub"}
  assert set(summary["teacher_accuracy"]) == domains
  assert set(summary["base_accuracy"]) == domains | {"mean"}
  runs = {r["recipe"]: r for r in summary["runs"]}
  assert set(runs) == {"V4", "Ultra"} and len(summary["runs"]) == 2
  assert set(runs["V4"]["accuracy_before"]) == domains | {"mean"}
  for r in runs.values():
    assert set(r["accuracy"]) == domains | {"mean"}
    assert 0.0 <= r["overlap_before"] <= 1.0 and 0.0 <= r["overlap_after"] <= 1.0
  assert set(runs["Ultra"]["start_accuracy"]) == domains | {"mean"}  # after RLVR + warmup
  v4, ultra = runs["V4"], runs["Ultra"]
  assert v4["rl_student_tokens"] == 0 < ultra["rl_student_tokens"]
  assert v4["student_tokens"] == ultra["student_tokens"] > 0
  assert ultra["opd_steps"] < v4["opd_steps"] == plan.budget_steps
  assert budget.check_equal_budget([dict(r, setting="ten") for r in summary["runs"]]) == []
  table = open(os.path.join(out, "merge_ten.md")).read()
  assert "| add |" in table and "| sub |" in table and "borrowed" in table
  assert json.load(open(os.path.join(out, "merge_ten.json")))["runs"] == summary["runs"]
  again = merge_ten.run(out, spec, plan, log=lambda *_: None)
  assert again["runs"] == summary["runs"]

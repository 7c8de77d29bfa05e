"""The task world: problems, worked solutions, the verifier on hand cases, and the experiment
pipeline end to end at a very small size."""

import dataclasses
import json
import os
import random

import pytest

from jdistill.eval import verifiers
from jdistill.experiments import experiment, task_world, tasks


@pytest.mark.parametrize("style", tasks.STYLES)
def test_every_worked_solution_verifies_and_computes_the_answer(style):
  rng = random.Random(0)
  for domain in tasks.DOMAINS:
    for _ in range(200):
      prompt, answer = tasks.make_problem(domain, rng)
      assert prompt.endswith("\n")
      completion = tasks.solution(prompt, style)
      assert tasks.verify(completion, answer) == 1.0, (prompt, completion)
      assert "\n" not in completion


def test_hand_cases():
  assert tasks.solution("add 47 38\n", "plain") == "7+8=15 c1 4+3+1=8 answer: 85"
  assert tasks.solution("add 47 38\n", "external") == "8+7 is 15 so 5 up 1, 3+4+1 is 8; answer: 85"
  assert tasks.solution("reverse lamp\n", "plain") == "p m a l answer: pmal"
  assert tasks.solution("count a in abca\n", "plain") == "a1 b1 c1 a2 answer: 2"
  assert tasks.solution("count c in abab\n", "external") == "at none so 0; answer: 0"


@pytest.mark.parametrize(
  "completion, score",
  [
    ("7+8=15 c1 4+3+1=8 answer: 85", 1.0),
    ("anything at all; answer: 85", 1.0),
    ("answer:85", 1.0),
    ("answer: 85\n\n", 1.0),
    ("answer: 86", 0.0),
    ("answer: 85 and more", 0.0),  # the answer must end the completion
    ("answer: 85\nmore text", 0.0),  # ... on the last line
    ("85", 0.0),  # no answer line: malformed
    ("", 0.0),
    ("answer:", 0.0),
    ("ANSWER: 85", 0.0),
  ],
)
def test_verifier_on_hand_cases_including_malformed(completion, score):
  assert tasks.verify(completion, "85") == score
  # registered with the stages' verifiers: usable as rl.verifier / generate.verifier
  assert verifiers.get("jdistill.experiments.tasks:verify")(completion, "85") == score


def test_prompt_files_are_distinct_and_held_out_prompts_stay_out_of_training(tmp_path):
  eval_path = tasks.write_prompts(str(tmp_path / "eval.jsonl"), tasks.DOMAINS, 20, seed=0)
  records = [json.loads(line) for line in open(eval_path)]
  assert len(records) == 60 and len({r["prompt"] for r in records}) == 60
  held_out = {r["prompt"] for r in records}
  path = tasks.write_examples(
    str(tmp_path / "sft.jsonl"), ["add"], 500, seed=1, style="plain", exclude=held_out
  )
  assert not {json.loads(line)["prompt"] for line in open(path)} & held_out


TINY = task_world.WorldSpec(
  hidden=16, layers=1, heads=2, kv_heads=1, mlp=32, base_steps=2, teacher_steps=2,
  examples_per_domain=16, eval_per_domain=8, train_prompts_per_domain=16, rows_per_step=8,
  max_new_tokens=8,
)  # fmt: skip


def test_the_experiment_runs_end_to_end_and_reuses_its_cache(tmp_path):
  grid = experiment.Grid(
    losses=("reverse_kl",), worlds=("lineage", "external"),
    warmups=("none", "sft", "overlap"), seeds=1, opd_steps=2, eval_every=1, warmup_steps=2,
    slots_per_teacher=8, max_new_tokens=8, warmup_data="all",
  )  # fmt: skip
  out = str(tmp_path / "exp")
  report = experiment.run(out, grid, spec=TINY)
  cells = report["cells"]
  assert len(cells) == 6
  for cell in cells:
    assert [p["step"] for p in cell["curve"]] == [0, 1, 2]
    for point in cell["curve"]:
      for domain in tasks.DOMAINS:
        assert 0.0 <= point[domain]["accuracy"] <= 1.0
        assert 0.0 <= point[domain]["overlap"] <= 1.0 + 1e-6
  table = open(os.path.join(out, "table.md")).read().splitlines()
  assert len(table) == 2 + 2 * 3  # header, rule, one row per (world, warmup, loss)
  for name in ("accuracy.png", "overlap.png", "results.json"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  world = json.load(open(os.path.join(out, "world", "world.json")))
  assert set(world["accuracy"]) == set(task_world.model_names())

  # a second call reuses every finished piece: world, teacher data, warmups and cells
  stamps = {
    p: os.path.getmtime(p)
    for p in (
      os.path.join(out, "world", "base", "model.safetensors"),
      os.path.join(out, "lineage", "warmup_sft", "seed0", "DONE.json"),
      os.path.join(out, "external", "warmup_none", "seed0", "reverse_kl", "cell.json"),
    )
  }
  again = experiment.run(out, grid, spec=TINY)
  assert again["cells"] == cells
  assert all(os.path.getmtime(p) == t for p, t in stamps.items())


def test_the_committed_world_scores_what_world_json_says_and_sits_in_its_bands():
  """Teachers >= 0.9 greedy exact match on their own domain; the base well below."""
  from jdistill.eval.accuracy import model_accuracy

  root = task_world.COMMITTED
  world = json.load(open(os.path.join(root, "world.json")))
  assert world["spec"] == dataclasses.asdict(task_world.WorldSpec())
  records = task_world.eval_records(root)
  for name in task_world.model_names():
    got = model_accuracy(
      os.path.join(root, name), records, max_new_tokens=world["spec"]["max_new_tokens"],
      verifier="jdistill.experiments.tasks:verify",
    )  # fmt: skip
    for domain in tasks.DOMAINS:
      assert abs(got[domain]["accuracy"] - world["accuracy"][name][domain]) <= 1 / 64, name
  _check_bands(world["accuracy"])
  # pass@k: k samples at temperature 1; a teacher that is right greedily is right in some
  add = [r for r in records if r["domain"] == "add"][:16]
  got = model_accuracy(
    os.path.join(root, "lineage_add"), add, max_new_tokens=48,
    verifier="jdistill.experiments.tasks:verify", pass_k=4,
  )["add"]  # fmt: skip
  assert got["prompts"] == 16 and got["accuracy"] == 1.0 and got["pass@4"] >= 0.9


def _check_bands(accuracy):
  for domain in tasks.DOMAINS:
    for kind in ("lineage", "external"):
      assert accuracy[f"{kind}_{domain}"][domain] >= 0.9, (kind, domain, accuracy)
    assert accuracy["base"][domain] <= 0.6, (domain, accuracy["base"])


def test_a_smaller_rebuild_lands_in_the_same_bands(tmp_path):
  """`python -m jdistill task_world` from scratch, with fewer examples and teacher steps: the
  same bands as the committed world (a few minutes: the one slow test of the world)."""
  spec = task_world.WorldSpec(examples_per_domain=1000, eval_per_domain=32)
  summary = task_world.build(str(tmp_path / "world"), spec, log=lambda *_: None)
  _check_bands(summary["accuracy"])

"""The committed task world, and a smaller rebuild from scratch (the world's one slow test)."""

import dataclasses
import json
import os

from jdistill.experiments import task_world, tasks


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


def _check_bands(accuracy, domains=tasks.DOMAINS):
  """Teachers (of `domains`) >= 0.9 on their own domain; the base <= 0.6 on every domain."""
  for domain in domains:
    for kind in ("lineage", "external"):
      assert accuracy[f"{kind}_{domain}"][domain] >= 0.9, (kind, domain, accuracy)
  for domain in tasks.DOMAINS:
    assert accuracy["base"][domain] <= 0.6, (domain, accuracy["base"])


def test_a_smaller_rebuild_lands_in_the_same_bands(tmp_path):
  """`python -m jdistill task_world` from scratch with fewer examples, building the base and
  one domain's two teachers (the other domains' teachers are the same code on other data):
  the same bands as the committed world."""
  spec = task_world.WorldSpec(examples_per_domain=1000, eval_per_domain=32)
  summary = task_world.build(str(tmp_path / "world"), spec, log=lambda *_: None, domains=["add"])
  assert set(summary["accuracy"]) == {"base", "lineage_add", "external_add"}
  _check_bands(summary["accuracy"], domains=["add"])

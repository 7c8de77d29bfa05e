"""The committed task world, and a smaller rebuild from scratch (the world's one slow test)."""

import dataclasses
import json
import os

import pytest

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
  # Half the base's steps: it only has to stay weak (its band is an upper bound), and the
  # lineage teacher forked from it still reaches 1.0 by step 400. The teachers keep their 500
  # steps: the external one, from a random init, is at 0.81 after 400 (below its band).
  spec = task_world.WorldSpec(examples_per_domain=1000, eval_per_domain=32, base_steps=150)
  summary = task_world.build(str(tmp_path / "world"), spec, log=lambda *_: None, domains=["add"])
  assert set(summary["accuracy"]) == {"base", "lineage_add", "external_add"}
  _check_bands(summary["accuracy"], domains=["add"])


def _no_training(*args, **kwargs):
  raise AssertionError(f"build() trained {args[1]}")


def test_building_the_committed_worlds_spec_again_changes_nothing(tmp_path, monkeypatch):
  """The default world's hashes are what its committed artifacts carry: a build on a copy of
  it trains nothing and rewrites no file; another world's domains (`world_domains`) are
  another world: its data are written anew (for every one of its domains)."""
  import filecmp
  import shutil

  root = str(tmp_path / "world")
  shutil.copytree(task_world.COMMITTED, root)
  monkeypatch.setattr(task_world, "_train", _no_training)
  summary = task_world.build(root, log=lambda *_: None)
  assert summary == json.load(open(os.path.join(task_world.COMMITTED, "world.json")))
  same = filecmp.dircmp(root, task_world.COMMITTED)
  assert not same.diff_files and not same.left_only and not same.right_only
  for name in task_world.model_names():
    marker = os.path.join(name, "artifact.json")
    assert filecmp.cmp(os.path.join(root, marker), os.path.join(task_world.COMMITTED, marker))

  with pytest.raises(AssertionError, match="trained base"):  # the same spec, more domains
    task_world.build(root, log=lambda *_: None, world_domains=tasks.ALL_DOMAINS)
  domains = {r["domain"] for r in task_world.eval_records(root)}
  assert domains == set(tasks.ALL_DOMAINS)
  assert os.path.exists(os.path.join(root, "data", "plain_len.jsonl"))


def test_build_refuses_unknown_domains_and_kinds(tmp_path):
  root = str(tmp_path / "w")
  with pytest.raises(ValueError, match="world_domains.*'divide'"):
    task_world.build(root, world_domains=("add", "divide"))
  with pytest.raises(ValueError, match="must be among"):
    task_world.build(root, domains=("sub",))
  with pytest.raises(ValueError, match="kinds.*'forked'"):
    task_world.build(root, kinds=("forked",))

"""The agentic world (`jdistill.experiments.agentic`): expert episodes need the tool, the key
splits are disjoint, and on a small build (a lineage teacher from the committed base) a
teacher succeeds where the base fails and OPD from it raises a warmed-up student's episode
success."""

import json

import pytest

from jdistill.experiments import agentic, lookup


def test_expert_episodes_read_the_value_from_the_tool(tmp_path):
  env = agentic.world_env()
  for syntax in lookup.SYNTAXES:
    path = agentic.write_expert_episodes(str(tmp_path / f"{syntax}.jsonl"), 50, 0, syntax)
    records = [json.loads(line) for line in open(path)]
    by_key = {}
    for r in records:
      call, observation, answer = r["turns"]
      key = r["prompt"].split("of ")[1][:3]
      value = observation["text"].split("=")[1].strip()
      assert [t["origin"] for t in r["turns"]] == ["model", "environment", "model"]
      assert value not in r["prompt"] and answer["text"] == f"answer: {value}"
      by_key.setdefault(key, set()).add(value)
      # the environment reads the call in either syntax, and the answer as the episode's end
      state = env.reset({"domain": "lookup", "answer": env.table.get(key, "xx")})
      observed = env.step(state, call["text"])[0]
      assert observed == f" {key}={env.table.get(key, 'none')} "
    assert len(records) == 50
  # values are drawn per example, not per key: the table cannot be learned from the data
  path = agentic.write_expert_episodes(str(tmp_path / "many.jsonl"), 3000, 1, "get")
  values = {}
  for line in open(path):
    r = json.loads(line)
    values.setdefault(r["prompt"], set()).add(r["turns"][1]["text"])
  assert any(len(v) > 1 for v in values.values())


def test_the_key_splits_are_disjoint_and_answered_by_the_table(tmp_path):
  splits = agentic.split_keys()
  assert {k: len(v) for k, v in splits.items()} == agentic.SPLITS
  keys = [k for v in splits.values() for k in v]
  assert len(set(keys)) == len(keys)
  table = agentic.world_env().table
  for split in splits:
    for r in map(json.loads, open(agentic.write_split(str(tmp_path / f"{split}.jsonl"), split))):
      assert r["key"] in splits[split] and r["answer"] == table[r["key"]]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("agentic"))
  success = agentic.build(root, teacher_steps={"lineage": 150})
  # the warmup arm's student has seen a few expert episodes: some success, for OPD to raise
  return root, success, agentic.warm_student(root, "lineage")


def test_the_teacher_calls_the_tool_and_the_base_cannot(world):
  _, success, _ = world
  assert success["base"]["accuracy"] == 0.0 and success["base"]["pass@4"] == 0.0
  assert success["lineage_lookup"]["accuracy"] >= 0.9 and success["lineage_lookup"]["pass@4"] >= 0.9
  assert success["lineage_lookup"]["turns"] == 2.0  # a call, then the answer


def test_opd_from_the_lookup_teacher_raises_success(world):
  root, _, _ = world
  # from the warmed-up student (greedy success ~0.8): OPD without warmup needs more steps
  cell = agentic.run_cell(root, "lineage", "reverse_kl", 1e-3, 0, "validation", "sft", steps=150)
  assert 0.0 < cell["accuracy_before"] < 0.9 and cell["accuracy"] >= 0.95, cell
  assert cell["student_tokens"] == 150 * agentic.ROWS * agentic.MAX_TOTAL_TOKENS


def test_the_claim_is_refuted_only_when_the_interval_excludes_zero():
  def cells(loss, values, warmup="sft"):
    return [
      {"warmup": warmup, "kind": "lineage", "loss": loss, "accuracy": v, "seed": s}
      for s, v in enumerate(values)
    ]

  full = cells("reverse_kl", [1.0, 1.0, 0.98]) + cells("forward_kl", [1.0, 0.99, 1.0])
  lines = agentic.claim_lines(full + cells("sampled_token", [0.6, 0.55, 0.65]))
  assert len(lines) == 2 and all(line.endswith(": refuted") for line in lines)
  lines = agentic.claim_lines(full + cells("sampled_token", [1.0, 0.9, 1.0]))
  assert all(line.endswith(": inconclusive") for line in lines)
  lines = agentic.claim_lines(
    cells("reverse_kl", [0.2, 0.25, 0.3]) + cells("sampled_token", [0.6, 0.55, 0.65])
  )
  assert lines == [lines[0]] and lines[0].endswith(": supported")


def test_opd_against_rl_compares_with_the_chosen_group_size_and_its_margin():
  def cells(loss, values, kind="lineage"):
    return [
      {"warmup": "sft", "kind": kind, "loss": loss, "accuracy": v, "seed": s}
      for s, v in enumerate(values)
    ]

  opd = cells("reverse_kl", [0.95, 0.96, 0.94]) + cells("rlvr_g8", [0.96, 0.97, 0.95])
  # the variant the validation keys chose is the RL arm; another variant is not looked at
  lines = agentic.rl_lines(opd + cells("rlvr", [0.2, 0.2, 0.3]), {"lineage": "rlvr_g8"})
  assert len(lines) == 1 and "reverse_kl − rlvr_g8" in lines[0], lines
  assert lines[0].endswith(": supported")  # -0.01 [-0.03, +0.01]: within the 0.05 margin
  assert agentic.rl_lines(opd, {"lineage": "rlvr_g8"}, margin=0.0)[0].endswith(": inconclusive")
  worse = cells("reverse_kl", [0.5, 0.52, 0.51]) + cells("rlvr_g8", [0.95, 0.94, 0.96])
  assert agentic.rl_lines(worse, {"lineage": "rlvr_g8"})[0].endswith(": refuted")
  noisy = cells("reverse_kl", [0.5, 0.9, 0.7]) + cells("rlvr_g8", [0.95, 0.4, 0.96])
  assert agentic.rl_lines(noisy, {"lineage": "rlvr_g8"})[0].endswith(": inconclusive")

"""The overlap dial: its mixture data exactly, and that it orders overlap on a quick dial."""

import dataclasses
import json
import os
import time

import pytest

from jdistill.experiments import dial, task_world, tasks

WORLD = task_world.COMMITTED


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _external(row):
  return row["completion"] == tasks.solution(row["prompt"], "external")


def test_the_mixture_has_the_share_the_total_and_the_world_s_problems(tmp_path):
  held_out = {r["prompt"] for r in task_world.eval_records(WORLD)}
  n, seed = 401, 11
  chosen = {}
  for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
    path = dial.write_mixture(str(tmp_path / f"{alpha}.jsonl"), "add", n, alpha, seed, held_out)
    rows = _rows(path)
    assert len(rows) == n and {r["domain"] for r in rows} == {"add"}
    assert sum(map(_external, rows)) == round(alpha * n)
    assert all(
      _external(r) or r["completion"] == tasks.solution(r["prompt"], "plain") for r in rows
    )
    assert not {r["prompt"] for r in rows} & held_out
    chosen[alpha] = {i for i, r in enumerate(rows) if _external(r)}
  # a larger share keeps a smaller one's external rows; the ends are the world's own files
  assert chosen[0.0] <= chosen[0.25] <= chosen[0.5] <= chosen[0.75] <= chosen[1.0]
  for alpha, style in ((0.0, "plain"), (1.0, "external")):
    ref = tasks.write_examples(str(tmp_path / style), ["add"], n, seed, style, exclude=held_out)
    assert open(ref).read() == open(tmp_path / f"{alpha}.jsonl").read()
  # seeded: the same seed writes the same file, another seed another
  again = dial.write_mixture(str(tmp_path / "again"), "add", n, 0.5, seed, held_out)
  other = dial.write_mixture(str(tmp_path / "other"), "add", n, 0.5, seed + 1, held_out)
  assert open(again).read() == open(tmp_path / "0.5.jsonl").read() != open(other).read()
  with pytest.raises(ValueError, match="alpha"):
    dial.write_mixture(str(tmp_path / "bad"), "add", n, 1.5, seed)


@pytest.mark.parametrize("domain", tasks.DOMAINS)
def test_the_token_knob_renotates_a_share_of_the_step_tokens_and_keeps_the_answer(tmp_path, domain):
  n, shares = 300, {}
  for alpha in (0.0, 0.25, 0.5, 1.0):
    path = dial.write_mixture(str(tmp_path / f"{alpha}"), domain, n, alpha, 5, knob="token")
    rows = _rows(path)
    changed = total = 0
    for r in rows:
      plain = tasks.solution(r["prompt"], "plain")
      assert len(r["completion"]) == len(plain) and tasks.verify(r["completion"], "") == 0.0
      assert tasks.final_answer(r["completion"]) == tasks.final_answer(plain)
      steps = plain.rpartition(" answer:")[0]
      for a, b in zip(steps, r["completion"]):
        if a in tasks.SHIFTED:
          total += 1
          changed += a != b
          assert b in (a, tasks.SHIFTED[a])
        else:
          assert a == b
    shares[alpha] = changed / total
  assert shares[0.0] == 0.0 and shares[1.0] == 1.0
  assert abs(shares[0.25] - 0.25) < 0.03 and abs(shares[0.5] - 0.5) < 0.03
  assert dial.set_name(0.5, "token") == "notation_0.5" and dial._alpha("notation_0.5") == 0.5


# A quick dial on the committed world's base: 40 SFT steps per teacher already move the α = 1
# teachers off the base's plain style, while the α = 0 ones stay near it.
QUICK = dict(
  rows_per_domain=8, references=(), domains=("add",),
  spec=dataclasses.replace(
    dial.world_spec(WORLD), teacher_steps=40, examples_per_domain=640, max_new_tokens=32
  ),
)  # fmt: skip


def test_the_dial_orders_overlap_and_a_rerun_trains_nothing(tmp_path, monkeypatch):
  out = str(tmp_path / "dial")
  summary = dial.build(WORLD, out, (0.0, 1.0), **QUICK)
  sets = summary["sets"]
  assert set(sets) == {"alpha_0", "alpha_1"} and summary["alphas"] == [0.0, 1.0]
  assert sets["alpha_0"]["overlap_mean"] > sets["alpha_1"]["overlap_mean"] + 0.1, sets
  assert summary["monotone"] and summary["span"] == [
    sets["alpha_1"]["overlap_mean"], sets["alpha_0"]["overlap_mean"]
  ]  # fmt: skip
  for s in sets.values():
    assert set(s["accuracy"]) == set(s["overlap"]) == {"add"}
  print(dial.table(summary))
  assert json.load(open(os.path.join(out, "dial.json")))["hash"] == summary["hash"]

  def refuse(*args, **kw):
    raise AssertionError("a finished teacher was trained again")

  monkeypatch.setattr(task_world, "_train", refuse)
  t0 = time.time()
  again = dial.build(WORLD, out, (0.0, 1.0), **QUICK)
  assert again == summary and time.time() - t0 < 5

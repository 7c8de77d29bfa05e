"""The question's grid: its cells, equal budgets, the validation split, shards, one whole cell."""

import dataclasses
import json
import os
import re

import pytest

from jdistill.experiments import budget, question, tasks, verdict
from jdistill.experiments import task_world as tw

WORLD = tw.COMMITTED


def test_cells_prune_only_as_documented():
  grid = question.Grid(seeds=2)
  cells = grid.cells()
  assert len(cells) == len(set(cells))
  # warmup SFT only where the teachers' data is not the student's own style
  assert {c[0] for c in cells if c[1] == "sft"} == {"alpha_1"}
  # RL arms only with their losses, the unified arm without warmup
  assert {c[3] for c in cells if c[2] == "rlvr"} == set(grid.rl_losses)
  assert {c[3] for c in cells if c[2] == "unified"} == set(grid.unified_losses)
  assert {c[1] for c in cells if c[2] == "unified"} == {"none"}
  # every loss without RL at every setting (the ends_only ones at the dial's ends), and with
  # warmup its warmup_losses
  ends = (grid.settings[0], grid.settings[-1])
  assert {c[0] for c in cells if c[2] == "unified" or c[3] in grid.ends_only} == set(ends)
  for setting in grid.settings:
    for warmup in grid.warmups if setting in grid.warmup_settings else ("none",):
      for loss in grid.losses if warmup == "none" else grid.warmup_losses:
        if loss in grid.ends_only and setting not in ends:
          continue
        assert {c[4] for c in cells if c[:4] == (setting, warmup, "none", loss)} == {0, 1}
  other = [x for x in grid.losses if x not in grid.ends_only]
  cold = len(other) + len(grid.rl_losses)  # at every setting
  cold_ends = len(grid.losses) - len(other) + len(grid.unified_losses)  # at the ends too
  warm = len(grid.warmup_losses) + len(grid.rl_losses)
  n = len(grid.settings) * cold + 2 * cold_ends + len(grid.warmup_settings) * warm
  assert len(cells) == 2 * n


def test_rl_and_opd_tokens_sum_to_the_budget_of_the_arm_without_rl():
  grid = question.Grid()
  opd = question.loss_grid.opd_config(WORLD, "lineage", "reverse_kl", "", "", 0, grid.loss_grid())
  per_step = budget.step_tokens(opd)
  assert question.opd_steps(grid, "none", WORLD) == (0, grid.budget_steps)
  rl_tokens, steps = question.opd_steps(grid, "rlvr", WORLD)
  assert 0 < steps < grid.budget_steps and rl_tokens > 0
  assert rl_tokens + steps * per_step == grid.budget_steps * per_step
  cells = [
    {"alpha": 0.0, "rl": "none", "opd_student_tokens": grid.budget_steps * per_step},
    {"alpha": 0.0, "rl": "rlvr", "rl_student_tokens": rl_tokens,
     "opd_student_tokens": steps * per_step},
  ]  # fmt: skip
  assert budget.check_equal_budget(cells) == []
  with pytest.raises(ValueError, match="whole budget"):
    question.opd_steps(dataclasses.replace(grid, rl_steps=grid.budget_steps), "rlvr", WORLD)
  # the unified arm spends the budget in its GRPO stage, to within one GRPO step
  unified_tokens, unified_opd = question.opd_steps(grid, "unified", WORLD)
  assert unified_opd == 0
  assert abs(unified_tokens - grid.budget_steps * per_step) <= per_step * grid.rl_group / 2


def test_the_validation_split_is_apart_from_training_and_test_prompts(tmp_path):
  path = question.write_validation(WORLD, str(tmp_path / "v.jsonl"), per_domain=40)
  rows = [json.loads(line) for line in open(path)]
  taken = set()
  for name in ("train.jsonl", "eval.jsonl"):
    taken |= {json.loads(line)["prompt"] for line in open(os.path.join(WORLD, name))}
  prompts = [r["prompt"] for r in rows]
  assert len(prompts) == len(set(prompts)) == 40 * len(tasks.DOMAINS)
  assert not set(prompts) & taken
  for r in rows:  # answers the verifier accepts from the reference solution
    assert tasks.verify(tasks.solution(r["prompt"], "plain"), r["answer"]) == 1.0
  again = question.write_validation(WORLD, str(tmp_path / "w.jsonl"), per_domain=40)
  assert open(again).read() == open(path).read()


def test_shards_split_the_cells_and_keep_a_seeds_rl_in_one_process():
  cells = question.Grid().cells()
  shards = [[c for c in cells if question.shard_of(c, 2) == i] for i in range(2)]
  assert sorted(shards[0] + shards[1]) == sorted(cells)
  assert min(map(len, shards)) > 0.3 * len(cells)
  for seed in range(3):  # the stages a seed's RL cells share are trained in one shard
    owners = {question.shard_of(c, 2) for c in cells if c[4] == seed and c[2] == "rlvr"}
    assert len(owners) == 1


def test_setting_overlaps_read_the_dial_and_name_what_is_missing(tmp_path):
  overlaps = question.setting_overlaps(WORLD, str(tmp_path), ("lineage", "external"))
  assert overlaps["lineage"] > 0.8 > 0.5 > overlaps["external"]
  with pytest.raises(ValueError, match="alpha_0.3"):
    question.setting_overlaps(WORLD, str(tmp_path), ("lineage", "alpha_0.3"))


def test_a_cell_with_rlvr_and_warmup_runs_end_to_end_at_equal_budget(tmp_path, monkeypatch):
  """RLVR (1 step = 4 OPD steps of tokens) → warmup SFT → OPD for the rest of 6 steps, on the
  committed world with its external teachers; the cell has the verdict's fields."""
  monkeypatch.setattr(tw, "NUM_DEVICES", 1)  # tiny shapes run fastest unsharded
  grid = question.Grid(
    settings=("lineage", "external"), seeds=1, budget_steps=6, rl_steps=1, warmup_steps=2,
    noise_batches=1, slots_per_teacher=8,
  )  # fmt: skip
  overlaps = {"lineage": 0.83, "external": 0.29}
  cell = question.run_cell(
    str(tmp_path), WORLD, str(tmp_path), ("external", "sft", "rlvr", "sampled_token", 0),
    {"rlvr": {"sampled_token": 2e-3}}, 1e-3, grid, overlaps, 3e-4,
  )  # fmt: skip
  assert cell["opd_steps"] == 2
  assert cell["student_tokens"] == cell["rl_student_tokens"] + cell["opd_student_tokens"]
  opd = question.loss_grid.opd_config(WORLD, "lineage", "reverse_kl", "", "", 0, grid.loss_grid())
  assert cell["student_tokens"] == grid.budget_steps * budget.step_tokens(opd)
  assert cell["noise"]["noise"] > 0  # a sampled estimator is not the exact gradient
  verdict.check_cells([cell])
  assert set(cell["accuracy"]) == {*tasks.DOMAINS, "mean"}
  for stage in ("rlvr", os.path.join("external", "warmup_sft")):
    assert os.path.isdir(os.path.join(tmp_path, stage))


def test_the_unified_arm_runs_end_to_end_and_scores_its_teacher_term(tmp_path, monkeypatch):
  """One GRPO step whose objective adds the dense reverse KL to the lineage teachers: its
  tokens are the budget, its accuracy and overlap are measured after the stage."""
  monkeypatch.setattr(tw, "NUM_DEVICES", 1)  # tiny shapes run fastest unsharded
  grid = question.Grid(
    settings=("lineage",), seeds=1, budget_steps=4, noise_batches=1, slots_per_teacher=8
  )
  assert question.unified_steps(grid, WORLD) == 1
  cell = question.run_cell(
    str(tmp_path), WORLD, str(tmp_path), ("lineage", "none", "unified", "reverse_kl", 0),
    {"unified": {"reverse_kl": 2e-3}}, 1e-3, grid, {"lineage": 0.83},
  )  # fmt: skip
  verdict.check_cells([cell])
  assert cell["opd_steps"] == 0 and cell["opd_student_tokens"] == 0
  assert cell["student_tokens"] == cell["rl_student_tokens"] > 0
  config = question.unified_config(WORLD, {}, "", 0, 1e-3, grid, "", "reverse_kl", 1)
  assert config.rl.dense_weight == 1.0 and config.rl.reward_weight == 1.0
  out = os.path.join(
    tmp_path, "cells", "lineage", "warmup_none", "rl_unified", "reverse_kl_lr0.002"
  )
  summary = json.load(open(os.path.join(out, "seed0", "unified", "DONE.json")))
  assert summary["step"] == 1
  with pytest.raises(ValueError, match="unified loss 'forward_kl'"):
    question.unified_config(WORLD, {}, "", 0, 1e-3, grid, "", "forward_kl", 1)


def test_more_seeds_go_where_an_answer_s_interval_straddles_zero():
  """At 'lineage' the RL arms differ by ±0.1 across seeds (straddles zero), at 'alpha_1' by a
  steady +0.2: only lineage's cells of the two compared arms get seeds 3 and 4."""
  grid = question.Grid(settings=("lineage", "alpha_1"))
  noise = {0: 0.1, 1: -0.1, 2: 0.05}
  cells = []
  for setting, overlap in (("lineage", 0.83), ("alpha_1", 0.39)):
    for _, warmup, rl, loss, seed in [c for c in grid.cells() if c[0] == setting]:
      gain = (noise[seed] if setting == "lineage" else 0.2) if rl == "rlvr" else 0.0
      full = 0.3 if loss == "reverse_kl" else 0.0  # full-vocab clearly better: no straddle
      acc = 0.3 + gain + full
      cells.append({
        "setting": setting, "alpha": None, "overlap": overlap, "loss": loss, "rl": rl,
        "warmup": warmup, "seed": seed, "accuracy": {"mean": acc}, "overlap_before": overlap,
        "opd_student_tokens": 100,
      })  # fmt: skip
  extra = question.straddling_cells(cells, grid)
  assert {c[0] for c in extra} == {"lineage"} and {c[4] for c in extra} == {3, 4}
  assert {(c[1], c[2], c[3]) for c in extra} == {
    ("none", rl, loss) for rl in ("none", "rlvr") for loss in grid.rl_losses
  }
  # forward KL within ±0.1 of reverse KL at alpha_1: its cells and reverse KL's get seeds too
  for c in cells:
    if c["setting"] == "alpha_1" and c["loss"] == "forward_kl":
      c["accuracy"] = {"mean": 0.6 + noise[c["seed"]]}
  extra = question.straddling_cells(cells, grid)
  assert {c[:4] for c in extra if c[0] == "alpha_1"} == {
    ("alpha_1", "none", "none", loss) for loss in ("reverse_kl", "forward_kl")
  }


def test_each_recipe_gets_the_lr_best_on_validation_over_both_ends():
  """reverse_kl: 1e-3 wins on the mean of the two ends though 2e-3 wins at one of them."""
  acc = {(1e-3, "lineage"): 0.40, (1e-3, "alpha_1"): 0.10, (2e-3, "lineage"): 0.45,
         (2e-3, "alpha_1"): 0.0, (1e-4, "lineage"): 0.2, (1e-4, "alpha_1"): 0.2}  # fmt: skip
  rows = [
    {"loss": loss, "lr": lr, "setting": s, "accuracy": {"mean": a}}
    for (lr, s), a in acc.items()
    for loss in (("sampled_token",) if lr == 1e-4 else ("reverse_kl",))
  ]
  lrs_of = {"reverse_kl": (1e-3, 2e-3), "sampled_token": (1e-4,)}.get
  assert question.best_lrs(rows, ("reverse_kl", "sampled_token"), lrs_of) == {
    "reverse_kl": 1e-3, "sampled_token": 1e-4,
  }  # fmt: skip


def test_restore_reuses_the_committed_grid_and_a_new_lr_finds_nothing_stale(tmp_path):
  """The committed results.json restored into a fresh folder: the sweep collects to the same
  choices and every cell reads back as committed, computing nothing. A grid with one more RLVR
  lr needs that run; once it wins, the OPD-after-RLVR runs of the old RLVR lr are not reused.
  A grid that runs cells otherwise (another budget) is refused, naming the field."""
  results = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "results", "results.json")
  done = json.load(open(results))
  committed = done["sweep"]["grid"]  # the grid it ran (the defaults have grown since)
  grid = question.Grid(**{k: tuple(v) if isinstance(v, list) else v for k, v in committed.items()})
  exp = str(tmp_path)
  with pytest.raises(ValueError, match="budget_steps=150, this grid has 100"):
    question.restore(exp, results, dataclasses.replace(grid, budget_steps=100))
  assert question.restore(exp, results, grid) == len(done["cells"]) + sum(
    len(done["sweep"][t])
    for t in ("table", "after_rl_table", "unified_table", "rl_table", "warmup_table")
  )
  assert question.restore(exp, results, grid) == 0  # kept, never overwritten
  swept = question.sweep(exp, WORLD, str(tmp_path), grid, shard=(0, 0))
  assert swept is not None
  for key in ("lr", "rl_lr", "warmup_lr"):
    assert swept[key] == done["sweep"][key], key
  overlaps = {c["setting"]: c["overlap"] for c in done["cells"]}
  for c in done["cells"]:
    cell = tuple(c[k] for k in ("setting", "warmup", "rl", "loss", "seed"))
    got = question.run_cell(exp, WORLD, str(tmp_path), cell, swept["lr"], swept["rl_lr"], grid,
                            overlaps, swept["warmup_lr"], cached_only=True)  # fmt: skip
    assert got == {**c, "restored": True}
  wider = dataclasses.replace(grid, rl_lrs=(3e-6, *grid.rl_lrs))
  assert question.sweep(exp, WORLD, str(tmp_path), wider, shard=(0, 0)) is None
  new = os.path.join(exp, "sweep", "rlvr", "lr3e-06")
  os.makedirs(new)
  with open(os.path.join(new, "cell.json"), "w") as f:
    json.dump({"accuracy": {"mean": 0.9}}, f)  # 3e-6 wins: the runs after RLVR are made again
  assert question.sweep(exp, WORLD, str(tmp_path), wider, shard=(0, 0)) is None
  for loss, lr, setting in [
    (r["loss"], r["lr"], r["setting"]) for r in done["sweep"]["after_rl_table"]
  ]:
    path = os.path.join(question._after_rlvr_dir(exp, setting, loss, 3e-6, lr), "cell.json")
    assert not os.path.exists(path)


def _fake_teachers(root) -> dict[str, str]:
  """Two teacher folders whose weights are a few bytes (enough to be fingerprinted)."""
  teachers = {}
  for domain in ("add", "count"):
    teachers[domain] = str(root / f"teacher_{domain}")
    os.makedirs(teachers[domain])
    with open(os.path.join(teachers[domain], "model.safetensors"), "wb") as f:
      f.write(domain.encode() * 100)
  return teachers


def _retrain(teachers: dict[str, str]) -> None:
  with open(os.path.join(teachers["count"], "model.safetensors"), "r+b") as f:
    f.seek(17)
    f.write(b"\x00")  # one byte of one teacher


def test_a_result_made_with_other_teachers_is_refused_naming_its_folder(tmp_path):
  """A cell's folder names its lrs, not its teachers: a cell computed with teachers retrained
  since (other weights, same recipe) is refused, not reused; one without a fingerprint (a
  restored result) is read as it is."""
  teachers = _fake_teachers(tmp_path)
  first = question.teachers_fingerprint(teachers)
  assert first == question.teachers_fingerprint(dict(reversed(list(teachers.items()))))
  _retrain(teachers)
  assert question.teachers_fingerprint(teachers) != first

  grid = question.Grid()
  cell = ("lineage", "none", "none", "reverse_kl", 0)
  lrs = {"none": {"reverse_kl": 2e-3}}
  out = question.cell_dir(str(tmp_path / "exp"), cell, 2e-3, grid.rl_lrs[0], 3e-3)
  os.makedirs(out)
  with open(os.path.join(out, "cell.json"), "w") as f:
    json.dump({"accuracy": {"mean": 0.5}, "teachers_fingerprint": first}, f)

  def run():
    exp, overlaps = str(tmp_path / "exp"), {"lineage": 0.83}
    return question.run_cell(
      exp, WORLD, str(tmp_path), cell, lrs, grid.rl_lrs[0], grid, overlaps, 3e-3, cached_only=True
    )

  refused = re.escape(f"{out}/cell.json was computed with other teachers")
  with pytest.raises(ValueError, match=refused):
    run()
  lineage = question.teacher_dirs(WORLD, str(tmp_path), "lineage")
  with open(os.path.join(out, "cell.json"), "w") as f:
    fingerprint = question.teachers_fingerprint(lineage)
    json.dump({"accuracy": {"mean": 0.5}, "teachers_fingerprint": fingerprint}, f)
  assert run()["accuracy"] == {"mean": 0.5}
  with open(os.path.join(out, "cell.json"), "w") as f:
    json.dump({"accuracy": {"mean": 0.5}, "restored": True}, f)
  assert run()["restored"]


def test_the_sweep_collect_refuses_a_result_made_with_other_teachers(tmp_path):
  """The sweep's collect step reads every shard's results from disk: one made with other
  teachers is refused there too, naming its file; one made with these is read (and the sweep
  then waits for the next missing result: None)."""
  grid = dataclasses.replace(question.Grid(), settings=("lineage",))
  exp, loss = str(tmp_path / "exp"), grid.losses[0]
  out = os.path.join(exp, "sweep", "lineage", loss, f"lr{grid.lrs_of(loss)[0]:g}")
  os.makedirs(out)

  def write(fingerprint):
    with open(os.path.join(out, "cell.json"), "w") as f:
      json.dump({"accuracy": {"mean": 0.5}, "teachers_fingerprint": fingerprint}, f)

  def collect():  # shard (0, 0): run nothing, only collect
    return question.sweep(exp, WORLD, str(tmp_path), grid, lambda _: None, shard=(0, 0))

  write("0" * 16)
  with pytest.raises(ValueError, match=re.escape(f"{out}/cell.json was computed with other")):
    collect()
  write(question.teachers_fingerprint(question.teacher_dirs(WORLD, str(tmp_path), "lineage")))
  assert collect() is None


def test_a_warmup_student_or_its_data_made_with_other_teachers_is_refused(tmp_path, monkeypatch):
  """The warmup student and the teachers' SFT data it learns from are cached by path too:
  each finished one is stamped with its teachers' fingerprint and refused once they change."""
  made = []
  monkeypatch.setattr(question.loss_grid, "_once", lambda config, out, run: made.append(out))
  teachers = _fake_teachers(tmp_path)
  base = os.path.join(WORLD, "base")
  args = (str(tmp_path / "exp"), WORLD, "alpha_1", teachers, base, "rl_none", 0, 3e-3)
  question.warmup_student(*args, question.Grid())
  question.warmup_student(*args, question.Grid())  # the same teachers: read as made
  data, student = made[:2]
  assert made == [data, student] * 2 and "teacher_data" in data and "warmup_sft" in student
  _retrain(teachers)
  with pytest.raises(ValueError, match=re.escape(f"{data} was made with other teachers")):
    question.warmup_student(*args, question.Grid())
  os.remove(os.path.join(data, "teachers_fingerprint"))  # as if the data were made again
  with pytest.raises(ValueError, match=re.escape(f"{student} was made with other teachers")):
    question.warmup_student(*args, question.Grid())

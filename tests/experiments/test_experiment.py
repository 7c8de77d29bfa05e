"""The support-overlap experiment end to end at a very small size, and its cache."""

import json
import os

from jdistill.experiments import experiment, task_world, tasks

TINY = task_world.WorldSpec(
  hidden=16, layers=1, heads=2, kv_heads=1, mlp=32, base_steps=2, teacher_steps=2,
  examples_per_domain=16, eval_per_domain=8, train_prompts_per_domain=16, rows_per_step=8,
  max_new_tokens=8,
)  # fmt: skip


def test_the_experiment_runs_end_to_end_and_reuses_its_cache(tmp_path, monkeypatch):
  """Both worlds, no warmup and the overlap-triggered one (an SFT stage that also measures
  overlap: the fixed-length warmup is the same stage without the probe)."""
  monkeypatch.setattr(task_world, "NUM_DEVICES", 1)  # tiny shapes run fastest unsharded
  grid = experiment.Grid(
    losses=("reverse_kl",), worlds=("lineage", "external"),
    warmups=("none", "overlap"), seeds=1, opd_steps=2, eval_every=1, warmup_steps=2,
    slots_per_teacher=8, max_new_tokens=8, warmup_data="all",
  )  # fmt: skip
  out = str(tmp_path / "exp")
  report = experiment.run(out, grid, spec=TINY)
  cells = report["cells"]
  assert len(cells) == 4
  for cell in cells:
    assert [p["step"] for p in cell["curve"]] == [0, 1, 2]
    for point in cell["curve"]:
      for domain in tasks.DOMAINS:
        assert 0.0 <= point[domain]["accuracy"] <= 1.0
        assert 0.0 <= point[domain]["overlap"] <= 1.0 + 1e-6
  table = open(os.path.join(out, "table.md")).read().splitlines()
  assert len(table) == 2 + 2 * 2  # header, rule, one row per (world, warmup, loss)
  for name in ("accuracy.png", "overlap.png", "results.json"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  world = json.load(open(os.path.join(out, "world", "world.json")))
  assert set(world["accuracy"]) == set(task_world.model_names())

  # a second call reuses every finished piece: world, teacher data, warmups and cells
  stamps = {
    p: os.path.getmtime(p)
    for p in (
      os.path.join(out, "world", "base", "model.safetensors"),
      os.path.join(out, "lineage", "warmup_overlap", "seed0", "DONE.json"),
      os.path.join(out, "external", "warmup_none", "seed0", "reverse_kl", "cell.json"),
    )
  }
  again = experiment.run(out, grid, spec=TINY)
  assert again["cells"] == cells
  assert all(os.path.getmtime(p) == t for p, t in stamps.items())

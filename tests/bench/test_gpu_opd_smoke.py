"""bench/gpu_opd.py (the GPU run of issue 26) at a tiny shape on CPU, so the script cannot rot:
four stacked and four streamed teachers, bf16 rollouts, continuous batching, in one process."""

import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


NUMBERS = (
  "rollout_s",
  "teacher_forward_s",
  "train_step_s",
  "opd_step_s",
  "peak_gb",
  "train_step_model_mfu",
  "teacher_forward_model_mfu",
  "opd_tok_s",
  "loss",
)


def _gpu_opd():
  spec = importlib.util.spec_from_file_location(
    "gpu_opd", os.path.join(ROOT, "bench", "gpu_opd.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_four_stacked_and_four_streamed_teachers_bf16_continuous(tmp_path, capsys):
  rows, new = 8, 8
  report = _gpu_opd().main(
    ["--sizes", "tiny", "--teachers", "4", "--placement", "streamed,stacked",
     "--rollout_dtype", "bfloat16", "--continuous_slots", "1", "--no-compare_static",
     "--rows", str(rows), "--prompt", "8", "--new", str(new), "--remat", "none",
     "--repeats", "1", "--fast_compile", "--json", str(tmp_path / "r.json")]
  )  # fmt: skip
  out = capsys.readouterr().out
  assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(report))
  streamed, stacked = report["results"]
  assert (streamed["placement"], stacked["placement"]) == ("streamed", "stacked")
  assert streamed["teacher_layout"] == {"streamed": [0, 1, 2, 3], "memory_kinds": ["pinned_host"]}
  assert stacked["teacher_layout"] == {"groups": [[0, 1, 2, 3]], "stacked_axis": [4]}
  for r in (streamed, stacked):
    assert r["teachers"] == 4 and r["rollout_param_dtypes"] == ["bfloat16"] and r["remat"] == "none"
    # continuous batching: every prompt prefilled once into one of the 4 slots
    assert r["rollout_path"].startswith("continuous") and r["prefills"] == rows
    assert 0 < r["generated_tokens"] <= rows * r["forced_lengths_mean"]
    for k in NUMBERS:
      assert math.isfinite(r[k]) and r[k] > 0, (r["placement"], k, r[k])
    assert r["finite"] == 1.0
    # the whole step is its phases; a stacked step holds its teachers' forward
    parts = r["rollout_s"] + r["train_step_s"]
    if not r["teacher_forward_in_step"]:
      parts += r["teacher_forward_s"]
    assert r["opd_step_s"] == pytest.approx(parts)
    assert r["rollout_share"] == pytest.approx(r["rollout_s"] / r["opd_step_s"])
    assert f"goals [tiny {r['placement']}]: train step >= 45% MFU: NOT met" in out
  assert stacked["teacher_forward_in_step"] and not streamed["teacher_forward_in_step"]

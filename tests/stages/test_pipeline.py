"""Pipelines: derived stage configs, a killed pipeline resuming in its second stage with the
same result, and the overlap-triggered warmup reading right on cases with a known answer."""

import json
import os
import signal
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from jdistill.config import teacher_config
from jdistill.stages import pipeline, sft
from jdistill.testing.toy import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pipeline_config(small_world, out):
  c = tiny_config(small_world)
  c.output_dir = str(out)
  c.pipeline.stages = ("generate", "sft", "opd")
  c.pipeline.steps = (0, 12, 4)
  c.generate.model = "teachers"
  c.generate.samples_per_prompt = 1
  c.optimizer.warmup_steps = 2
  return c


def test_stage_configs_chain_folders_models_and_data(small_world, tmp_path):
  c = _pipeline_config(small_world, tmp_path / "run")
  gen, warm, opd = (pipeline.stage_config(c, k) for k in range(3))
  assert [x.output_dir for x in (gen, warm, opd)] == [
    str(tmp_path / "run" / name) for name in ("1-generate", "2-sft", "3-opd")
  ]
  assert (gen.stage, warm.stage, opd.stage) == ("generate", "sft", "opd")
  assert warm.student.path == c.student.path  # the first training stage starts from student
  assert opd.student.path == os.path.join(warm.output_dir, "final")
  assert warm.sft.train_files == ",".join(
    os.path.join(gen.output_dir, "data", t, "part-00000-of-00001.jsonl") for t in ("code", "math")
  )
  assert (warm.train.steps, opd.train.steps) == (12, 4)
  assert opd.checkpoint.dir == os.path.join(opd.output_dir, "checkpoints")
  pipeline.validate(c)
  c.pipeline.steps = (1, 2)
  with pytest.raises(ValueError, match=r"config.pipeline.steps=\(1, 2\) is invalid"):
    pipeline.validate(c)
  c.pipeline.steps = ()
  c.pipeline.stages = ("generate", "warmup")
  with pytest.raises(ValueError, match=r"config.pipeline.stages=.* allowed: stages from"):
    pipeline.validate(c)
  c.pipeline.stages = ("sft", "opd")  # an sft stage with no data and no generate before it
  with pytest.raises(ValueError, match=r"pipeline stage 1 \(sft\): config.sft.train_files"):
    pipeline.validate(c)


def _cli(small_world, out):
  env = dict(
    os.environ, JDISTILL_TOY_WORLD=os.path.dirname(small_world["student"]), JAX_PLATFORMS="cpu"
  )
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  args = [
    sys.executable, "-m", "jdistill", "pipeline", "--config=configs/pipeline_tiny.py",
    f"--config.output_dir={out}", "--config.pipeline.steps=(0, 6, 2)",
    "--config.generate.samples_per_prompt=1", "--config.sft.until_overlap=0.0",
    "--config.checkpoint.every=2", "--config.train.log_every=1",
    "--config.sampling.max_new_tokens=8", "--config.data.slots_per_teacher=2",
  ]  # fmt: skip
  return subprocess.Popen(
    args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def _final_params(out):
  from flax import nnx

  from jdistill.models import hf

  model = hf.from_hf(os.path.join(out, "3-opd", "final"))
  return jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


def test_a_pipeline_killed_in_its_second_stage_resumes_there_with_the_same_result(
  small_world, tmp_path
):
  straight = _cli(small_world, tmp_path / "straight")
  out = straight.communicate(timeout=600)[0]
  assert straight.returncode == 0, out[-3000:]
  assert "pipeline stage 3/3 (opd)" in out

  run = tmp_path / "killed"
  proc, seen = _cli(small_world, run), []
  for line in proc.stdout:  # SIGKILL (no chance to save) once SFT has logged step 5
    seen.append(line)
    if line.startswith("step 5/6"):
      proc.send_signal(signal.SIGKILL)
      break
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
  assert not os.path.exists(run / "2-sft" / "DONE.json")

  again = _cli(small_world, run)
  out2 = again.communicate(timeout=600)[0]
  assert again.returncode == 0, out2[-3000:]
  assert "pipeline stage 1/3 (generate): done earlier, skipped" in out2
  resumed = int(out2.split("stage sft, mesh")[1].split("resuming at step ")[1].split()[0])
  assert resumed in (2, 4), out2[-3000:]  # the last committed checkpoint before the kill
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    _final_params(tmp_path / "straight"),
    _final_params(run),
  )
  for name in ("1-generate", "2-sft", "3-opd"):
    summary = json.loads((run / name / "DONE.json").read_text())
    assert summary["stage"] == name.split("-")[1]
  steps = [
    r["step"] for r in map(json.loads, open(run / "2-sft" / "metrics.jsonl")) if "eval" not in r
  ]
  assert steps == [1, 2, 3, 4, 5, 6], steps  # each logged step once across both sessions


def _warmup_config(small_world, tmp_path, student: str, threshold: float):
  lines = [
    {"domain": "math", "prompt": f"math: compute {a} + {b} and explain the steps.",
     "completion": f"{a + b}"}
    for a in range(4) for b in range(4)
  ]  # fmt: skip
  data = tmp_path / "sft.jsonl"
  data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  c = tiny_config(small_world)
  c.stage = "sft"
  c.output_dir = str(tmp_path / f"warmup-{os.path.basename(student)}")
  c.student.path = student
  c.teachers = ml_collections.ConfigDict(
    {"math": teacher_config(small_world["teacher_math"], "math", param_dtype="float32")}
  )
  c.data.train_files = small_world["train"].replace("train.jsonl", "math_only.jsonl")
  with open(small_world["train"]) as f, open(c.data.train_files, "w") as out:
    out.writelines(line for line in f if '"math"' in line)
  c.data.eval_files = ""
  c.sft.train_files = str(data)
  c.sft.max_len = 64
  c.sft.rows_per_step = 8
  c.sft.until_overlap = threshold
  c.sft.overlap_every = 1
  c.sft.overlap_rows = 4
  c.optimizer.lr = 1e-6
  c.optimizer.warmup_steps = 0
  c.train.steps = 3
  c.train.log_every = 1
  return c


def test_overlap_triggered_warmup_reads_right_on_known_cases(small_world, tmp_path):
  """A student that *is* the teacher has overlap 1: it switches at the probe before the first
  step and the warmup ends with no SFT step. A random student never reaches overlap 0.99: it
  runs to train.steps."""
  same = sft.SFTTrainer(_warmup_config(small_world, tmp_path, small_world["teacher_math"], 0.99))
  same.run()
  assert same.step == 0 and same.done
  switch = same.switches["math"]
  assert switch["step"] == 0 and switch["overlap"] > 0.99
  logged = json.loads(open(os.path.join(same.config.output_dir, "switches.json")).read())
  assert logged["math"]["overlap"] == switch["overlap"]

  other = sft.SFTTrainer(_warmup_config(small_world, tmp_path, small_world["student"], 0.99))
  other.run()
  assert other.step == 3 and not other.done and other.switches == {}


def test_overrides_change_one_stage_and_bad_ones_name_the_field(small_world, tmp_path):
  import ml_collections

  c = _pipeline_config(small_world, tmp_path / "run")
  c.pipeline.overrides.sft = ml_collections.ConfigDict({"optimizer": {"lr": 3e-3}})
  pipeline.validate(c)
  gen, warm, opd = (pipeline.stage_config(c, k) for k in range(3))
  assert warm.optimizer.lr == 3e-3 and opd.optimizer.lr == gen.optimizer.lr == c.optimizer.lr
  assert not warm.pipeline.overrides  # a stage's own config carries no pipeline fields
  c.pipeline.overrides.sft = ml_collections.ConfigDict({"optimizer": {"lrr": 3e-3}})
  with pytest.raises(ValueError, match=r"config.pipeline.overrides.sft.optimizer.lrr names no"):
    pipeline.validate(c)
  c.pipeline.overrides.sft = ml_collections.ConfigDict({"checkpoint": {"dir": "/elsewhere"}})
  with pytest.raises(ValueError, match=r"the pipeline sets 'checkpoint.dir' for every stage"):
    pipeline.validate(c)
  c.pipeline.overrides = ml_collections.ConfigDict({"rlvr": {"loss": {"kl_weight": 0.0}}})
  with pytest.raises(ValueError, match=r"overrides has stages \['rlvr'\] that pipeline.stages"):
    pipeline.validate(c)
  c.pipeline.overrides = ml_collections.ConfigDict({"opd": {"optimizer": {"lr": "fast"}}})
  with pytest.raises(ValueError, match=r"stage 3 \(opd\): config.pipeline.overrides.opd.optimizer"):
    pipeline.validate(c)

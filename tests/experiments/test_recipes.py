"""The recipe presets (configs/recipes/): valid pipelines with the reports' stages and losses,
equal student-token budgets at their defaults, and both running end to end on the committed
task world at tiny size."""

import importlib.util
import json
import os

import pytest

from jdistill import config as config_lib
from jdistill.experiments import budget, task_world
from jdistill.stages import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def recipe(name):
  path = os.path.join(ROOT, "configs", "recipes", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_v4_is_full_vocab_reverse_kl_opd_from_the_base_with_lineage_teachers():
  v4 = recipe("v4")
  c = v4.get_config()
  pipeline.validate(c)
  assert tuple(c.pipeline.stages) == ("opd",)
  opd = pipeline.stage_config(c, 0)
  assert opd.student.path == os.path.join(task_world.COMMITTED, "base")
  for name, t in opd.teachers.items():
    assert (t.loss, t.weight, t.placement) == ("reverse_kl", 1.0, "streamed")
    assert t.path == os.path.join(task_world.COMMITTED, f"lineage_{name}")
  assert os.path.basename(v4.get_config("external").teachers.add.path) == "external_add"


def test_ultra_is_rlvr_then_warmup_then_sampled_token_mopd():
  ultra = recipe("ultra")
  c = ultra.get_config()
  pipeline.validate(c)
  assert tuple(c.pipeline.stages) == ("rlvr", "generate", "sft", "opd")
  rl, gen, warm, opd = (pipeline.stage_config(c, k) for k in range(4))
  assert rl.loss.kl_weight == 0.0 and rl.rl.reward_weight == 1.0  # pure GRPO
  assert opd.loss.kl_weight == 1.0  # the sampled-token advantage, no reward term
  assert (opd.loss.clip_eps, opd.loss.icepop_c) == (0.2, 5.0)
  assert {t.loss for t in opd.teachers.values()} == {"sampled_token"}
  assert os.path.basename(opd.teachers.add.path) == "external_add"
  assert (gen.generate.model, gen.generate.keep) == ("teachers", "verified")
  assert warm.student.path == os.path.join(rl.output_dir, "final")  # warmup after RLVR
  assert warm.sft.train_files.startswith(os.path.join(gen.output_dir, "data"))
  assert opd.student.path == os.path.join(warm.output_dir, "final")
  for k in range(4):  # the overridden stage configs are valid too
    config_lib.validate(pipeline.stage_config(c, k))
  # the override is what makes stage 1 pure GRPO: without it RLVR adds the teacher term
  del c.pipeline.overrides["rlvr"]
  assert pipeline.stage_config(c, 0).loss.kl_weight == 1.0


def test_the_defaults_sample_equal_student_tokens():
  v4, ultra = recipe("v4"), recipe("ultra")
  cu, cv = ultra.get_config(), v4.get_config()
  rl_tokens = cu.pipeline.steps[0] * budget.step_tokens(pipeline.stage_config(cu, 0))
  mopd_step = budget.step_tokens(pipeline.stage_config(cu, 3))
  opd_step = budget.step_tokens(pipeline.stage_config(cv, 0))
  assert opd_step == mopd_step
  steps = budget.opd_steps_for_budget(rl_tokens, cu.pipeline.steps[3], mopd_step)
  assert steps == cv.pipeline.steps[0] == v4.OPD_STEPS
  assert rl_tokens + cu.pipeline.steps[3] * mopd_step == steps * opd_step


def few(path, out, per_domain):
  counts, lines = {}, []
  with open(path) as f:
    for line in f:
      d = json.loads(line)["domain"]
      if counts.get(d, 0) < per_domain:
        counts[d] = counts.get(d, 0) + 1
        lines.append(line)
  with open(out, "w") as f:
    f.writelines(lines)
  return str(out)


def tiny(c, tmp_path, steps):
  """Few prompts, one or two steps per stage, no periodic evaluation."""
  c.output_dir = str(tmp_path / "run")
  c.num_devices = 1  # one device: the tiny shapes compile and run fastest unsharded
  c.data.train_files = few(c.data.train_files, tmp_path / "train.jsonl", 8)
  c.data.eval_files = few(c.data.eval_files, tmp_path / "eval.jsonl", 8)
  c.data.slots_per_teacher = 8
  c.rl.eval_prompts = 8
  c.generate.prompts_per_batch = 24
  c.pipeline.steps = steps
  c.train.steps = max(steps)
  c.optimizer.warmup_steps = 0
  c.train.eval_every = 0
  c.checkpoint.every = 100
  c.checkpoint.async_save = False
  return c


@pytest.mark.parametrize("name, steps", [("v4", (2,)), ("ultra", (1, 0, 2, 1))])
def test_recipe_runs_end_to_end_on_the_task_world(name, steps, tmp_path):
  module = recipe(name)
  c = tiny(module.get_config(), tmp_path, steps)
  summaries = pipeline.run(c)
  assert [s["stage"] for s in summaries] == list(c.pipeline.stages)
  for k, s in enumerate(summaries):
    if c.pipeline.stages[k] != "generate":
      assert s["step"] == steps[k]
      assert os.path.exists(os.path.join(pipeline.stage_dir(c, k), "final", "config.json"))

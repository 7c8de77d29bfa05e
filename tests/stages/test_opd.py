"""The OPD trainer end to end on the toy world: learning, resume, 1 vs 8 devices, CLI."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jdistill import config as config_lib
from jdistill.stages import opd as train
from jdistill.testing.toy import short_run_config, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(world, tmp_path, **train):
  return short_run_config(world, tmp_path / "out", **train)


def _params(trainer):
  return jax.tree.map(np.asarray, jax.device_get(trainer.params))


def test_two_teachers_two_losses_reverse_kl_halves(world, tmp_path):
  c = _config(world, tmp_path, steps=40, log_every=10)
  c.data.slots_per_teacher = 8
  assert {n: c.teachers[n].loss for n in c.teachers} == {
    "math": "reverse_kl",
    "code": "sampled_token",
  }
  trainer = train.OPDTrainer(c)
  before = trainer.evaluate()
  history = trainer.run()
  after = trainer.evaluate()
  for name in ("math", "code"):
    assert after[name]["reverse_kl"] <= 0.5 * before[name]["reverse_kl"], (name, before, after)
  assert [r["step"] for r in history] == [10, 20, 30, 40]
  assert os.path.exists(tmp_path / "out" / "learning_curves.png")
  lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[-1])["teachers"]["code"]["tokens"] > 0


def test_kill_and_resume_gives_the_same_params_and_data_order(world, tmp_path):
  def run(steps_per_session, ckpt_dir):
    seen = []
    for steps in steps_per_session:
      c = _config(world, tmp_path, steps=4)
      c.checkpoint.dir = str(ckpt_dir)
      c.checkpoint.every = 2
      trainer = train.OPDTrainer(c)  # resumes from the latest checkpoint, if any
      start = trainer.step
      seen.append(trainer.data_iter.get_state())
      trainer.run(steps=steps)
      assert trainer.step == start + steps
    return trainer, seen

  straight, _ = run([4], tmp_path / "a")
  resumed, seen = run([2, 2], tmp_path / "b")
  assert seen[1] == {"next_index": 2}  # the second session picked up the data stream at step 2
  assert resumed.checkpointer.all_steps() == [2, 4]
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    _params(straight),
    _params(resumed),
  )
  # the data order of the next step is the same too
  np.testing.assert_array_equal(
    next(straight.data_iter)["prompt_tokens"], next(resumed.data_iter)["prompt_tokens"]
  )


def test_one_device_and_eight_devices_agree_step_by_step(world, tmp_path):
  """Each step's loss and updated params agree between one device and a 2x2x2 mesh.

  Both meshes get the same rollout batch (drawn once, on one device), so only the
  reduction order differs; params are compared after every step, not only at the end of a
  trajectory where differences compound.
  """
  assert jax.device_count() == 8
  trainers = []
  for num_devices, mesh in (
    (1, dict(data=1, fsdp=1, tensor=1)),
    (8, dict(data=2, fsdp=2, tensor=2)),
  ):
    c = _config(world, tmp_path, steps=STEPS_1V8)
    # Adam divides by sqrt(v): a large eps bounds |d update / d grad| by lr / eps, so
    # reduction-order noise on near-zero gradients is not blown up to ±lr.
    c.optimizer.eps = ADAM_EPS_1V8
    for name in c.teachers:  # all f32, so the tolerances below follow from f32 rounding
      c.teachers[name].param_dtype = "float32"
    c.num_devices = num_devices
    c.mesh.update(mesh)
    trainers.append(train.OPDTrainer(c))
  one, eight = trainers
  q = eight.params["layers"][0]["attn"]["q_proj"].get_value()
  assert len(q.sharding.device_set) == 8
  f32 = float(np.finfo(np.float32).eps)
  for step in range(1, STEPS_1V8 + 1):
    batch = one.rollouts(next(one.data_iter), one.rollout_key(one.step))
    batch8 = {k: jax.device_put(np.asarray(v), eight.batch_shardings[k]) for k, v in batch.items()}
    on = jax.numpy.asarray(True)
    one.state, m1 = one.train_step(one.state, one.teachers.states, {}, batch, on)
    eight.state, m8 = eight.train_step(eight.state, eight.teachers.states, {}, batch8, on)
    # losses: f32 sums reordered across shards (seen: ~2e-7 relative)
    loss_rtol = 64 * f32
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=loss_rtol)
    for name in one.teachers.names:
      np.testing.assert_allclose(
        float(m8["teachers"][name]["loss"]), float(m1["teachers"][name]["loss"]), rtol=loss_rtol
      )
    # params: a step adds a few f32 roundings at the params' scale (|du/dg| <= lr / eps
    # keeps gradient noise from growing), and earlier steps' errors carry over (seen: 1 ulp).
    p1, p8 = _params(one), _params(eight)
    scale = max(1.0, max(float(np.abs(x).max()) for x in jax.tree.leaves(p1)))
    atol = step * 16 * f32 * scale
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=atol), p1, p8)


STEPS_1V8 = 3
ADAM_EPS_1V8 = 1e-2


def test_rollout_key_of_step_t_is_fold_in_of_the_seed_key(world, tmp_path):
  c = _config(world, tmp_path, steps=3)
  c.seed = 7
  trainer = train.OPDTrainer(c)
  keys, generate = [], trainer.sampler.generate

  def spy(params, prompts, rng, sampling):
    keys.append(np.asarray(jax.random.key_data(rng)))
    return generate(params, prompts, rng, sampling)

  trainer.sampler.generate = spy
  trainer.run()
  want = [
    np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(7), t))) for t in range(3)
  ]
  assert len(keys) == 3
  for got, expected in zip(keys, want):
    np.testing.assert_array_equal(got, expected)
  assert len({k.tobytes() for k in keys}) == 3  # a new key, so new rollouts, every step


def test_bf16_rollouts_log_a_small_train_inference_mismatch(world, tmp_path):
  """`rollout.param_dtype=bfloat16`: the sampler runs a bf16 copy of the f32 student, the step
  recomputes its log-probs in f32, and logs |log q/π| for the sampled-token teacher and the
  share IcePop masks: above f32 noise (< 1e-5 with f32 rollouts, test_disaggregated), small,
  and IcePop's band of ±5e-4 in log ratio masks some tokens but not all. Evaluation samples
  the f32 params."""
  c = _config(world, tmp_path, steps=1)
  c.rollout.param_dtype = "bfloat16"
  c.loss.icepop_c = float(np.exp(5e-4))
  trainer = train.OPDTrainer(c)
  assert {str(x.dtype) for x in jax.tree.leaves(trainer.rollout_params())} == {"bfloat16"}
  assert {str(x.dtype) for x in jax.tree.leaves(trainer.eval_params())} == {"float32"}
  metrics = train.to_float(trainer.train_one())
  m = metrics["teachers"]["code"]  # sampled-token (math: reverse KL, no ratio)
  assert 1e-5 < m["abs_log_ratio_mean"] < 1e-2 and m["abs_log_ratio_max"] < 0.05, m
  assert 0 < m["icepop_masked"] < 1, m


def test_config_validation_names_the_field(world):
  c = tiny_config(world)
  c.loss.normalize = "bogus"
  with pytest.raises(ValueError, match=r"config.loss.normalize='bogus'.*token"):
    config_lib.validate(c)
  c = tiny_config(world)
  c.teachers.math.loss = "l2"
  with pytest.raises(ValueError, match=r"config.teachers.math.loss='l2'.*reverse_kl"):
    config_lib.validate(c)
  c = tiny_config(world)
  c.teachers.code.domains = "code,math"
  with pytest.raises(ValueError, match="'math' already belongs to 'code'"):
    config_lib.validate(c)
  c = tiny_config(world)
  c.sampling.top_p = 1.5
  with pytest.raises(ValueError, match="config.sampling.top_p"):
    config_lib.validate(c)
  c = tiny_config(world)
  c.rollout.param_dtype = "float16"
  with pytest.raises(ValueError, match="config.rollout.param_dtype='float16'.*bfloat16"):
    config_lib.validate(c)


def _cli(*overrides, world_dir):
  env = dict(os.environ, JDISTILL_TOY_WORLD=world_dir, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "jdistill.train",  # the old entry point, an alias of `jdistill train`
      "--config=configs/opd_tiny.py",
      "--validate_only",
      *overrides,
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_cli_nested_overrides_and_bad_overrides(world):
  world_dir = os.path.dirname(world["student"])
  ok = _cli(
    "--config.optimizer.lr=3e-6",
    "--config.teachers.math.weight=2",
    "--config.data.slots_per_teacher=2",
    "--config.student.scan_layers=True",  # a typed None (auto) overridden by a bool
    "--config.teachers.code.placement=streamed",
    world_dir=world_dir,
  )
  assert ok.returncode == 0, ok.stderr
  shown = json.loads(ok.stdout.strip().splitlines()[-1])
  assert (
    shown["student"]["scan_layers"] is True and shown["teachers"]["math"]["scan_layers"] is None
  )
  assert shown["teachers"]["code"]["placement"] == "streamed"
  assert shown["optimizer"]["lr"] == 3e-6
  assert shown["teachers"]["math"]["weight"] == 2
  assert shown["data"]["slots_per_teacher"] == 2
  bad = _cli("--config.loss.normalize=bogus", world_dir=world_dir)
  assert bad.returncode != 0 and "config.loss.normalize='bogus'" in bad.stderr
  typo = _cli("--config.optimizer.lrr=1", world_dir=world_dir)
  assert typo.returncode != 0 and "lrr" in typo.stderr
  wrong_type = _cli("--config.train.steps=many", world_dir=world_dir)
  assert wrong_type.returncode != 0 and "steps" in wrong_type.stderr


def test_checkpoint_restores_onto_another_mesh_loads_as_teacher_and_exports(world, tmp_path):
  from flax import nnx

  from jdistill.models import hf
  from jdistill.runtime.checkpoint import load_model_from_checkpoint
  from jdistill.runtime.sharding import make_mesh

  c = _config(world, tmp_path, steps=2)
  c.num_devices = 1
  c.mesh.update(dict(data=1, fsdp=1, tensor=1))
  c.checkpoint.dir = str(tmp_path / "ckpt")
  c.checkpoint.every = 2
  one = train.OPDTrainer(c)
  one.run()
  saved = _params(one)

  c8 = _config(world, tmp_path, steps=4)
  c8.mesh.update(dict(data=2, fsdp=2, tensor=2))
  c8.checkpoint.dir = str(tmp_path / "ckpt")
  c8.run_mode = "resume"  # the same run, carried on for more steps
  eight = train.OPDTrainer(c8)  # resumes step 2 onto the 2x2x2 mesh
  assert eight.step == 2
  gate = eight.params["layers"][0]["mlp"]["gate_proj"].get_value()
  assert len(gate.sharding.device_set) == 8 and gate.sharding.spec == jax.sharding.PartitionSpec(
    "fsdp", "tensor"
  )
  jax.tree.map(np.testing.assert_array_equal, saved, _params(eight))

  # the checkpoint directory as a (bf16) teacher
  teacher = load_model_from_checkpoint(
    str(tmp_path / "ckpt"), make_mesh({"data": -1}), param_dtype="bfloat16", dtype="bfloat16"
  )
  t_params = nnx.state(teacher, nnx.Param)
  assert t_params["embed"].get_value().dtype == jax.numpy.bfloat16
  np.testing.assert_allclose(
    np.asarray(t_params["embed"].get_value(), np.float32), saved["embed"], rtol=1e-2, atol=1e-3
  )

  # the final student as an HF directory that loads back identically
  one.export(str(tmp_path / "hf"))
  back = nnx.state(hf.from_hf(str(tmp_path / "hf")), nnx.Param)
  jax.tree.map(np.testing.assert_array_equal, saved, jax.tree.map(np.asarray, back))
  assert os.path.exists(tmp_path / "hf" / "tokenizer.json")


@pytest.mark.parametrize("name", ["opd_v4_style", "opd_ultra_style"])
def test_example_configs_validate_once_paths_are_given(name):
  import importlib.util

  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  with pytest.raises(ValueError, match="config.student.path"):
    config_lib.validate(c)
  c.student.path = "/ckpt/student"
  c.data.train_files = "/data/prompts.jsonl"
  with pytest.raises(ValueError, match=r"config.teachers.\w+.path"):
    config_lib.validate(c)
  for teacher in c.teachers:
    c.teachers[teacher].path = f"/ckpt/{teacher}"
  config_lib.validate(c)


def test_nonfinite_steps_are_skipped_and_counted_or_stop_the_run(world, tmp_path, caplog):
  c = _config(world, tmp_path, steps=10, log_every=5)
  trainer = train.OPDTrainer(c)
  before = _params(trainer)
  trainer.teachers.states = jax.tree.map(lambda x: x * np.nan, trainer.teachers.states)
  trainer.run(steps=2)  # not a logging step: still noticed
  assert trainer.skipped_updates == 2
  assert "update skipped (config.loss.nonfinite='skip'; 2 so far)" in caplog.text
  jax.tree.map(np.testing.assert_array_equal, before, _params(trainer))
  trainer.loop.nonfinite = "stop"
  with pytest.raises(FloatingPointError, match="step 3: non-finite loss nan"):
    trainer.run(steps=1)

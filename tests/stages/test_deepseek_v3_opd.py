"""The OPD stage with a DeepSeek-V3 student and DeepSeek-V3 teachers (tiny, from transformers'
random init): the train step on 8 simulated devices (experts over `expert`, MLA heads over
`tensor`) equal to one device, the auxiliary-loss-free bias update
(`student.score_bias_update_speed`) against a NumPy reference of its rule and equal on both,
and a run of the stage end to end. Both meshes' programs compile once for the file."""

import json
import os
import random

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jdistill.data.tokenizer import train_tiny_tokenizer
from jdistill.models import moe
from jdistill.stages import opd as train
from jdistill.step import common
from jdistill.testing import toy
from jdistill.testing.tiny_hf import tiny_hf_model

STEPS = 2
GAMMA = 0.01  # the bias update speed (V3: 0.001); large enough to see against f32 rounding


@pytest.fixture(scope="module")
def ds_world(tmp_path_factory):
  """The toy world's tokenizer and prompts with a DeepSeek-V3 student (layer 0 dense, layer 1
  8 routed experts in 4 groups and a shared one) and two one-layer DeepSeek-V3 teachers (that
  MoE layer only: a cheaper compile)."""
  root = str(tmp_path_factory.mktemp("ds_world"))
  rng = random.Random(0)
  texts = [make(rng) for _ in range(100) for make in toy.PROMPTS.values()]
  tokenizer = train_tiny_tokenizer(os.path.join(root, "tokenizer"), texts, vocab_size=384)
  paths = {"tokenizer": os.path.join(root, "tokenizer")}
  for seed, name in enumerate(("student", "teacher_math", "teacher_code")):
    paths[name] = os.path.join(root, name)
    shape = {} if name == "student" else dict(layers=1, first_k_dense_replace=0)
    model = tiny_hf_model("deepseek_v3", vocab_size=len(tokenizer), seed=seed, **shape)
    model.save_pretrained(paths[name])
  paths["train"] = toy.write_prompts(os.path.join(root, "train.jsonl"), 16, 0)
  paths["eval"] = toy.write_prompts(os.path.join(root, "eval.jsonl"), 4, 100)
  return paths


def _config(ds_world, out_dir, mesh: dict, num_devices: int):
  c = toy.short_run_config(ds_world, out_dir, steps=STEPS, eval_every=0, log_every=1)
  c.optimizer.eps = 1e-2  # bounds |d update / d grad| by lr / eps (see test_opd's 1 vs 8)
  for name in c.teachers:  # all f32: the tolerances below follow from f32 rounding
    c.teachers[name].param_dtype = "float32"
  c.num_devices = num_devices
  c.mesh.update(mesh)
  c.student.score_bias_update_speed = GAMMA
  c.optimizer.weight_decay = 0.1  # AdamW would shrink the bias if it were the optimizer's
  return c


ONE = dict(data=1, fsdp=1, expert=1, tensor=1)
EIGHT = dict(data=1, fsdp=2, expert=2, tensor=2)


@pytest.fixture(scope="module")
def trainers(ds_world, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("runs")
  one = train.OPDTrainer(_config(ds_world, tmp / "one", ONE, 1))
  eight = train.OPDTrainer(_config(ds_world, tmp / "eight", EIGHT, 8))
  return one, eight


def _params(trainer):
  return jax.tree.map(np.asarray, jax.device_get(trainer.params))


def _bias(params):
  return np.asarray(params["layers"][1]["mlp"]["score_bias"].get_value())


def test_train_step_on_expert_and_tensor_sharded_mesh_equals_one_device(trainers):
  """Each of 2 steps' loss and updated params agree between one device and a
  fsdp 2 x expert 2 x tensor 2 mesh, given the same rollouts (drawn once, on one device)."""
  one, eight = trainers
  assert jax.device_count() == 8 and dict(eight.mesh.shape) == EIGHT
  assert one.model_cfg.model_type == "deepseek_v3" and one.model_cfg.is_moe_layer(1)

  def check_layout(trainer):
    layer = trainer.params["layers"][1]
    gate = layer["mlp"]["gate_proj"].get_value()  # [experts 8, hidden 64, moe_mlp 32]
    assert gate.sharding.spec == P("expert", "fsdp", "tensor")
    assert {s.data.shape for s in gate.addressable_shards} == {(4, 32, 16)}
    assert layer["mlp"]["score_bias"].get_value().sharding.spec == P("expert")
    q_b = layer["attn"]["q_b_proj"].get_value()  # [q latent, heads 4, head dim]
    assert q_b.sharding.spec == P(None, "tensor", None)
    assert {s.data.shape[1] for s in q_b.addressable_shards} == {2}

  check_layout(eight)
  f32 = float(np.finfo(np.float32).eps)
  top_k = one.model_cfg.num_experts_per_tok

  @jax.jit
  def loads(params, batch):  # the step's routing, before its update
    x = common.shifted_inputs(batch)
    student = nnx.merge(one.graphdef, params)
    return moe.forward_with_router_stats(student, x["inputs"], x["positions"], x["kv_mask"])[3]

  for step in range(1, STEPS + 1):
    batch = one.rollouts(next(one.data_iter), one.rollout_key(one.step))
    batch8 = {k: jax.device_put(np.asarray(v), eight.batch_shardings[k]) for k, v in batch.items()}
    load = np.asarray(loads(one.params, batch)[("layers", 1, "mlp")])  # [experts]
    rows, width = batch["tokens"].shape
    real = int(np.minimum(np.asarray(batch["lengths"]), width - 1).sum())  # inputs, no padding
    assert load.sum() == top_k * real < top_k * rows * (width - 1)
    bias_before = _bias(_params(one))
    on = jax.numpy.asarray(True)
    one.state, m1 = one.train_step(one.state, one.teachers.states, {}, batch, on)
    eight.state, m8 = eight.train_step(eight.state, eight.teachers.states, {}, batch8, on)
    assert np.isfinite(float(m1["loss"])) and float(m1["finite"]) == 1
    # f32 sums reordered across shards, at the scale of the teachers' terms (the total, a
    # sampled-token surrogate plus a reverse KL, nearly cancels)
    terms = [float(m1["teachers"][n]["loss"]) for n in one.teachers.names]
    loss_atol = 64 * f32 * sum(abs(t) for t in terms)
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=0, atol=loss_atol)
    for name, t in zip(one.teachers.names, terms):
      np.testing.assert_allclose(float(m8["teachers"][name]["loss"]), t, rtol=64 * f32)
    p1, p8 = _params(one), _params(eight)
    scale = max(1.0, max(float(np.abs(x).max()) for x in jax.tree.leaves(p1)))
    atol = step * 16 * f32 * scale
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=atol), p1, p8)
    # the bias: the NumPy rule on the step's loads (not the optimizer's weight decay), the
    # same on 8 devices (loads are exact counts over the global batch)
    move = GAMMA * np.sign(load.mean() - load)
    assert (move > 0).any() and (move < 0).any()  # busy experts fall, idle ones rise
    np.testing.assert_allclose(_bias(p1), bias_before + move, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(_bias(p8), _bias(p1))
  check_layout(eight)


def test_opd_stage_runs_end_to_end(ds_world, trainers, tmp_path):
  """A fresh trainer from the config, on the fsdp x expert x tensor mesh, samples and runs 2
  steps (its step compile is the first test's, from the persistent cache), logs them and
  exports the student (`run_training`'s path without its evaluations, which would compile
  the eval objective too)."""
  c = _config(ds_world, tmp_path / "run", EIGHT, 8)
  trainer = train.OPDTrainer(c)
  assert dict(trainer.mesh.shape) == EIGHT
  loaded = _bias(_params(trainer))
  history = trainer.run()
  assert trainer.step == STEPS and [r["step"] for r in history] == [1, 2]
  for record in history:
    assert np.isfinite(record["loss"]) and record["finite"] == 1
    for name in ("math", "code"):
      assert np.isfinite(record["teachers"][name]["loss"])
  lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  assert len(lines) >= STEPS
  moved = _bias(_params(trainer)) - loaded  # each step moved each expert by -γ, 0 or +γ
  assert np.all(np.abs(moved) <= STEPS * GAMMA + 1e-6) and np.abs(moved).max() > GAMMA / 2
  from safetensors.numpy import load_file

  trainer.export(str(tmp_path / "export"))
  exported = load_file(str(tmp_path / "export" / "model.safetensors"))
  np.testing.assert_array_equal(
    exported["model.layers.1.mlp.gate.e_score_correction_bias"], _bias(_params(trainer))
  )  # the updated state keeps its layout (the step's out shardings)


def test_score_bias_update_speed_is_checked_and_off_keeps_the_config_hash(ds_world, tmp_path):
  from jdistill import config as config_lib

  c = _config(ds_world, tmp_path / "cfg", ONE, 1)
  c.student.score_bias_update_speed = 0.0
  off = config_lib.config_hash(c)
  del c.student["score_bias_update_speed"]  # a config from before the field
  assert config_lib.config_hash(c) == off
  c.student.score_bias_update_speed = 0.001
  assert config_lib.config_hash(c) != off
  config_lib.validate(c)
  for value, stage in ((-0.001, "opd"), (0.001, "sft")):
    c.student.score_bias_update_speed, c.stage = value, stage
    with pytest.raises(ValueError, match=r"config\.student\.score_bias_update_speed="):
      config_lib.validate(c)
  c.student.score_bias_update_speed, c.stage, c.optimizer.grad_accum = 0.001, "opd", 2
  with pytest.raises(ValueError, match=r"score_bias_update_speed=.*grad_accum=2"):
    config_lib.validate(c)
  c.optimizer.grad_accum = 1
  # a student without the bias: named before anything compiles
  c.student.path = str(tmp_path / "llama")
  with open(os.path.join(ds_world["student"], "config.json")) as f:
    vocab = json.load(f)["vocab_size"]
  tiny_hf_model("llama", vocab_size=vocab).save_pretrained(c.student.path)
  with pytest.raises(ValueError, match=r"score_bias_update_speed=0\.001.*'llama' student"):
    train.OPDTrainer(c)

"""Scanned layers (`ModelConfig.scan_layers`) against the unrolled model with the same weights:
logits, the OPD train step under every remat policy, HF import/export, the greedy sampler,
checkpoints across layouts and config validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jdistill import config as config_lib
from jdistill.losses import LossSettings
from jdistill.models import ModelConfig, Transformer, hf
from jdistill.models.config import REMAT_POLICIES
from jdistill.models.transformer import init_cache, stack_layers, unstack_layers
from jdistill.runtime import checkpoint as ckpt
from jdistill.runtime import sharding as shd
from jdistill.sampling import Sampler, SamplingParams
from jdistill.step import common
from jdistill.step import opd as ts
from jdistill.testing.tiny_hf import tiny_hf_model, torch_logits

CFG = ModelConfig(
  model_type="qwen3",
  vocab_size=48,
  hidden_size=32,
  intermediate_size=64,
  num_layers=3,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  qkv_bias=True,
  qk_norm=True,
  scan_layers=False,
)


def _graphdef(cfg):
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))[0]


def _pair(cfg=CFG, seed=0):
  """(unrolled model, scanned model) holding the same weights."""
  unrolled = Transformer(cfg, nnx.Rngs(seed))
  scanned_graphdef = _graphdef(cfg.replace(scan_layers=True))
  return unrolled, nnx.merge(scanned_graphdef, stack_layers(nnx.state(unrolled), cfg))


def _max_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _batch(seed=0, rows=4, length=12):
  rng = np.random.RandomState(seed)
  mask = np.zeros((rows, length), np.float32)
  mask[:, 5:10] = 1
  return {
    "tokens": jnp.asarray(rng.randint(3, CFG.vocab_size, (rows, length)), jnp.int32),
    "completion_mask": jnp.asarray(mask),
    "logprobs": jnp.full((rows, length), -2.0, jnp.float32),
    "sampling_logprobs": jnp.full((rows, length), -2.0, jnp.float32),
    "lengths": jnp.full((rows,), 10, jnp.int32),
  }


def test_auto_resolution_and_validation():
  assert ModelConfig(num_layers=7).scan_layers is False
  assert ModelConfig(num_layers=8).scan_layers is True
  assert ModelConfig(num_layers=8, scan_layers=False).scan_layers is False
  assert CFG.replace(scan_layers=None).scan_layers is False  # None resolves again
  with pytest.raises(ValueError, match="remat_policy='bogus'.*dots_saveable"):
    ModelConfig(remat_policy="bogus")
  with pytest.raises(ValueError, match="scan_layers='yes'"):
    ModelConfig(scan_layers="yes")
  config = config_lib.base_config()
  config.student.path = "x"
  config.data.train_files = "x"
  config.teachers.a = config_lib.teacher_config("t", "d")
  config_lib.validate(config)
  config.student.remat_policy = "all"
  with pytest.raises(ValueError, match="config.student.remat_policy='all'"):
    config_lib.validate(config)
  config.student.remat_policy = "full"
  # the field is a typed None (bool): a string is refused where it is set
  with pytest.raises(TypeError, match="scan_layers"):
    config.teachers.a.scan_layers = "auto"
  config.teachers.a.scan_layers = True
  config_lib.validate(config)


def test_scanned_init_stacks_the_unrolled_weights_and_logits_match():
  unrolled, scanned = _pair()
  fresh = Transformer(CFG.replace(scan_layers=True), nnx.Rngs(0))
  assert _max_diff(nnx.state(fresh), nnx.state(scanned)) == 0.0  # same rngs → same weights
  q = nnx.state(scanned)["layers"]["block"]["attn"]["q_proj"]
  assert q.shape == (3, 32, 4, 8) and q.logical_axes == ("layers", "embed", "heads", "head_dim")
  back = unstack_layers(nnx.state(scanned), CFG)
  assert jax.tree.structure(back) == jax.tree.structure(nnx.state(unrolled))
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, 48, (2, 9)))
  mask = jnp.ones((2, 9), bool).at[1, :3].set(False)

  def forward(g, s):
    return nnx.merge(g, s).forward_logits(tokens, None, mask)

  forward = jax.jit(forward, static_argnums=0)
  a, b = forward(*nnx.split(unrolled)), forward(*nnx.split(scanned))
  assert float(jnp.max(jnp.abs(a - b))) <= 1e-5


def test_scanned_params_are_sharded_by_their_logical_axes():
  mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
  model = shd.create_sharded(lambda: Transformer(CFG.replace(scan_layers=True), nnx.Rngs(0)), mesh)
  q = nnx.state(model)["layers"]["block"]["attn"]["q_proj"].get_value()
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (3, 8, 2, 8)


def _loss_grads(graphdef, params, t_graphdef, t_state, batch, *, step=False):
  """(loss, grads) of the OPD objective and, with `step`, the params after one train step."""
  specs = (
    common.TeacherSpec("a", LossSettings(loss="reverse_kl", chunk_size=4), 1.0, (0, 1, 2, 3)),
  )
  objective = functools.partial(
    ts.distill_objective,
    student_graphdef=graphdef,
    teacher_graphdefs=(t_graphdef,),
    teacher_states=(t_state,),
    batch=batch,
    specs=specs,
    diagnostics=False,
  )
  loss, grads = jax.jit(jax.value_and_grad(lambda p: objective(p)[0]))(params)
  if not step:
    return loss, grads, None
  opt, sched = common.make_optimizer(1e-3, steps=10, warmup_steps=0)
  state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32)}
  train_step = functools.partial(
    ts.train_step,
    student_graphdef=graphdef,
    teacher_graphdefs=(t_graphdef,),
    specs=specs,
    optimizer=opt,
    schedule=sched,
  )
  new_state, metrics = jax.jit(train_step)(state, (t_state,), batch)
  assert abs(float(metrics["loss"]) - float(loss)) <= 1e-5
  return loss, grads, new_state["params"]


def test_train_step_scanned_equals_unrolled_under_every_remat_policy():
  # Eight compiles (each with the teacher's forward): a student of two layers (still a scan
  # over several) and a one-layer teacher (any teacher gives the objective) keep them cheap.
  cfg = CFG.replace(num_layers=2)
  unrolled, scanned = _pair(cfg)
  teacher_cfg = cfg.replace(model_type="llama", qk_norm=False, num_layers=1)
  teacher = nnx.split(Transformer(teacher_cfg, nnx.Rngs(5)))
  batch = _batch()
  ref_loss, ref_grads, ref_params = _loss_grads(*nnx.split(unrolled), *teacher, batch, step=True)
  ref_grads, ref_params = stack_layers(ref_grads, cfg), stack_layers(ref_params, cfg)
  assert float(ref_loss) > 0
  loss, grads, params = _loss_grads(*nnx.split(scanned), *teacher, batch, step=True)
  assert abs(float(loss) - float(ref_loss)) <= 1e-5
  assert _max_diff(grads, ref_grads) <= 1e-5 and _max_diff(params, ref_params) <= 1e-5
  for policy in REMAT_POLICIES[1:]:  # (unrolled remat: tests/models/test_models.py)
    graphdef = _graphdef(scanned.cfg.replace(remat_policy=policy))
    loss, grads, _ = _loss_grads(graphdef, nnx.state(scanned), *teacher, batch)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5, policy
    assert _max_diff(grads, ref_grads) <= 1e-5, policy


VOCAB = 128


def _padded():
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, VOCAB, (2, 9))
  mask = np.ones((2, 9), bool)
  mask[1, :3] = False
  return tokens, mask, np.maximum(np.cumsum(mask, 1) - 1, 0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  torch_model = tiny_hf_model("qwen2", vocab_size=VOCAB, layers=3)
  path = str(tmp_path_factory.mktemp("qwen2"))
  torch_model.save_pretrained(path)
  return torch_model, path


def test_hf_import_export_round_trip_scanned(hf_dir, tmp_path):
  from transformers import AutoModelForCausalLM

  torch_model, path = hf_dir
  tokens, mask, positions = _padded()
  ref = torch_logits(torch_model, tokens, mask, positions)
  scanned = hf.from_hf(path, scan_layers=True)
  assert scanned.cfg.scan_layers and hf.from_hf(path).cfg.scan_layers is False  # auto: 3 layers
  out = scanned.forward_logits(*(jnp.asarray(a) for a in (tokens, positions, mask)))
  out = np.asarray(out)
  assert np.abs(out - ref)[mask].max() <= 1e-4
  hf.to_hf(scanned, str(tmp_path / "export"))
  reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), local_files_only=True)
  again = torch_logits(reloaded.eval(), tokens, mask, positions)
  np.testing.assert_allclose(again[mask], ref[mask], atol=1e-5)


def test_greedy_sampler_scanned_equals_unrolled(hf_dir):
  """The same tokens and log-probs; the scanned model samples with its layers unrolled, one
  cache buffer per layer (a scan over a stacked cache copies its slices every token)."""
  _, path = hf_dir
  mesh = shd.make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
  prompts = [[5, 17, 99], [3, 44, 8, 61, 70, 12, 9], [100, 2, 77], [6, 90, 13, 57, 25]]
  params = SamplingParams(max_new_tokens=6, temperature=0.0, prompt_buckets=(8,))
  outs = []
  for scan in (False, True):
    graphdef, state = nnx.split(hf.from_hf(path, mesh, scan_layers=scan))
    sampler = Sampler(graphdef, mesh, keep_cache=True)
    outs.append(sampler.generate(state, prompts, jax.random.key(0), params))
    (cache,) = sampler._caches.values()
    assert isinstance(cache, tuple) and len(cache) == 3 and cache[0]["k"].shape[:2] == (4, 14)
  np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
  np.testing.assert_allclose(np.asarray(outs[0].logprobs), np.asarray(outs[1].logprobs), atol=1e-5)
  cache = init_cache(CFG.replace(scan_layers=True), 2, 5)
  assert cache["k"].shape == (3, 2, 5, 2, 8)


def test_checkpoints_restore_scanned_and_name_scan_layers_across_layouts(tmp_path):
  unrolled, scanned = _pair()
  opt, _ = common.make_optimizer(1e-3, steps=10, warmup_steps=0)

  def train_state(model):
    params = nnx.state(model)
    return {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32)}

  checkpointer = ckpt.Checkpointer(str(tmp_path / "ck"), every=1, keep=2, async_save=False)
  checkpointer.write_model_config(scanned.cfg)
  state = train_state(scanned)
  ckpt.save_train_state(checkpointer, 1, state, rng=jax.random.key(0), data_state={}, identity={})
  checkpointer.wait()
  other = train_state(Transformer(scanned.cfg, nnx.Rngs(9)))
  restored, *_ = ckpt.restore_train_state(checkpointer, other)
  assert _max_diff(restored["params"], state["params"]) == 0.0
  with pytest.raises(ValueError, match="scan_layers=True.*set config.student.scan_layers=True"):
    checkpointer.write_model_config(unrolled.cfg)
  with pytest.raises(ValueError, match="set config.student.scan_layers=True"):
    ckpt.restore_train_state(checkpointer, train_state(unrolled))
  assert checkpointer.all_steps() == [1]  # nothing set aside as corrupt
  checkpointer.close()
  # loaded as a model (a teacher or a student's start) it converts to the layout asked for
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  as_unrolled = ckpt.load_model_from_checkpoint(str(tmp_path / "ck"), mesh, scan_layers=False)
  assert _max_diff(nnx.state(as_unrolled), nnx.state(unrolled)) == 0.0
  as_scanned = ckpt.load_model_from_checkpoint(str(tmp_path / "ck"), mesh, scan_layers=True)
  assert _max_diff(nnx.state(as_scanned), nnx.state(scanned)) == 0.0

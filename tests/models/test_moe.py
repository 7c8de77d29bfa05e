"""Mixture-of-experts decoders (Qwen3-MoE / Qwen2-MoE): dispatch, HF parity and export,
expert-sharded forward, router losses (and their use in the train step), greedy sampling."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P

from jdistill.losses import LossSettings
from jdistill.models import ModelConfig, Transformer, hf, moe
from jdistill.models.transformer import MLP
from jdistill.runtime import sharding as shd
from jdistill.sampling import Sampler, SamplingParams
from jdistill.step import common
from jdistill.step import opd as ts
from jdistill.testing import tiny_hf
from jdistill.testing.tiny_hf import tiny_hf_model

VOCAB = 128


def _single_mesh():
  return shd.make_mesh({"data": 1}, jax.devices()[:1])


def _padded_batch(rows=4):
  return tiny_hf.padded_batch(VOCAB, rows)


_torch_logits, _forward = tiny_hf.torch_logits, tiny_hf.jax_logits


def _jd_logits(model, tokens, mask, positions):
  graphdef, state = nnx.split(model)
  return np.asarray(
    _forward(graphdef, state, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
  )


def _with_cfg(model, **kw):
  """The same weights under a config with `kw` changed (a new graphdef, same state)."""
  graphdef, state = nnx.split(model)
  other = nnx.eval_shape(lambda: Transformer(model.cfg.replace(**kw), nnx.Rngs(0)))
  return nnx.merge(nnx.split(other)[0], state)


# --- config ------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kw,match",
  [
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size"),
    (dict(decoder_sparse_step=0), "decoder_sparse_step"),
    (dict(mlp_only_layers=(2,)), "mlp_only_layers"),
    (dict(mlp_only_layers=[0]), "mlp_only_layers"),
    (dict(model_type="qwen3"), "model_type"),
    (dict(moe_dispatch="sorted"), "moe_dispatch"),
    (dict(router_z_loss_coef=-1.0), "router_z_loss_coef"),
    (dict(num_experts=-1), "num_experts"),
  ],
)
def test_bad_moe_config(kw, match):
  base = dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)
  with pytest.raises(ValueError, match=f"ModelConfig.{match}="):
    ModelConfig(**{**base, **kw})


def test_dense_config_has_no_experts_and_layer_rule():
  dense = ModelConfig()
  assert dense.num_experts == 0 and not any(dense.is_moe_layer(i) for i in range(4))
  state = nnx.state(nnx.eval_shape(lambda: Transformer(dense, nnx.Rngs(0))), nnx.Param)
  assert set(state["layers"][0]["mlp"].keys()) == {"gate_proj", "up_proj", "down_proj"}
  cfg = ModelConfig(
    model_type="qwen3_moe",
    num_layers=6,
    num_experts=4,
    num_experts_per_tok=1,
    moe_intermediate_size=8,
    decoder_sparse_step=2,
    mlp_only_layers=(3,),
  )
  assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]


# --- dispatch ------------------------------------------------------------------------


def _expert_weights(e=6, d=16, f=12, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (
    0.3 * jax.random.normal(ks[0], (e, d, f)),
    0.3 * jax.random.normal(ks[1], (e, d, f)),
    0.3 * jax.random.normal(ks[2], (e, f, d)),
  )


def test_ragged_dispatch_equals_dense_and_per_token_loop():
  gate, up, down = _expert_weights()
  x = jax.random.normal(jax.random.key(1), (20, 16))
  logits = jax.random.normal(jax.random.key(2), (20, 6))
  weights, experts = moe.route(logits, 2, norm_topk_prob=True)
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)
  ragged_fn, dense_fn = jax.jit(moe.ragged_experts), jax.jit(moe.dense_experts)
  ragged = np.asarray(ragged_fn(x, experts, weights, gate, up, down))
  dense = np.asarray(dense_fn(x, experts, weights, gate, up, down))
  xn, gn, un, dn = (np.asarray(a, np.float64) for a in (x, gate, up, down))
  loop = np.zeros_like(xn)
  for n in range(20):
    for j in range(2):
      e = int(experts[n, j])
      a = xn[n] @ gn[e]
      loop[n] += float(weights[n, j]) * ((a / (1 + np.exp(-a))) * (xn[n] @ un[e])) @ dn[e]
  np.testing.assert_allclose(ragged, loop, atol=1e-5)
  np.testing.assert_allclose(dense, loop, atol=1e-5)
  assert np.abs(loop).max() > 0.1  # a real signal, not zeros

  # every token on one expert (and others empty): nothing is dropped
  skew = jnp.zeros((20, 2), jnp.int32).at[:, 1].set(3)
  np.testing.assert_allclose(
    np.asarray(ragged_fn(x, skew, weights, gate, up, down)),
    np.asarray(dense_fn(x, skew, weights, gate, up, down)),
    atol=1e-5,
  )

  # gradients through the grouped matmuls equal the dense reference's
  def loss(fn):
    return lambda x, w, g, u, d: jnp.sum(jnp.sin(fn(x, experts, w, g, u, d)))

  args = (x, weights, gate, up, down)
  g_ragged = jax.jit(jax.grad(loss(moe.ragged_experts), argnums=(0, 1, 2, 3, 4)))(*args)
  g_dense = jax.jit(jax.grad(loss(moe.dense_experts), argnums=(0, 1, 2, 3, 4)))(*args)
  for a, b in zip(g_ragged, g_dense):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def _routing(case, n=20, e=6):
  """(experts, weights) `[n, k]` for the dispatch edge cases."""
  logits = jax.random.normal(jax.random.key(2), (n, e))
  if case == "random":
    weights, experts = moe.route(logits, 2, norm_topk_prob=True)
  elif case == "empty_experts":  # experts 0 and 4 get no token
    weights, experts = moe.route(logits.at[:, jnp.array([0, 4])].set(-1e9), 2, True)
  elif case == "all_to_one":  # every row on expert 3, the rest empty
    weights, experts = moe.route(logits.at[:, 3].set(1e9), 1, False)
    weights = weights * jnp.linspace(0.5, 1.5, n)[:, None]
  else:  # every token picks 3 with one other expert: group sizes 20 and a few
    weights, experts = moe.route(logits.at[:, 3].set(logits.max(1) + 0.5), 2, True)
  return experts, weights


@pytest.mark.parametrize(
  "case,block_size,group",
  [
    ("random", None, None),  # auto: the smallest block, no scan
    ("random", 3, 1),  # groups of 3-7 rows in blocks of 3, one block per scan step
    ("random", 4, 3),  # 3 blocks per step, dead blocks at the end
    ("empty_experts", 4, None),
    ("empty_experts", 8, 2),
    ("all_to_one", 8, 1),  # 20 rows on one expert: 3 blocks of it, nothing dropped
    ("all_to_one", 64, None),  # one block holds them all
    ("skewed", 5, 2),
  ],
)
def test_blocked_dispatch_equals_dense_and_ragged(case, block_size, group):
  gate, up, down = _expert_weights()
  x = jax.random.normal(jax.random.key(1), (20, 16))
  experts, weights = _routing(case)
  sizes = np.bincount(np.asarray(experts).ravel(), minlength=6)
  if case in ("empty_experts", "all_to_one"):
    assert (sizes == 0).sum() >= 2
  blocked = functools.partial(moe.blocked_experts, block_size=block_size, group=group)

  def loss(fn):
    return lambda x, w, g, u, d: jnp.sum(jnp.sin(fn(x, experts, w, g, u, d)))

  args = (x, weights, gate, up, down)
  fns = {"blocked": blocked, "dense": moe.dense_experts, "ragged": moe.ragged_experts}
  out = {
    name: jax.jit(jax.value_and_grad(loss(fn), argnums=(0, 1, 2, 3, 4)))(*args)
    for name, fn in fns.items()
  }
  y = np.asarray(jax.jit(blocked)(x, experts, weights, gate, up, down))
  np.testing.assert_allclose(y, moe.dense_experts(x, experts, weights, gate, up, down), atol=1e-5)
  assert np.abs(y).max() > 0.1
  for ref in ("dense", "ragged"):
    np.testing.assert_allclose(out["blocked"][0], out[ref][0], rtol=1e-5)
    for a, b in zip(out["blocked"][1], out[ref][1]):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # every expert that has rows gets a weight gradient, the empty ones exactly zero
  assert (np.abs(np.asarray(out["blocked"][1][2])).max((1, 2)) > 0).tolist() == (sizes > 0).tolist()


def test_blocked_block_size_and_bound():
  assert moe.block_size_for(8192 * 8 * 8, 128) == 128  # Qwen3-30B-A3B, 8,192 tokens
  assert moe.block_size_for(2048 * 4, 64) == 32
  assert moe.block_size_for(40, 6) == 8  # the floor
  # the static bound holds for the worst split: every expert one row past a block
  e, bs = 8, 4
  experts = jnp.repeat(jnp.arange(e), bs + 1)[:, None]  # 40 rows, 5 per expert
  n_blocks = (40 + e * (bs - 1)) // bs
  assert n_blocks == 2 * e  # exactly what this split needs
  gate, up, down = _expert_weights(e=e)
  x = jax.random.normal(jax.random.key(1), (40, 16))
  w = jnp.ones((40, 1))
  np.testing.assert_allclose(
    moe.blocked_experts(x, experts, w, gate, up, down, block_size=bs),
    moe.dense_experts(x, experts, w, gate, up, down),
    atol=1e-5,
  )


# --- Hugging Face parity and export ---------------------------------------------------------

CASES = {
  "qwen3_moe": ("qwen3_moe", {}),
  "qwen3_moe-step2-normtopk": ("qwen3_moe", dict(decoder_sparse_step=2, norm_topk_prob=True)),
  "qwen2_moe-mlponly0-tied": ("qwen2_moe", dict(mlp_only_layers=[0], tie=True)),
}


@pytest.fixture(scope="module", params=list(CASES))
def hf_moe(request, tmp_path_factory):
  kind, extra = CASES[request.param]
  torch_model = tiny_hf_model(kind, vocab_size=VOCAB, **extra)
  path = str(tmp_path_factory.mktemp(request.param))
  torch_model.save_pretrained(path)
  return request.param, torch_model, path


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
  torch_model = tiny_hf_model("qwen3_moe", vocab_size=VOCAB, seed=1)
  path = str(tmp_path_factory.mktemp("qwen3_moe_single"))
  torch_model.save_pretrained(path)
  return torch_model, path


@pytest.mark.parametrize("dispatch", ["ragged", "blocked"])
def test_logits_match_transformers(hf_moe, dispatch):
  name, torch_model, path = hf_moe
  model = _with_cfg(hf.from_hf(path), moe_dispatch=dispatch)
  cfg = model.cfg
  sparse = [cfg.is_moe_layer(i) for i in range(cfg.num_layers)]
  assert (
    sparse
    == {
      "qwen3_moe": [True, True],
      "qwen3_moe-step2-normtopk": [False, True],
      "qwen2_moe-mlponly0-tied": [False, True],
    }[name]
  )
  for i, block in enumerate(model.layers):
    assert isinstance(block.mlp, moe.MoE if sparse[i] else MLP)
  assert cfg.norm_topk_prob == ("normtopk" in name)
  assert (cfg.shared_expert_intermediate_size > 0) == name.startswith("qwen2_moe")
  assert cfg.qkv_bias == name.startswith("qwen2_moe") and cfg.qk_norm == name.startswith("qwen3")
  tokens, mask, positions = _padded_batch()
  ref = _torch_logits(torch_model, tokens, mask, positions)
  out = _jd_logits(model, tokens, mask, positions)
  err = np.abs(out - ref)[mask].max()
  print(f"\n{name} {dispatch}: max |logits - transformers| = {err:.2e}")
  assert err <= 1e-4
  dense = _jd_logits(_with_cfg(model, moe_dispatch="dense"), tokens, mask, positions)
  assert np.abs(dense - ref)[mask].max() <= 1e-4
  # the router's weighting matters at this tolerance: the other norm_topk_prob is far off
  flipped = _jd_logits(
    _with_cfg(model, norm_topk_prob=not cfg.norm_topk_prob), tokens, mask, positions
  )
  assert np.abs(flipped - ref)[mask].max() > 1e-2


def test_export_round_trip(hf_moe, tmp_path):
  from transformers import AutoModelForCausalLM

  name, torch_model, path = hf_moe
  model = hf.from_hf(path)
  out_dir = str(tmp_path / "export")
  hf.to_hf(model, out_dir)
  written = json.load(open(os.path.join(out_dir, "config.json")))
  assert written["num_experts"] == 8 and written["num_experts_per_tok"] == 2
  reloaded = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True).eval()
  assert type(reloaded).__name__ == type(torch_model).__name__
  tokens, mask, positions = _padded_batch()
  ref = _torch_logits(torch_model, tokens, mask, positions)
  np.testing.assert_allclose(
    _torch_logits(reloaded, tokens, mask, positions)[mask], ref[mask], atol=1e-5
  )
  again = hf.from_hf(out_dir)
  assert again.cfg == model.cfg
  for a, b in zip(jax.tree.leaves(nnx.state(again)), jax.tree.leaves(nnx.state(model))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_import_names_a_missing_expert(qwen3_moe, tmp_path):
  from safetensors.numpy import load_file, save_file

  _, path = qwen3_moe
  os.makedirs(tmp_path / "broken")
  tensors = load_file(os.path.join(path, "model.safetensors"))
  del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
  save_file(tensors, str(tmp_path / "broken" / "model.safetensors"))
  with open(os.path.join(path, "config.json")) as f:
    json.dump(json.load(f), open(tmp_path / "broken" / "config.json", "w"))
  with pytest.raises(
    ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.5\.up_proj"
  ):
    hf.from_hf(str(tmp_path / "broken"))


# --- sharding ---------------------------------------------------------------------


@pytest.mark.parametrize(
  "axes", [{"fsdp": 2, "expert": 2, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}]
)
def test_sharded_forward_equals_single_device(qwen3_moe, axes):
  assert jax.device_count() == 8
  _, path = qwen3_moe
  mesh = shd.make_mesh(axes)
  sharded = hf.from_hf(path, mesh)
  single = hf.from_hf(path, _single_mesh())
  mlp = nnx.state(sharded, nnx.Param)["layers"][0]["mlp"]
  expert = "expert" if "expert" in axes else None
  assert mlp["gate_proj"].get_value().sharding.spec == P(expert, "fsdp", "tensor")
  assert mlp["down_proj"].get_value().sharding.spec == P(expert, "tensor", "fsdp")
  assert mlp["router"].get_value().sharding.spec == P("fsdp", expert)
  if expert:  # 8 experts over expert=2: each device holds 4
    assert mlp["gate_proj"].get_value().addressable_shards[0].data.shape == (4, 32, 16)
  tokens, mask, positions = _padded_batch()
  batch = shd.batch_sharding(mesh, 2)
  assert batch.spec[0] == (("data", "fsdp") if "data" in axes else ("fsdp", "expert"))
  args = [jax.device_put(jnp.asarray(a), batch) for a in (tokens, positions, mask)]
  graphdef, st = nnx.split(sharded)
  out = np.asarray(_forward(graphdef, st, *args))
  np.testing.assert_allclose(out, _jd_logits(single, tokens, mask, positions), atol=1e-5)


# --- router losses --------------------------------------------------------------------


def test_aux_losses_match_transformers(qwen3_moe):
  from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

  torch_model, path = qwen3_moe
  model = hf.from_hf(path)
  tokens, mask, positions = _padded_batch()
  graphdef, state = nnx.split(model)
  hidden, _, losses = jax.jit(
    lambda st, *a: moe.forward_with_aux_losses(nnx.merge(graphdef, st), *a)
  )(state, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
  with torch.no_grad():
    ref = torch_model(
      input_ids=torch.tensor(tokens),
      attention_mask=torch.tensor(mask.astype(np.int64)),
      position_ids=torch.tensor(positions),
      output_router_logits=True,
    )
  # the model's own HF aux loss (masked), and its router logits against ours
  np.testing.assert_allclose(float(losses["router_aux_loss"]), float(ref.aux_loss), rtol=1e-5)
  np.testing.assert_allclose(
    np.asarray(model.logits(hidden))[mask], ref.logits.numpy()[mask], atol=1e-4
  )

  # random logits, padded rows: both losses against HF's function / a NumPy z-loss
  rng = np.random.RandomState(3)
  layers = [rng.randn(4, 11, 8).astype(np.float32) * 2 for _ in range(3)]
  for token_mask in (None, mask):
    ours = moe.aux_losses([jnp.asarray(x) for x in layers], model.cfg, token_mask)
    hf_mask = None if token_mask is None else torch.tensor(token_mask.astype(np.int64))
    expect = load_balancing_loss_func(
      tuple(torch.tensor(x.reshape(-1, 8)) for x in layers), 8, 2, hf_mask
    )
    np.testing.assert_allclose(float(ours["router_aux_loss"]), float(expect), rtol=1e-5)
    lse = np.log(np.exp(np.stack(layers).astype(np.float64)).sum(-1))  # [layers, b, t]
    w = np.ones(lse.shape[1:]) if token_mask is None else token_mask.astype(np.float64)
    z = (lse**2 * w).sum() / (w.sum() * len(layers))
    np.testing.assert_allclose(float(ours["router_z_loss"]), z, rtol=1e-5)


def test_train_step_adds_and_logs_router_losses(qwen3_moe):
  _, path = qwen3_moe
  student = hf.from_hf(path, remat_policy="full")  # the sown logits also come out of nnx.remat
  teacher = Transformer(
    ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1),
    nnx.Rngs(1),
  )
  rng = np.random.RandomState(0)
  completion = np.zeros((2, 12), np.float32)
  completion[:, 5:10] = 1
  batch = {
    "tokens": jnp.asarray(rng.randint(3, VOCAB, (2, 12)), jnp.int32),
    "completion_mask": jnp.asarray(completion),
    "logprobs": jnp.full((2, 12), -2.0, jnp.float32),
    "sampling_logprobs": jnp.full((2, 12), -2.0, jnp.float32),
    "lengths": jnp.asarray([10, 8], jnp.int32),
  }
  specs = (common.TeacherSpec("t", LossSettings(loss="reverse_kl", chunk_size=4), 1.0, (0, 1)),)
  t_graphdef, t_state = nnx.split(teacher)

  coefs = dict(router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
  graphdef, params = nnx.split(_with_cfg(student, **coefs))

  @jax.jit
  def step(p, t_state, b):
    def objective(p):
      return ts.distill_objective(p, graphdef, (t_graphdef,), (t_state,), b, specs)

    return jax.value_and_grad(objective, has_aux=True)(p)

  (loss, metrics), grad = step(params, t_state, batch)
  x = common.shifted_inputs(batch)
  _, _, expect = jax.jit(lambda p, *a: moe.forward_with_aux_losses(nnx.merge(graphdef, p), *a))(
    params, x["inputs"], x["positions"], x["kv_mask"]
  )
  for key in moe.AUX_KEYS:
    np.testing.assert_allclose(float(metrics["t"][key]), float(expect[key]), rtol=1e-5)
    assert float(metrics["t"][key]) > 0
  np.testing.assert_allclose(
    float(loss),
    float(metrics["t"]["loss"])
    + 0.01 * float(expect["router_aux_loss"])
    + 0.001 * float(expect["router_z_loss"]),
    rtol=1e-6,
  )
  assert np.isfinite(np.asarray(grad["layers"][0]["mlp"]["router"].get_value())).all()


# --- sampling ------------------------------------------------------------------------


def test_greedy_matches_transformers(qwen3_moe):
  torch_model, path = qwen3_moe
  graphdef, state = nnx.split(hf.from_hf(path, _single_mesh()))
  prompts = [[5, 17, 99], [3, 44, 8, 61, 70, 12, 9]]
  new = 8
  sp = SamplingParams(max_new_tokens=new, temperature=0.0, prompt_buckets=(16,))
  out = Sampler(graphdef, _single_mesh()).generate(state, prompts, jax.random.key(0), sp)
  tiny_hf.assert_greedy_equals_generate(torch_model, out.tokens, prompts, new)


@pytest.mark.parametrize("mlp_only_layers", [(), (0,)], ids=["all_sparse", "dense_first"])
def test_scanned_moe_equals_unrolled_with_router_losses(mlp_only_layers):
  """All-sparse layers scan as one block, a dense first layer and two sparse ones as two runs
  (`jdistill.models.layer_runs`); the router logits sown inside the scans reach the losses."""
  from jdistill.models.transformer import stack_layers

  cfg = ModelConfig(
    model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
    num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, num_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=16, router_aux_loss_coef=0.01, router_z_loss_coef=0.001,
    scan_layers=False, remat_policy="full", mlp_only_layers=mlp_only_layers,
  )  # fmt: skip
  graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(0)))
  scanned = nnx.eval_shape(lambda: Transformer(cfg.replace(scan_layers=True), nnx.Rngs(0)))
  scanned_graphdef = nnx.graphdef(scanned)
  assert cfg.replace(scan_layers=True).scanned_runs == bool(mlp_only_layers)
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)

  def loss(state, graphdef):
    hidden, _, aux = moe.forward_with_aux_losses(nnx.merge(graphdef, state), tokens)
    return jnp.sum(hidden * hidden) + moe.weighted_aux_loss(aux, cfg), aux

  (ref, aux_ref), g_ref = jax.value_and_grad(loss, has_aux=True)(state, graphdef)
  (val, aux), g = jax.value_and_grad(loss, has_aux=True)(stack_layers(state, cfg), scanned_graphdef)
  assert set(aux) == {"router_aux_loss", "router_z_loss"}
  for k in aux:
    np.testing.assert_allclose(aux[k], aux_ref[k], rtol=1e-6)
  np.testing.assert_allclose(val, ref, rtol=1e-6)
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g_ref))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=4e-6 * scale), stack_layers(g_ref, cfg), g
  )
  mixed = cfg.replace(decoder_sparse_step=2, num_layers=8, scan_layers=None, mlp_only_layers=())
  assert mixed.scan_layers and mixed.layer_kinds == "-E" * 4  # auto: runs of a repeated unit

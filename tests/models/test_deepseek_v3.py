"""DeepSeek-V3 (MLA + shared-expert MoE with grouped sigmoid routing) against transformers'
PyTorch model: logits, the latent cache's decode, greedy tokens, export and re-import, and
the expert/tensor-sharded forward."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jdistill.models import ModelConfig, Transformer, hf, moe
from jdistill.models.mla import MLAttention
from jdistill.models.transformer import MLP, init_cache
from jdistill.runtime import sharding as shd
from jdistill.sampling import Sampler, SamplingParams
from jdistill.testing import tiny_hf
from jdistill.testing.tiny_hf import tiny_hf_model

VOCAB = 128
# tiny_hf's deepseek_v3: q latent 24, YaRN (mscale_all_dim 0.8), interleaved RoPE, layer 0
# dense and layer 1 MoE (8 experts in 4 groups, 2 kept, a shared expert)
CASES = {
  "yarn-qlora-interleave": {},
  "plain-qfull-halves": dict(q_lora_rank=None, rope_scaling=None, rope_interleave=False),
}


def _single_mesh():
  return shd.make_mesh({"data": 1}, jax.devices()[:1])


def _padded_batch():
  return tiny_hf.padded_batch(VOCAB)


_torch_logits, _forward = tiny_hf.torch_logits, tiny_hf.jax_logits


def _with_cfg(model, **kw):
  """The same weights under a config with `kw` changed."""
  other = nnx.eval_shape(lambda: Transformer(model.cfg.replace(**kw), nnx.Rngs(0)))
  return nnx.merge(nnx.graphdef(other), nnx.state(model))


def _dense(model):
  """`moe_dispatch="dense"`: a cheaper compile (the dispatches are tested equal in
  test_moe.py)."""
  return _with_cfg(model, moe_dispatch="dense")


def _jd_logits(model, tokens, mask, positions):
  graphdef, state = nnx.split(model)
  return np.asarray(
    _forward(graphdef, state, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
  )


_PAIRS: dict = {}  # case name -> (name, HF model, its folder), built once per test session


def _pair(name: str, tmp_path_factory):
  if name not in _PAIRS:
    torch_model = tiny_hf_model("deepseek_v3", vocab_size=VOCAB, **CASES[name])
    path = str(tmp_path_factory.mktemp(name))
    torch_model.save_pretrained(path)
    _PAIRS[name] = (name, torch_model, path)
  return _PAIRS[name]


@pytest.fixture(scope="module", params=list(CASES))
def ds_pair(request, tmp_path_factory):
  return _pair(request.param, tmp_path_factory)


def test_logits_match_transformers(ds_pair):
  name, torch_model, path = ds_pair
  model = hf.from_hf(path)
  if name == "yarn-qlora-interleave":
    model = _dense(model)  # the decode test's model: the forward compiles once
  else:  # the default blocked dispatch, and attention in blocks of 4 queries (11 = 4 + 4 + 3)
    model = _with_cfg(model, attention_chunk=4)
  cfg = model.cfg
  assert cfg.mla and (cfg.q_lora_rank is None) == ("qfull" in name)
  assert (cfg.rope_scaling is not None) == ("yarn" in name) and cfg.rope_interleave == (
    "interleave" in name
  )
  assert [cfg.is_moe_layer(i) for i in range(2)] == [False, True]
  assert isinstance(model.layers[0].mlp, MLP) and isinstance(model.layers[1].mlp, moe.MoE)
  assert isinstance(model.layers[0].attn, MLAttention)
  tokens, mask, positions = _padded_batch()
  ref = _torch_logits(torch_model, tokens, mask, positions)
  out = _jd_logits(model, tokens, mask, positions)
  err = np.abs(out - ref)[mask].max()
  print(f"\ndeepseek_v3 {name}: max |logits - transformers| = {err:.2e}")
  assert err <= 1e-5
  # the score-correction bias picks experts at this tolerance: without it the logits move
  state = nnx.state(model)
  bias = state["layers"][1]["mlp"]["score_bias"]
  assert np.abs(np.asarray(bias.get_value())).max() > 0.05
  bias.set_value(jnp.zeros_like(bias.get_value()))
  unbiased = np.asarray(_forward(nnx.graphdef(model), state, tokens, positions, mask))
  assert np.abs(unbiased - ref)[mask].max() > 1e-3


def test_latent_cache_decode_equals_full_forward(tmp_path_factory):
  """Every token decoded one at a time through the latent cache and the absorbed projections
  (the sampler's multi-token prefill through the cache is the greedy test's); one case: the
  cache path shares the projections."""
  _, _, path = _pair("yarn-qlora-interleave", tmp_path_factory)
  model = _dense(hf.from_hf(path))
  cfg = model.cfg
  tokens, mask, positions = _padded_batch()
  full = _jd_logits(model, tokens, mask, positions)
  graphdef, state = nnx.split(model)
  cache = init_cache(cfg, 3, 11)
  assert {k: v.shape for k, v in cache[0].items()} == {
    "latent": (3, 11, 1, cfg.kv_lora_rank),
    "k_rope": (3, 11, 1, cfg.qk_rope_head_dim),
  }

  @jax.jit
  def step(state, cache, tok, pos, index):
    m = nnx.merge(graphdef, state)
    hidden, cache = m(tok, pos, kv_mask=jnp.asarray(mask), cache=cache, cache_index=index)
    return m.logits(hidden), cache

  outs = []
  for t in range(11):
    logits, cache = step(state, cache, tokens[:, t : t + 1], positions[:, t : t + 1], t)
    outs.append(np.asarray(logits))
  decoded = np.concatenate(outs, axis=1)
  np.testing.assert_allclose(decoded[mask], full[mask], atol=1e-5)


def test_greedy_matches_transformers_generate(tmp_path_factory):
  """One case (the decode path is the cache test's)."""
  _, torch_model, path = _pair("plain-qfull-halves", tmp_path_factory)
  graphdef, state = nnx.split(_dense(hf.from_hf(path, _single_mesh())))
  prompts = [[5, 17, 99], [3, 44, 8, 61, 70, 12, 9]]
  new = 8
  sp = SamplingParams(max_new_tokens=new, temperature=0.0, prompt_buckets=(16,))
  out = Sampler(graphdef, _single_mesh()).generate(state, prompts, jax.random.key(0), sp)
  tiny_hf.assert_greedy_equals_generate(torch_model, out.tokens, prompts, new)


def test_export_loads_in_transformers_and_reimports_bit_identical(ds_pair, tmp_path):
  from transformers import AutoModelForCausalLM

  _, torch_model, path = ds_pair
  model = hf.from_hf(path)
  out_dir = str(tmp_path / "export")
  hf.to_hf(model, out_dir)
  written = json.load(open(os.path.join(out_dir, "config.json")))
  assert written["n_routed_experts"] == 8 and written["n_shared_experts"] == 1
  assert written["first_k_dense_replace"] == 1 and written["n_group"] == 4
  reloaded = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True).eval()
  assert type(reloaded).__name__ == "DeepseekV3ForCausalLM"
  tokens, mask, positions = _padded_batch()
  np.testing.assert_allclose(
    _torch_logits(reloaded, tokens, mask, positions)[mask],
    _torch_logits(torch_model, tokens, mask, positions)[mask],
    atol=1e-6,
  )
  again = hf.from_hf(out_dir)
  assert again.cfg == model.cfg
  for a, b in zip(jax.tree.leaves(nnx.state(again)), jax.tree.leaves(nnx.state(model))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # a bf16 export keeps the score-correction bias in f32, as HF does
  from safetensors import safe_open

  hf.to_hf(model, str(tmp_path / "bf16"), dtype="bfloat16")
  with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "np") as f:
    assert f.get_slice("model.layers.1.mlp.gate.e_score_correction_bias").get_dtype() == "F32"
    assert f.get_slice("model.layers.1.mlp.gate.weight").get_dtype() == "BF16"


# --- without transformers: scanned layers, sharding, config ---------------------------

SMALL = ModelConfig(
  model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
  num_heads=4, num_kv_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
  qk_rope_head_dim=4, v_head_dim=8, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=8,
  shared_expert_intermediate_size=8, n_group=4, topk_group=2, routed_scaling_factor=2.0,
  norm_topk_prob=True, scan_layers=False, moe_dispatch="dense",
)  # fmt: skip


@pytest.mark.parametrize("dense_first", [0, 1])
def test_scanned_equals_unrolled_with_latent_cache(tmp_path, dense_first):
  """All-sparse layers import scanned as one block, a dense first layer and two sparse ones
  as two runs; the stacked latent cache decodes as the unrolled forward. (Imported, not
  initialised: a jax init costs ~10 s here, torch's nothing.)"""
  path = str(tmp_path / "v3")
  tiny_hf_model(
    "deepseek_v3", vocab_size=VOCAB, first_k_dense_replace=dense_first, layers=2 + dense_first
  ).save_pretrained(path)
  unrolled = _dense(hf.from_hf(path, scan_layers=False))
  scanned = _dense(hf.from_hf(path, scan_layers=True))
  assert scanned.cfg.scan_layers and not unrolled.cfg.scan_layers
  tokens, mask, positions = _padded_batch()
  ref = _jd_logits(unrolled, tokens, mask, positions)
  sg, ss = nnx.split(scanned)

  @jax.jit
  def run(s):  # prefill 10 slots, decode the 11th, through the `[layers, ...]` cache
    m = nnx.merge(sg, s)
    cache = init_cache(m.cfg, 3, 11)
    kw = dict(kv_mask=jnp.asarray(mask))
    hidden, cache = m(tokens[:, :10], positions[:, :10], cache=cache, cache_index=0, **kw)
    last, cache = m(tokens[:, 10:], positions[:, 10:], cache=cache, cache_index=10, **kw)
    return m.logits(jnp.concatenate([hidden, last], axis=1)), cache

  decoded, cache = run(ss)
  latent = cache[1][0]["latent"] if dense_first else cache["latent"]  # the sparse layers
  assert latent.shape == (2, 3, 11, 1, scanned.cfg.kv_lora_rank)
  np.testing.assert_allclose(np.asarray(decoded)[mask], ref[mask], atol=1e-5)


def test_sharding_rules_put_experts_on_expert_and_mla_heads_on_tensor():
  """The parameter specs only (a sharded forward's compile costs ~30 s here; the rules are
  the ones the Qwen-MoE sharded forward tests exercise)."""
  mesh = shd.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
  cfg = SMALL.replace(first_k_dense_replace=1)
  _, state = shd.abstract_sharded_state(lambda: Transformer(cfg, nnx.Rngs(0)), mesh)
  spec = lambda v: v.get_value().sharding.spec  # noqa: E731
  attn, mlp = state["layers"][1]["attn"], state["layers"][1]["mlp"]
  assert spec(attn["q_a_proj"]) == P("fsdp", None)
  assert spec(attn["q_b_proj"]) == P(None, "tensor", None)
  assert spec(attn["kv_b_proj"]) == P(None, "tensor", None)
  assert spec(attn["o_proj"]) == P("tensor", None, "fsdp")
  assert spec(attn["kv_a_proj"]) == P("fsdp", None)
  assert spec(mlp["gate_proj"]) == P("expert", "fsdp", "tensor")
  assert spec(mlp["score_bias"]) == P("expert")
  assert spec(state["layers"][0]["mlp"]["gate_proj"]) == P("fsdp", "tensor")


def test_grouped_router_picks_from_the_best_groups():
  # 2 groups of 4; group 0's best two (0.9 + 0.8) beat group 1's (0.85 + 0.1)
  scores = jnp.array([[0.9, 0.8, 0.1, 0.1, 0.85, 0.1, 0.1, 0.1]])
  logits = jnp.log(scores / (1 - scores))
  weights, experts = moe.route_grouped(logits, jnp.zeros(8), 2, 2, 1, False, 1.0)
  assert sorted(np.asarray(experts[0]).tolist()) == [0, 1]
  np.testing.assert_allclose(np.sort(np.asarray(weights[0])), [0.8, 0.9], rtol=1e-6)
  # the bias only chooses: group 1 wins and expert 5 is picked, weighted by its own score
  bias = jnp.array([0, 0, 0, 0, 0, 0.9, 0, 0])
  weights, experts = moe.route_grouped(logits, bias, 2, 2, 1, True, 2.5)
  assert sorted(np.asarray(experts[0]).tolist()) == [4, 5]
  np.testing.assert_allclose(np.sort(np.asarray(weights[0])), [2.5 * 0.1 / 0.95, 2.5 * 0.85 / 0.95])


@pytest.mark.parametrize(
  "kw,match",
  [
    (dict(n_group=3), "n_group"),
    (dict(topk_group=5), "topk_group"),
    (dict(n_group=8, topk_group=1), "n_group"),  # one expert per group
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(qk_rope_head_dim=3), "qk_rope_head_dim"),
    (dict(router_aux_loss_coef=0.01), "router_aux_loss_coef"),
    (dict(first_k_dense_replace=3), "first_k_dense_replace"),
    (dict(rope_scaling=(("factor", 4.0), ("rope_type", "yarn"))), "original_max_position"),
  ],
)
def test_bad_deepseek_config(kw, match):
  with pytest.raises(ValueError, match=match):
    SMALL.replace(**kw)


def test_score_bias_moves_by_the_load_rule_on_a_constructed_batch():
  """DeepSeek-V3's auxiliary-loss-free balancing against a NumPy reference of its rule,
  `bias + γ · sign(mean load − load)`, on chosen experts `[batch 2, seq 6, k 2]` over 4
  experts: expert 0 takes every real token, expert 3 none, and the 5 padded positions pick
  experts 3 and 2 (counted, expert 2 would be the busiest and fall instead of rising)."""
  real = [[0, 1], [0, 2], [0, 1], [0, 2], [0, 1], [1, 0]]
  experts = np.array([real, [[0, 1]] + [[3, 2]] * 5], np.int32)
  mask = np.array([[1] * 6, [1] + [0] * 5], bool)
  expert_load = jax.jit(moe.expert_load, static_argnums=1)  # a compile, not 20 eager ops
  next_score_bias = jax.jit(moe.next_score_bias, static_argnums=3)
  load = np.zeros(4)
  for e in experts[mask].reshape(-1):
    load[e] += 1  # [7, 5, 2, 0]
  got = expert_load(jnp.asarray(experts), 4, jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(got), load)
  unmasked = np.asarray(expert_load(jnp.asarray(experts), 4))  # [7, 5, 7, 5]
  assert np.sign(unmasked.mean() - unmasked)[2] < 0 < np.sign(load.mean() - load)[2]
  gamma = 1e-3
  bias = np.array([0.3, -0.1, 0.2, 0.05], np.float32)
  expect = bias + gamma * np.sign(load.mean() - load)
  mlp = lambda b, r: {"layers": {1: {"mlp": {"score_bias": jnp.asarray(b), "router": r}}}}  # noqa: E731
  before = mlp(bias, jnp.ones(2))
  after = mlp(bias * 0.9, jnp.zeros(2))  # the optimizer's: router trained, bias decayed
  new = next_score_bias(after, before, {("layers", 1, "mlp"): got}, gamma)["layers"][1]["mlp"]
  np.testing.assert_allclose(np.asarray(new["score_bias"]), expect, rtol=0, atol=1e-7)
  assert new["score_bias"][0] < bias[0] and new["score_bias"][3] > bias[3]  # busy falls, idle rises
  np.testing.assert_array_equal(np.asarray(new["router"]), 0)  # the rest is the optimizer's
  off = next_score_bias(after, before, {}, 0.0)["layers"][1]["mlp"]["score_bias"]
  np.testing.assert_array_equal(np.asarray(off), bias)  # off: the bias stays as it was
  # scanned layers: a `[layers, experts]` bias and load, the rule per layer
  stacked = np.stack([load, load[::-1]])
  got2 = expert_load(jnp.asarray(np.stack([experts, 3 - experts])), 4, jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(got2), stacked)
  np.testing.assert_allclose(
    np.asarray(moe.balance_score_bias(jnp.zeros((2, 4)), got2, gamma)),
    gamma * np.sign(stacked.mean(-1, keepdims=True) - stacked),
  )


@pytest.mark.parametrize("dense_first", [0, 1])
def test_train_step_scanned_equals_unrolled_with_the_bias_update(tmp_path, dense_first):
  """An all-sparse DeepSeek-V3 (2 layers, one scan) and V3's own stack, a dense first layer
  then MoE (3 layers, two runs: `jdistill.models.layer_runs`), take the same OPD step scanned
  as unrolled: loss, params, and each layer's bias moved by the load rule (`[layers,
  experts]` under scan)."""
  import functools

  from jdistill.losses import LossSettings
  from jdistill.models.transformer import stack_layers
  from jdistill.step import common
  from jdistill.step import opd as ts

  paths = {}
  for seed, name in enumerate(("student", "teacher")):
    paths[name] = str(tmp_path / name)
    model = tiny_hf_model(
      "deepseek_v3", vocab_size=VOCAB, first_k_dense_replace=dense_first, seed=seed,
      layers=2 + dense_first,
    )  # fmt: skip
    model.save_pretrained(paths[name])
  cfg = hf.load_hf_config(paths["student"], scan_layers=True)
  assert cfg.scanned_runs == bool(dense_first)
  teacher = nnx.split(_dense(hf.from_hf(paths["teacher"], scan_layers=False)))
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
  opt, sched = common.make_optimizer(1e-2, steps=10, weight_decay=0.1)
  gamma = 0.01

  def step(scan_layers):
    graphdef, params = nnx.split(_dense(hf.from_hf(paths["student"], scan_layers=scan_layers)))
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32)}
    run = functools.partial(
      ts.train_step, student_graphdef=graphdef, teacher_graphdefs=(teacher[0],), specs=specs,
      optimizer=opt, schedule=sched, score_bias_speed=gamma,
    )  # fmt: skip
    new_state, metrics = jax.jit(run)(state, (teacher[1],), batch)
    first_moment = optax.tree_utils.tree_get(new_state["opt_state"], "mu")  # (1 - b1) · grads
    return params, new_state["params"], float(metrics["loss"]), first_moment

  before, unrolled, ref_loss, ref_mu = step(False)
  _, scanned, loss, mu = step(True)
  assert np.isfinite(ref_loss) and abs(loss - ref_loss) <= 1e-5
  before, unrolled = stack_layers(before, cfg), stack_layers(unrolled, cfg)
  # the gradients, not the updated weights: Adam's first update is lr·g/(|g| + eps), which
  # f32 reordering moves by a share of lr where |g| is near 0 (1.2e-4 of lr 1e-2, measured)
  for a, b in zip(jax.tree.leaves(stack_layers(ref_mu, cfg)), jax.tree.leaves(mu), strict=True):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * np.abs(a).max() + 1e-12)
  block = lambda p: p["layers"][1]["block"]["layer_0"] if dense_first else p["layers"]["block"]  # noqa: E731
  bias = lambda p: np.asarray(block(p)["mlp"]["score_bias"].get_value())  # noqa: E731
  moved = bias(scanned) - bias(before)  # [layers 2, experts 8]
  assert moved.shape == (2, 8)
  np.testing.assert_allclose(np.abs(moved), gamma, rtol=1e-4)  # each expert by ±γ (no ties)
  assert ((moved > 0).sum(1) > 0).all() and ((moved < 0).sum(1) > 0).all()
  np.testing.assert_array_equal(bias(scanned), bias(unrolled))

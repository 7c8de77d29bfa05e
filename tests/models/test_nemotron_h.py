"""Nemotron-H (Mamba-2 + attention + MLP + MoE layers in `layer_pattern`'s order) against
transformers' PyTorch model (its torch path, no CUDA kernels): the Mamba-2 mixer, logits on a
padded batch, decode through the hybrid cache, greedy tokens, export and re-import."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P

from jdistill.models import ModelConfig, Transformer, hf
from jdistill.models.mamba2 import Mamba2
from jdistill.models.transformer import init_cache
from jdistill.runtime import sharding as shd
from jdistill.sampling import Sampler, SamplingParams
from jdistill.testing import tiny_hf
from jdistill.testing.tiny_hf import tiny_hf_model

VOCAB = 128
_torch_logits, _forward = tiny_hf.torch_logits, tiny_hf.jax_logits


def _single_mesh():
  return shd.make_mesh({"data": 1}, jax.devices()[:1])


def _with_cfg(model, **kw):
  """The same weights under a config with `kw` changed."""
  other = nnx.eval_shape(lambda: Transformer(model.cfg.replace(**kw), nnx.Rngs(0)))
  return nnx.merge(nnx.graphdef(other), nnx.state(model))


def _jd_logits(model, tokens, mask, positions):
  graphdef, state = nnx.split(model)
  return np.asarray(
    _forward(graphdef, state, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
  )


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """tiny_hf's nemotron_h ("M*-EM": every layer kind, SSD chunks of 4), saved; the imported
  model runs the dense MoE dispatch (one cheap compile; the dispatches are test_moe's)."""
  torch_model = tiny_hf_model("nemotron_h", vocab_size=VOCAB)
  path = str(tmp_path_factory.mktemp("nemotron_h"))
  torch_model.save_pretrained(path)
  model = _with_cfg(hf.from_hf(path), moe_dispatch="dense")
  return torch_model, path, model


def test_mamba2_mixer_matches_transformers(pair):
  """The mixer alone on a padded batch, and the chunked scan's independence of its chunk size
  (11 tokens: chunks of 4 with a padded last one, one chunk of 16; one compile)."""
  torch_model, _, model = pair
  tokens, mask, _ = tiny_hf.padded_batch(VOCAB)
  x = np.random.RandomState(1).randn(*tokens.shape, model.cfg.hidden_size).astype(np.float32)
  with torch.no_grad():
    ref = torch_model.model.layers[0].mixer(torch.tensor(x), attention_mask=torch.tensor(mask))
  ref = ref.numpy()
  mixer = model.layers[0].mixer
  assert isinstance(mixer, Mamba2) and model.cfg.mamba_chunk_size == 4

  @jax.jit
  def run(state, x, mask):
    outs = []
    for chunk in (4, 16):
      m = nnx.merge(nnx.graphdef(mixer), state)
      m.cfg = m.cfg.replace(mamba_chunk_size=chunk)
      outs.append(m(x, mask, None, 0)[0])
    return outs

  out, one_chunk = map(np.asarray, run(nnx.state(mixer), x, mask))
  err = np.abs(out - ref).max()
  print(f"\nnemotron_h Mamba-2 mixer: max |out - transformers| = {err:.2e}")
  assert err <= 1e-5
  np.testing.assert_allclose(one_chunk, out, atol=1e-5)


def test_mamba2_mixer_gradients_match_torch_autograd(pair):
  """Training through the chunked scan: the gradients of a fixed projection of the mixer's
  output, for its input and the SSM's own parameters, equal torch autograd's (finite: the
  scan's -inf masks carry no NaN back)."""
  torch_model, _, model = pair
  tokens, mask, _ = tiny_hf.padded_batch(VOCAB)
  rng = np.random.RandomState(2)
  x = rng.randn(*tokens.shape, model.cfg.hidden_size).astype(np.float32)
  probe = rng.randn(*x.shape).astype(np.float32)
  hf_mixer = torch_model.model.layers[0].mixer
  x_t = torch.tensor(x, requires_grad=True)
  (hf_mixer(x_t, attention_mask=torch.tensor(mask)) * torch.tensor(probe)).sum().backward()
  mixer = model.layers[0].mixer
  graphdef = nnx.graphdef(mixer)

  @jax.jit
  def grads(params, x):
    def f(params, x):
      return jnp.sum(nnx.merge(graphdef, params)(x, mask, None, 0)[0] * probe)

    return jax.grad(f, argnums=(0, 1))(params, x)

  g_params, g_x = grads(nnx.state(mixer), x)
  np.testing.assert_allclose(np.asarray(g_x), x_t.grad.numpy(), atol=1e-5)
  for name in ("A_log", "D", "dt_bias"):
    ours = np.asarray(g_params[name].get_value())
    ref = getattr(hf_mixer, name).grad.numpy()
    scale = np.abs(ref).max()
    assert np.isfinite(ours).all() and scale > 1e-4
    np.testing.assert_allclose(ours, ref, atol=1e-3 * scale, rtol=1e-3)


def test_logits_match_transformers(pair):
  """Padded batch (left padding 0 / 4 / 7); the padded row also equals transformers on the
  unpadded row (padding adds nothing to the conv or SSM state)."""
  torch_model, _, model = pair
  cfg = model.cfg
  assert cfg.layer_pattern == "M*-EM" and cfg.hybrid and not cfg.scan_layers
  kinds = [type(b.mixer).__name__ for b in model.layers]
  assert kinds == ["Mamba2", "Attention", "MLP", "MoE", "Mamba2"]
  tokens, mask, positions = tiny_hf.padded_batch(VOCAB)
  ref = _torch_logits(torch_model, tokens, mask, positions)
  out = _jd_logits(model, tokens, mask, positions)
  err = np.abs(out - ref)[mask].max()
  scale = np.abs(ref).max()
  print(f"\nnemotron_h M*-EM: max |logits - transformers| = {err:.2e} (|logits| <= {scale:.2f})")
  assert err <= 1e-5
  real = tokens[2][mask[2]][None]
  alone = _torch_logits(torch_model, real, np.ones_like(real, bool), np.arange(real.shape[1])[None])
  np.testing.assert_allclose(out[2][mask[2]], alone[0], atol=1e-5)


def test_cache_decode_equals_full_forward(pair):
  """Through the hybrid cache (K/V for `*`, conv + SSM state for `M`): a 4-token prefill, a
  4-token continuation (the chunked scan from a held state) and 3 one-token steps (the
  recurrent step) equal the full forward. The prefill at slot 0 restarts the Mamba states: a
  cache already holding another sequence's gives the same logits."""
  _, _, model = pair
  cfg = model.cfg
  tokens, mask, positions = tiny_hf.padded_batch(VOCAB)
  full = _jd_logits(model, tokens, mask, positions)
  graphdef, state = nnx.split(model)
  cache = init_cache(cfg, 3, 11)
  mamba = ["conv_bc", "conv_x", "ssm"]
  assert [sorted(c) for c in cache] == [mamba, ["k", "v"], [], [], mamba]
  assert cache[0]["ssm"].shape == (3, 8, 8, 16) and cache[0]["ssm"].dtype == jnp.float32
  assert cache[0]["conv_x"].shape == (3, 3, 8, 8) and cache[0]["conv_bc"].shape == (3, 3, 2, 2, 16)

  @jax.jit
  def step(state, cache, tok, pos, index):
    m = nnx.merge(graphdef, state)
    hidden, cache = m(tok, pos, kv_mask=jnp.asarray(mask), cache=cache, cache_index=index)
    return m.logits(hidden), cache

  def decode(cache):
    outs = []
    for start, stop in [(0, 4), (4, 8)] + [(t, t + 1) for t in range(8, 11)]:
      logits, cache = step(state, cache, tokens[:, start:stop], positions[:, start:stop], start)
      outs.append(np.asarray(logits))
    return np.concatenate(outs, axis=1), cache

  decoded, used = decode(cache)
  np.testing.assert_allclose(decoded[mask], full[mask], atol=1e-5)
  assert np.abs(np.asarray(used[0]["ssm"])).max() > 0
  again, _ = decode(used)  # the held states are the finished rows': slot 0 ignores them
  np.testing.assert_allclose(again[mask], full[mask], atol=1e-5)


def test_greedy_matches_transformers_generate(pair):
  torch_model, path, _ = pair
  graphdef, state = nnx.split(_with_cfg(hf.from_hf(path, _single_mesh()), moe_dispatch="dense"))
  prompts = [[5, 17, 99], [3, 44, 8, 61, 70, 12, 9]]
  new = 8
  sp = SamplingParams(max_new_tokens=new, temperature=0.0, prompt_buckets=(16,))
  out = Sampler(graphdef, _single_mesh()).generate(state, prompts, jax.random.key(0), sp)
  tiny_hf.assert_greedy_equals_generate(torch_model, out.tokens, prompts, new)


def test_export_loads_in_transformers_and_reimports_bit_identical(pair, tmp_path):
  from transformers import AutoModelForCausalLM

  torch_model, path, _ = pair
  model = hf.from_hf(path)
  out_dir = str(tmp_path / "export")
  hf.to_hf(model, out_dir)
  written = json.load(open(os.path.join(out_dir, "config.json")))
  assert written["layers_block_type"] == [
    "linear_attention", "full_attention", "mlp", "moe", "linear_attention"
  ]  # fmt: skip
  reloaded = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True).eval()
  assert type(reloaded).__name__ == "NemotronHForCausalLM"
  tokens, mask, positions = tiny_hf.padded_batch(VOCAB)
  np.testing.assert_allclose(
    _torch_logits(reloaded, tokens, mask, positions)[mask],
    _torch_logits(torch_model, tokens, mask, positions)[mask],
    atol=1e-6,
  )
  again = hf.from_hf(out_dir)
  assert again.cfg == model.cfg
  for a, b in zip(jax.tree.leaves(nnx.state(again)), jax.tree.leaves(nnx.state(model))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_loads_back_bit_identical(pair, tmp_path):
  """A jdistill checkpoint of the hybrid model (its model_config.json holds the pattern and
  `time_step_limit`'s infinity) loads back as a model, e.g. a teacher."""
  from jdistill.runtime import checkpoint as ckpt

  _, _, model = pair
  checkpointer = ckpt.Checkpointer(str(tmp_path / "ck"), every=1, keep=1, async_save=False)
  checkpointer.write_model_config(model.cfg)
  zero = jnp.zeros((), jnp.int32)
  state = {"params": nnx.state(model), "opt_state": {"count": zero}, "step": zero}
  ckpt.save_train_state(checkpointer, 1, state, rng=jax.random.key(0), data_state={}, identity={})
  checkpointer.wait()
  checkpointer.close()
  loaded = ckpt.load_model_from_checkpoint(str(tmp_path / "ck"), _single_mesh())
  assert loaded.cfg == model.cfg and loaded.cfg.time_step_limit == (0.0, float("inf"))
  for a, b in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(nnx.state(model))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def one_device_step(pair):
  return tiny_hf.opd_step(pair[2], VOCAB)


def test_opd_step_trains_a_nemotron_student(one_device_step):
  """The compiled OPD step with the imported Nemotron-H as the student (`tiny_hf.opd_step`): every
  weight of every kind moves, finitely (but the MoE's score-correction bias, which gets no
  gradient), and a second step on the same batch has a lower loss. (Imported, not
  initialised: a jax init costs ~17 s here.)"""
  params, new, metrics, again, grads = one_device_step
  assert float(metrics["finite"]) == 1 and np.isfinite(float(metrics["loss"]))
  assert again < float(metrics["loss"])
  before = jax.tree_util.tree_leaves_with_path(params)
  for (path, a), b, g in zip(before, jax.tree.leaves(new), jax.tree.leaves(grads), strict=True):
    moved = not np.array_equal(np.asarray(a), np.asarray(b))
    assert np.isfinite(np.asarray(b)).all() and moved == ("score_bias" not in str(path)), path
    assert np.abs(np.asarray(g)).max() > 0 or "score_bias" in str(path), path


def test_train_step_on_8_devices_equals_one_device(pair, one_device_step):
  """On 8 simulated devices (fsdp 2 x expert 2 x tensor 2): Mamba heads on `tensor`, experts
  on `expert`, the rows over fsdp x expert; the OPD step's loss, every gradient and the next
  step's loss equal one device's to f32 reordering (`tiny_hf.assert_step_equals_one_device`)."""
  _, path, _ = pair
  mesh = shd.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
  sharded = _with_cfg(hf.from_hf(path, mesh), moe_dispatch="dense")
  params = nnx.state(sharded, nnx.Param)
  spec = lambda v: v.get_value().sharding.spec  # noqa: E731
  mamba, moe = params["layers"][0]["mixer"], params["layers"][3]["mixer"]
  assert spec(mamba["x_proj"]) == P("fsdp", "tensor", None)
  assert spec(mamba["out_proj"]) == P("tensor", None, "fsdp")
  assert spec(mamba["A_log"]) == P("tensor")
  assert spec(mamba["bc_proj"]) == P("fsdp", None, None, None)
  assert spec(moe["up_proj"]) == P("expert", "fsdp", "tensor")
  assert mamba["x_proj"].get_value().addressable_shards[0].data.shape == (32, 4, 8)
  result = tiny_hf.opd_step(sharded, VOCAB, mesh)
  assert result[1]["layers"][0]["mixer"]["x_proj"].get_value().addressable_shards[0].data.shape == (
    32, 4, 8,
  )  # fmt: skip
  tiny_hf.assert_step_equals_one_device(one_device_step, result)


SMALL = ModelConfig(
  model_type="nemotron_h", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4,
  num_heads=4, num_kv_heads=2, head_dim=8, layer_pattern="M*-E", mamba_num_heads=4,
  mamba_head_dim=8, ssm_state_size=8, mamba_n_groups=2, num_experts=8, num_experts_per_tok=2,
  moe_intermediate_size=8, n_group=4, topk_group=2,
)  # fmt: skip


@pytest.mark.parametrize(
  "kw,match",
  [
    (dict(layer_pattern="M*-"), "layer_pattern"),  # 3 characters for 4 layers
    (dict(layer_pattern="M*-X"), "layer_pattern"),
    (dict(layer_pattern="M*--"), "num_experts"),  # experts without an E layer
    (dict(mamba_n_groups=3), "mamba_n_groups"),
    (dict(ssm_state_size=0), "ssm_state_size"),
    (dict(conv_kernel=1), "conv_kernel"),
    (dict(mamba_chunk_size=True), "mamba_chunk_size"),
    (dict(time_step_limit=(0.1, 0.0)), "time_step_limit"),
    (dict(scan_layers=True), "scan_layers"),
    (dict(model_type="llama", num_experts=0, layer_pattern="M*-E"), "layer_pattern"),
  ],
)
def test_bad_nemotron_config(kw, match):
  with pytest.raises(ValueError, match=match):
    SMALL.replace(**kw)


def test_unsupported_hf_fields_raise_naming_them():
  base = hf.config_to_hf(SMALL)
  assert hf.config_from_hf(base) == SMALL.replace(max_position_embeddings=32768)
  unsupported = [("moe_latent_size", 16), ("use_bias", True), ("attention_bias", True),
                 ("mlp_hidden_act", "gelu")]  # fmt: skip
  for field, value in unsupported:
    with pytest.raises(ValueError, match=field):
      hf.config_from_hf({**base, field: value})
  packed = dict(segment_ids=jnp.ones((1, 4), jnp.int32))
  model = nnx.eval_shape(lambda: Transformer(SMALL, nnx.Rngs(0)))
  with pytest.raises(ValueError, match="segment_ids"):
    model(jnp.zeros((1, 4), jnp.int32), **packed)

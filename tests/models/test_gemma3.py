"""Gemma 3 text (interleaved sliding-window and global attention) against transformers'
PyTorch `Gemma3ForCausalLM`: logits on a padded batch longer than the window, the sliding
layers' ring-buffer cache against the full forward, greedy tokens against `generate`, export
and re-import."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jdistill.models import ModelConfig, Transformer, hf, init_cache
from jdistill.models.transformer import GemmaBlock
from jdistill.runtime import sharding as shd
from jdistill.sampling import Sampler, SamplingParams
from jdistill.testing import tiny_hf
from jdistill.testing.tiny_hf import tiny_hf_model

VOCAB = 128
WINDOW = 4  # tiny_hf's gemma3_text, 2 layers: layer 0 slides over 4 keys, layer 1 is global
_torch_logits, _forward = tiny_hf.torch_logits, tiny_hf.jax_logits


def _jd_logits(model, tokens, mask, positions):
  graphdef, state = nnx.split(model)
  return np.asarray(
    _forward(graphdef, state, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
  )


def _with_cfg(model, **kw):
  """The same weights under a config with `kw` changed."""
  other = nnx.eval_shape(lambda: Transformer(model.cfg.replace(**kw), nnx.Rngs(0)))
  return nnx.merge(nnx.graphdef(other), nnx.state(model))


@pytest.fixture(scope="module")
def gemma_pair(tmp_path_factory):
  torch_model = tiny_hf_model("gemma3_text", vocab_size=VOCAB, layers=2, tie=True)
  path = str(tmp_path_factory.mktemp("gemma3"))
  torch_model.save_pretrained(path)
  return torch_model, path


def test_logits_match_transformers(gemma_pair):
  torch_model, path = gemma_pair
  model = hf.from_hf(path)
  cfg = model.cfg
  assert cfg.gemma and cfg.tie_word_embeddings and cfg.qk_norm
  assert cfg.layer_types == ("sliding_attention", "full_attention")
  assert (cfg.sliding_window, cfg.rope_local_theta, cfg.query_pre_attn_scalar) == (4, 100.0, 24)
  assert dict(cfg.rope_scaling) == {"rope_type": "linear", "factor": 2.0}
  assert isinstance(model.layers[0], GemmaBlock) and model.layers[0].attn.sliding
  tokens, mask, positions = tiny_hf.padded_batch(VOCAB)  # 11 slots, rows of 11, 7 and 4 tokens
  ref = _torch_logits(torch_model, tokens, mask, positions)
  out = _jd_logits(model, tokens, mask, positions)
  err = np.abs(out - ref)[mask].max()
  print(f"\ngemma3_text: max |logits - transformers| = {err:.2e}")
  assert err <= 1e-5
  # the window matters on this batch: transformers' same weights without it are far off
  # (so the match above is the window's; the same seed draws the same weights)
  unwindowed = tiny_hf_model("gemma3_text", vocab_size=VOCAB, layers=2, tie=True, sliding_window=64)
  unwindowed_ref = _torch_logits(unwindowed, tokens, mask, positions)
  assert np.abs(unwindowed_ref - ref)[mask].max() > 1e-3
  # and query blocks of 3 (11 = 3 + 3 + 3 + 2) keep the window
  chunked = _jd_logits(_with_cfg(model, attention_chunk=3), tokens, mask, positions)
  assert np.abs(chunked - ref)[mask].max() <= 1e-5


def test_ring_cache_decode_equals_full_forward(gemma_pair):
  """A 6-token prefill through the cache (more than the ring holds), then 5 tokens decoded
  one at a time; the sliding layers' caches hold only the window's 4 slots."""
  _, path = gemma_pair
  model = hf.from_hf(path)
  tokens, mask, positions = tiny_hf.padded_batch(VOCAB)
  full = _jd_logits(model, tokens, mask, positions)
  cache = init_cache(model.cfg, 3, 11)
  assert [layer["k"].shape[1] for layer in cache] == [WINDOW, 11]
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, cache, tok, pos, index):
    m = nnx.merge(graphdef, state)
    hidden, cache = m(tok, pos, kv_mask=jnp.asarray(mask), cache=cache, cache_index=index)
    return m.logits(hidden), cache

  logits, cache = step(state, cache, tokens[:, :6], positions[:, :6], 0)
  outs = [np.asarray(logits)]
  for t in range(6, 11):
    logits, cache = step(state, cache, tokens[:, t : t + 1], positions[:, t : t + 1], t)
    outs.append(np.asarray(logits))
  decoded = np.concatenate(outs, axis=1)
  err = np.abs(decoded - full)[mask].max()
  print(f"\ngemma3_text: max |cached decode - full forward| = {err:.2e}")
  assert err <= 1e-5


def test_greedy_matches_transformers_generate(gemma_pair):
  """Prompts of 3 and 8 tokens and 8 new ones: both rows run past the window (the sampler's
  cache is 8 + 8 slots, its sliding layers' rings 4)."""
  torch_model, path = gemma_pair
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  graphdef, state = nnx.split(hf.from_hf(path, mesh))
  prompts = [[5, 17, 99], [3, 44, 8, 61, 70, 12, 9, 31]]  # the second fills the bucket
  new = 8
  sp = SamplingParams(max_new_tokens=new, temperature=0.0, prompt_buckets=(8,))
  out = Sampler(graphdef, mesh).generate(state, prompts, jax.random.key(0), sp)
  tiny_hf.assert_greedy_equals_generate(torch_model, out.tokens, prompts, new)


def test_export_loads_in_transformers_and_reimports_bit_identical(gemma_pair, tmp_path):
  from transformers import AutoModelForCausalLM

  torch_model, path = gemma_pair
  model = hf.from_hf(path)
  out_dir = str(tmp_path / "export")
  hf.to_hf(model, out_dir)
  reloaded = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True).eval()
  assert type(reloaded).__name__ == "Gemma3ForCausalLM"
  assert reloaded.config.layer_types == torch_model.config.layer_types
  assert reloaded.config.rope_parameters == torch_model.config.rope_parameters
  tokens, mask, positions = tiny_hf.padded_batch(VOCAB)
  np.testing.assert_array_equal(
    _torch_logits(reloaded, tokens, mask, positions)[mask],
    _torch_logits(torch_model, tokens, mask, positions)[mask],
  )
  again = hf.from_hf(out_dir)
  assert again.cfg == model.cfg
  for a, b in zip(jax.tree.leaves(nnx.state(again)), jax.tree.leaves(nnx.state(model))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_loads_back_bit_identical(gemma_pair, tmp_path):
  """A jdistill checkpoint of the Gemma 3 model (its `model_config.json` holds `layer_types`
  as a JSON list) loads back, as a teacher is, with the same config and weights."""
  from jdistill.runtime import checkpoint as ckpt
  from jdistill.step import common

  model = hf.from_hf(gemma_pair[1])
  checkpointer = ckpt.Checkpointer(str(tmp_path / "ck"), every=1, keep=1, async_save=False)
  checkpointer.write_model_config(model.cfg)
  params = nnx.state(model)
  opt, _ = common.make_optimizer(1e-3, steps=10)
  state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32)}
  ckpt.save_train_state(checkpointer, 1, state, rng=jax.random.key(0), data_state={}, identity={})
  checkpointer.close()
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  loaded = ckpt.load_model_from_checkpoint(str(tmp_path / "ck"), mesh)
  assert loaded.cfg == model.cfg
  for a, b in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


SMALL = ModelConfig(
  model_type="gemma3_text",
  num_layers=2,
  layer_types=("sliding_attention", "full_attention"),
  sliding_window=4,
  qk_norm=True,
)


def test_train_step_on_8_devices_equals_one_device(gemma_pair):
  """On a data 2 x fsdp 2 x tensor 2 mesh, the imported model's params are placed by the
  rules (the four norms replicated, the tied embedding over vocab and fsdp), and the OPD step
  (12 tokens: the sliding layer's window of 4 masks keys in training too) equals one
  device's: loss, gradient norm, every gradient and the next step's loss."""
  _, path = gemma_pair
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = hf.from_hf(path, mesh)
  spec = lambda v: v.get_value().sharding.spec  # noqa: E731
  state = nnx.state(sharded, nnx.Param)
  layer = state["layers"][0]
  assert spec(layer["attn"]["q_proj"]) == P("fsdp", "tensor", None)
  assert spec(layer["attn"]["o_proj"]) == P("tensor", None, "fsdp")
  assert spec(layer["mlp"]["down_proj"]) == P("tensor", "fsdp")
  for norm in ("input_norm", "post_attn_norm", "pre_mlp_norm", "post_mlp_norm"):
    assert spec(layer[norm]) == P(None)
  assert spec(state["embed"]) == P("tensor", "fsdp")
  one = tiny_hf.opd_step(hf.from_hf(path), VOCAB)
  assert float(one[2]["finite"]) == 1 and one[3] < float(one[2]["loss"])
  tiny_hf.assert_step_equals_one_device(one, tiny_hf.opd_step(sharded, VOCAB, mesh))


@pytest.mark.parametrize(
  "kw,match",
  [
    (dict(layer_types=("sliding_attention",)), "layer_types"),
    (dict(layer_types=("sliding_attention", "local")), "layer_types"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(query_pre_attn_scalar=0), "query_pre_attn_scalar"),
    (dict(scan_layers=True), "scan_layers"),
    (dict(qk_norm=False), "qk_norm"),
    (dict(model_type="llama"), "layer_types"),
  ],
)
def test_bad_gemma_config(kw, match):
  with pytest.raises(ValueError, match=match):
    SMALL.replace(**kw)


def test_older_config_format_reads_the_same(gemma_pair):
  """A `config.json` of transformers 4 (`rope_theta`, `rope_scaling`, `rope_local_base_freq`,
  `sliding_window_pattern`, no `layer_types`) gives the same ModelConfig."""
  import json
  import os

  with open(os.path.join(gemma_pair[1], "config.json")) as f:
    config = json.load(f)
  old = {k: v for k, v in config.items() if k not in ("rope_parameters", "layer_types")}
  old.update(
    rope_theta=10000.0,
    rope_scaling={"rope_type": "linear", "factor": 2.0},
    rope_local_base_freq=100.0,
    sliding_window_pattern=2,
  )
  assert hf.config_from_hf(old) == hf.config_from_hf(config)


@pytest.mark.parametrize(
  "field,value",
  [
    ("final_logit_softcapping", 30.0),
    ("attn_logit_softcapping", 50.0),
    ("hidden_activation", "gelu"),
    ("use_bidirectional_attention", True),
  ],
)
def test_unsupported_gemma_hf_fields_name_the_field(gemma_pair, field, value):
  import json
  import os

  with open(os.path.join(gemma_pair[1], "config.json")) as f:
    config = json.load(f)
  with pytest.raises(ValueError, match=field):
    hf.config_from_hf(dict(config, **{field: value}))

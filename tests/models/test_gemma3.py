"""Gemma 3 text (interleaved sliding-window and global attention) against transformers'
PyTorch `Gemma3ForCausalLM`: logits on a padded batch longer than the window, the sliding
layers' ring-buffer cache against the full forward, greedy tokens against `generate`, export
and re-import."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
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
  cache is 8 + 8 slots, its sliding layers' rings 4). Continuous batching with one slot
  gives the same tokens: the second prompt is prefilled into the ring the first one left."""
  torch_model, path = gemma_pair
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  graphdef, state = nnx.split(hf.from_hf(path, mesh))
  prompts = [[5, 17, 99], [3, 44, 8, 61, 70, 12, 9, 31]]  # the second fills the bucket
  new = 8
  sp = SamplingParams(
    max_new_tokens=new, temperature=0.0, prompt_buckets=(8,), key_schedule="prompt"
  )
  sampler = Sampler(graphdef, mesh)
  out = sampler.generate(state, prompts, jax.random.key(0), sp)
  refilled, _ = sampler.generate_continuous(
    state, prompts, jax.random.key(0), sp, slots_per_group=1
  )
  np.testing.assert_array_equal(np.asarray(refilled.tokens), np.asarray(out.tokens))
  torch_model.generation_config.eos_token_id = None
  for b, prompt in enumerate(prompts):
    with torch.no_grad():
      ref = torch_model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
      )
    np.testing.assert_array_equal(np.asarray(out.tokens[b, : len(prompt) + new]), ref[0].numpy())


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


def test_sharded_forward_on_eight_devices_equals_transformers(gemma_pair):
  """The parameters sharded over a data x fsdp x tensor mesh of 8 by the rules (the norms
  replicated), the batch over data: the same logits. (A sharded train step compiles for ~20 s
  here, per mesh; the step itself is family-agnostic and tested 1-vs-8 in test_opd.)"""
  torch_model, path = gemma_pair
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  graphdef, state = nnx.split(hf.from_hf(path, mesh))
  layer = state["layers"][0]
  assert layer["attn"]["q_proj"].get_value().sharding.spec == P("fsdp", "tensor", None)
  assert layer["pre_mlp_norm"].get_value().sharding.spec == P(None)
  tokens, mask, positions = (np.concatenate([a, a[:1]]) for a in tiny_hf.padded_batch(VOCAB))
  ref = _torch_logits(torch_model, tokens, mask, positions)
  batch = shd.batch_sharding(mesh, 2)
  args = [jax.device_put(jnp.asarray(a), batch) for a in (tokens, positions, mask)]
  out = np.asarray(_forward(graphdef, state, *args))
  assert np.abs(out - ref)[mask].max() <= 1e-5


SMALL = ModelConfig(
  model_type="gemma3_text",
  num_layers=2,
  layer_types=("sliding_attention", "full_attention"),
  sliding_window=4,
  qk_norm=True,
)


@pytest.mark.parametrize(
  "kw,match",
  [
    (dict(layer_types=("sliding_attention",)), "layer_types"),
    (dict(layer_types=("sliding_attention", "local")), "layer_types"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(query_pre_attn_scalar=0), "query_pre_attn_scalar"),
    (dict(scan_layers=True), "scan_layers"),
    (dict(model_type="llama"), "layer_types"),
  ],
)
def test_bad_gemma_config(kw, match):
  with pytest.raises(ValueError, match=match):
    SMALL.replace(**kw)


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

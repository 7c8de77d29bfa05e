"""Models against transformers' PyTorch reference; HF import/export; sharded forward."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jdistill.models import ModelConfig, Transformer, hf
from jdistill.runtime import sharding as shd
from jdistill.testing import tiny_hf
from jdistill.testing.tiny_hf import tiny_hf_model

VOCAB = 128


def _padded_batch():
  return tiny_hf.padded_batch(VOCAB)


_torch_logits, _forward = tiny_hf.torch_logits, tiny_hf.jax_logits


def _jd_logits(model, tokens, mask, positions):
  graphdef, state = nnx.split(model)
  return np.asarray(
    _forward(graphdef, state, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
  )


@pytest.fixture(
  scope="module",
  params=[
    ("llama", False),
    ("llama", True),
    ("qwen2", False),
    ("qwen2", True),
    ("qwen3", False),
    ("qwen3", True),
  ],
  ids=lambda p: f"{p[0]}-{'tied' if p[1] else 'untied'}",
)
def hf_pair(request, tmp_path_factory):
  kind, tie = request.param
  torch_model = tiny_hf_model(kind, tie=tie, vocab_size=VOCAB)
  path = str(tmp_path_factory.mktemp(f"{kind}{tie}"))
  torch_model.save_pretrained(path)
  return kind, tie, torch_model, path


def test_logits_match_transformers(hf_pair):
  kind, tie, torch_model, path = hf_pair
  model = hf.from_hf(path)
  assert model.cfg.tie_word_embeddings == tie
  assert model.cfg.qkv_bias == (kind == "qwen2") and model.cfg.qk_norm == (kind == "qwen3")
  if kind == "llama":
    assert dict(model.cfg.rope_scaling)["rope_type"] == "llama3"
  tokens, mask, positions = _padded_batch()
  ref = _torch_logits(torch_model, tokens, mask, positions)
  out = _jd_logits(model, tokens, mask, positions)
  assert np.abs(out - ref)[mask].max() <= 1e-4


def test_export_round_trip(hf_pair, tmp_path):
  from transformers import AutoModelForCausalLM

  _, _, torch_model, path = hf_pair
  model = hf.from_hf(path)
  hf.to_hf(model, str(tmp_path / "export"))
  reloaded = AutoModelForCausalLM.from_pretrained(
    str(tmp_path / "export"), local_files_only=True
  ).eval()
  tokens, mask, positions = _padded_batch()
  ref = _torch_logits(torch_model, tokens, mask, positions)
  np.testing.assert_allclose(
    _torch_logits(reloaded, tokens, mask, positions)[mask], ref[mask], atol=1e-5
  )


def test_import_sharded_safetensors_directory(tmp_path):
  torch_model = tiny_hf_model("qwen3", vocab_size=VOCAB)
  torch_model.save_pretrained(str(tmp_path), max_shard_size="40KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
  tokens, mask, positions = _padded_batch()
  out = _jd_logits(hf.from_hf(str(tmp_path)), tokens, mask, positions)
  ref = _torch_logits(torch_model, tokens, mask, positions)
  assert np.abs(out - ref)[mask].max() <= 1e-4
  # and our own sharded export reads back identically
  hf.to_hf(hf.from_hf(str(tmp_path)), str(tmp_path / "ours"), max_shard_bytes=20_000)
  assert os.path.exists(tmp_path / "ours" / "model.safetensors.index.json")
  again = _jd_logits(hf.from_hf(str(tmp_path / "ours")), tokens, mask, positions)
  np.testing.assert_array_equal(again, out)


def test_sharded_forward_equals_single_device(tmp_path):
  assert jax.device_count() == 8
  torch_model = tiny_hf_model("llama", vocab_size=VOCAB)
  torch_model.save_pretrained(str(tmp_path))
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = hf.from_hf(str(tmp_path), mesh)
  single = hf.from_hf(str(tmp_path), shd.make_mesh({"data": 1}, jax.devices()[:1]))
  # the rules really shard the parameters
  state = nnx.state(sharded, nnx.Param)
  q = state["layers"][0]["attn"]["q_proj"].get_value()
  assert q.sharding.spec == P("fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (32, 2, 16)
  assert state["embed"].get_value().sharding.spec == P("tensor", "fsdp")
  assert state["lm_head"].get_value().sharding.spec == P("fsdp", "tensor")
  assert state["final_norm"].get_value().sharding.spec == P(None)
  tokens, mask, positions = _padded_batch()
  tokens, mask, positions = (np.concatenate([a, a[:1]]) for a in (tokens, mask, positions))
  batch = shd.batch_sharding(mesh, 2)
  args = [jax.device_put(jnp.asarray(a), batch) for a in (tokens, positions, mask)]
  graphdef, st = nnx.split(sharded)
  out = _forward(graphdef, st, *args)
  ref = _jd_logits(single, tokens, mask, positions)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_create_sharded_init_places_shards():
  mesh = shd.make_mesh({"fsdp": 4, "tensor": -1})
  assert dict(mesh.shape) == {"fsdp": 4, "tensor": 2}
  cfg = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8
  )
  model = shd.create_sharded(lambda: Transformer(cfg, nnx.Rngs(0)), mesh)
  gate = nnx.state(model, nnx.Param)["layers"][1]["mlp"]["gate_proj"].get_value()
  assert gate.sharding.spec == P("fsdp", "tensor")
  assert gate.addressable_shards[0].data.shape == (8, 32)
  # an indivisible dimension falls back to replication
  # (kv_heads=2 on tensor=2 divides; vocab 64 / 2 is fine)
  assert shd.logical_to_spec(("kv_heads",), (3,), mesh) == P(None)


def test_bf16_compute_f32_params_and_remat(tmp_path):
  torch_model = tiny_hf_model("qwen2", vocab_size=VOCAB)
  torch_model.save_pretrained(str(tmp_path))
  tokens, mask, positions = _padded_batch()
  f32 = _jd_logits(hf.from_hf(str(tmp_path)), tokens, mask, positions)
  bf16 = hf.from_hf(str(tmp_path), dtype="bfloat16", remat_policy="full")
  assert nnx.state(bf16, nnx.Param)["embed"].get_value().dtype == jnp.float32
  out = _jd_logits(bf16, tokens, mask, positions)
  assert out.dtype == np.float32
  assert np.abs(out - f32)[mask].max() < 0.05
  remat = _jd_logits(hf.from_hf(str(tmp_path), remat_policy="full"), tokens, mask, positions)
  np.testing.assert_allclose(remat, f32, atol=1e-6)


# --- bad input ----------------------------------------------------------------


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("model_type", "gpt2", "model_type"),
    ("num_kv_heads", 3, "num_kv_heads"),
    ("hidden_size", 0, "hidden_size"),
    ("num_layers", True, "num_layers"),  # a bool is an int to Python, not a layer count
    ("dtype", "float64", "dtype"),
    ("rope_scaling", (("rope_type", "yarn"),), "rope_type"),
    ("rope_scaling", (("rope_type", "llama3"), ("factor", 8.0)), "low_freq_factor"),
  ],
)
def test_bad_model_config(field, value, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**{field: value})


def test_bad_mesh():
  with pytest.raises(ValueError, match="multiply to"):
    shd.make_mesh({"data": 3, "tensor": 2})
  with pytest.raises(ValueError, match="at most one axis"):
    shd.make_mesh({"data": -1, "tensor": -1})
  with pytest.raises(ValueError, match="no sharding rule"):
    shd.logical_to_spec(("nonsense",), (4,), shd.make_mesh({"data": -1}))


def _broken_copy(src, dst, edit):
  from safetensors.numpy import load_file, save_file

  os.makedirs(dst)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  config = json.load(open(os.path.join(src, "config.json")))
  tensors, config = edit(tensors, config)
  save_file(tensors, os.path.join(dst, "model.safetensors"))
  json.dump(config, open(os.path.join(dst, "config.json"), "w"))
  return dst


def test_malformed_checkpoints(tmp_path):
  src = str(tmp_path / "ok")
  tiny_hf_model("llama", vocab_size=VOCAB).save_pretrained(src)
  name = "model.layers.1.mlp.up_proj.weight"

  def drop(t, c):
    del t[name]
    return t, c

  def reshape(t, c):
    t[name] = t[name][:, :-1].copy()
    return t, c

  def unknown(t, c):
    return t, dict(c, model_type="mamba")

  with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
    hf.from_hf(_broken_copy(src, str(tmp_path / "a"), drop))
  with pytest.raises(ValueError, match="tensor 'model.layers.1.mlp.up_proj.weight' has shape"):
    hf.from_hf(_broken_copy(src, str(tmp_path / "b"), reshape))
  with pytest.raises(ValueError, match="model_type='mamba'"):
    hf.from_hf(_broken_copy(src, str(tmp_path / "c"), unknown))
  os.makedirs(tmp_path / "pickle")
  json.dump(
    json.load(open(os.path.join(src, "config.json"))),
    open(tmp_path / "pickle" / "config.json", "w"),
  )
  (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(ValueError, match="pickle files are never"):
    hf.from_hf(str(tmp_path / "pickle"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.from_hf(str(tmp_path / "nowhere"))

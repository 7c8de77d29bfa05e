"""Nemotron-H (Mamba-2 + attention + MLP + MoE layers in `layer_pattern`'s order) against
transformers' PyTorch model (its torch path, no CUDA kernels): the Mamba-2 mixer, logits on a
padded batch, decode through the hybrid cache, greedy tokens, export and re-import."""

import itertools
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
from jdistill.models.layer_runs import repeat_runs
from jdistill.models.mamba2 import Mamba2
from jdistill.models.transformer import init_cache, stack_layers, unstack_layers
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


def _decoder(model, tokens, mask, positions):
  """`decode(cache)` → (logits `[B, 11, V]`, the cache after them): `model` on the 11-token
  batch through `cache` as a 4-token prefill, a 4-token continuation (the chunked scan from a
  held state) and 3 one-token steps (the recurrent step), one compiled step."""
  graphdef, state = nnx.split(model)

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

  return decode


def test_cache_decode_equals_full_forward(pair):
  """Through the hybrid cache (K/V for `*`, conv + SSM state for `M`): a 4-token prefill, a
  4-token continuation (the chunked scan from a held state) and 3 one-token steps (the
  recurrent step) equal the full forward. The prefill at slot 0 restarts the Mamba states: a
  cache already holding another sequence's gives the same logits."""
  _, _, model = pair
  cfg = model.cfg
  tokens, mask, positions = tiny_hf.padded_batch(VOCAB)
  full = _jd_logits(model, tokens, mask, positions)
  cache = init_cache(cfg, 3, 11)
  mamba = ["conv_bc", "conv_x", "ssm"]
  assert [sorted(c) for c in cache] == [mamba, ["k", "v"], [], [], mamba]
  assert cache[0]["ssm"].shape == (3, 8, 8, 16) and cache[0]["ssm"].dtype == jnp.float32
  assert cache[0]["conv_x"].shape == (3, 3, 8, 8) and cache[0]["conv_bc"].shape == (3, 3, 2, 2, 16)

  decode = _decoder(model, tokens, mask, positions)
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


# --- scanned: the pattern as runs of a repeated unit (`jdistill.models.layer_runs`) ------

RUNS_PATTERN = "M-M-M*E*E"  # runs M, -M x 2, *E x 2: every kind; a run's rows interleave kinds
NANO = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"


def _brute_force_cost(pattern: str) -> tuple[int, int]:
  """(layers compiled, runs) of the best cut, over all 2^(n-1) cuts of `pattern`."""
  n, best = len(pattern), None
  for cuts in itertools.product((False, True), repeat=n - 1):
    bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
    cost = 0
    for a, b in zip(bounds, bounds[1:]):
      span = pattern[a:b]
      cost += min(p for p in range(1, len(span) + 1) if span[:p] * (len(span) // p) == span)
    best = min(best or (cost, len(bounds) - 1), (cost, len(bounds) - 1))
  return best


def test_repeat_runs_compile_the_fewest_layers():
  """The cut against brute force on 200 random patterns of 1-10 layers; Nano's 52 layers as
  14 compiled in 4 runs."""
  rng = np.random.RandomState(0)
  for _ in range(200):
    pattern = "".join(rng.choice(list("ME*-"[: rng.randint(1, 5)]), rng.randint(1, 11)))
    runs = repeat_runs(pattern)
    assert "".join(unit * count for unit, count in runs) == pattern
    cost = (sum(len(unit) for unit, _ in runs), len(runs))
    assert cost == _brute_force_cost(pattern), pattern
  assert repeat_runs(RUNS_PATTERN) == (("M", 1), ("-M", 2), ("*E", 2))
  assert repeat_runs(NANO) == (("MEMEM*E", 5), ("ME", 3), ("M*E", 1), ("ME", 4))


@pytest.fixture(scope="module")
def runs_pair(tmp_path_factory):
  """A 9-layer Nemotron-H imported scanned (auto: from 8 layers) and unrolled."""
  torch_model = tiny_hf_model("nemotron_h", vocab_size=VOCAB, hybrid_override_pattern=RUNS_PATTERN)
  path = str(tmp_path_factory.mktemp("nemotron_h_runs"))
  torch_model.save_pretrained(path)
  scanned = _with_cfg(hf.from_hf(path), moe_dispatch="dense")
  unrolled = _with_cfg(hf.from_hf(path, scan_layers=False), moe_dispatch="dense")
  return torch_model, path, scanned, unrolled


def _assert_same_leaves(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_scanned_runs_match_transformers_and_hold_the_unrolled_weights(runs_pair):
  """Each run's unit layer stacks its rows' layers (run `-M`'s Mamba rows are layers 2 and
  4); the layouts convert both ways bit for bit; the logits equal transformers'."""
  torch_model, _, scanned, unrolled = runs_pair
  assert scanned.cfg.scan_layers and not unrolled.cfg.scan_layers
  x_proj = nnx.state(scanned)["layers"][1]["block"]["layer_1"]["mixer"]["x_proj"]
  assert x_proj.logical_axes[0] == "layers" and x_proj.shape[0] == 2
  for row, layer in enumerate((2, 4)):
    want = nnx.state(unrolled)["layers"][layer]["mixer"]["x_proj"].get_value()
    np.testing.assert_array_equal(x_proj.get_value()[row], want)
  _assert_same_leaves(stack_layers(nnx.state(unrolled), scanned.cfg), nnx.state(scanned))
  _assert_same_leaves(unstack_layers(nnx.state(scanned), scanned.cfg), nnx.state(unrolled))
  tokens, mask, positions = tiny_hf.padded_batch(VOCAB)
  ref = _torch_logits(torch_model, tokens, mask, positions)
  err = np.abs(_jd_logits(scanned, tokens, mask, positions) - ref)[mask].max()
  print(f"\nnemotron_h scanned {RUNS_PATTERN}: max |logits - transformers| = {err:.2e}")
  assert err <= 1e-5


def test_scanned_runs_shard_by_their_logical_axes(runs_pair):
  """On fsdp 2 x expert 2 x tensor 2 the stacked `layers` axis is replicated and every other
  axis keeps its unrolled rule (Mamba heads on `tensor`, experts on `expert`)."""
  cfg = runs_pair[2].cfg
  mesh = shd.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
  _, state = shd.abstract_sharded_state(lambda: Transformer(cfg, nnx.Rngs(0)), mesh)
  spec = lambda v: v.get_value().sharding.spec  # noqa: E731
  mamba = state["layers"][1]["block"]["layer_1"]["mixer"]
  assert spec(mamba["x_proj"]) == P(None, "fsdp", "tensor", None)
  assert spec(mamba["A_log"]) == P(None, "tensor")
  moe = state["layers"][2]["block"]["layer_1"]["mixer"]
  assert spec(moe["up_proj"]) == P(None, "expert", "fsdp", "tensor")


def test_scanned_runs_gradients_equal_unrolled_under_remat(runs_pair):
  """Through runs whose units hold two layers of different kinds, repeated (`-M` x 2, `*E` x
  2), under `remat_policy="full"`: every gradient of a fixed projection of the hidden states
  equals the unrolled model's; a per-layer cache given to the scanned model is refused."""
  _, _, scanned, unrolled = runs_pair
  tokens, mask, positions = map(jnp.asarray, tiny_hf.padded_batch(VOCAB))
  probe = jnp.asarray(np.random.RandomState(3).randn(*tokens.shape, scanned.cfg.hidden_size))
  grads = []
  for model in (unrolled, scanned):
    cfg = model.cfg.replace(remat_policy="full")
    graphdef = nnx.graphdef(nnx.eval_shape(lambda cfg=cfg: Transformer(cfg, nnx.Rngs(0))))

    @jax.jit
    def grad(state, graphdef=graphdef):
      f = lambda s: jnp.sum(nnx.merge(graphdef, s)(tokens, positions, kv_mask=mask)[0] * probe)  # noqa: E731
      return jax.grad(f)(state)

    grads.append(grad(nnx.state(model)))
  ref = stack_layers(grads[0], scanned.cfg)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(grads[1])):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * np.abs(a).max() + 1e-12, err_msg=str(path))
  with pytest.raises(ValueError, match="cache's layout"):
    scanned(tokens, positions, cache=init_cache(unrolled.cfg, 3, 11), cache_index=0)


def test_scanned_cache_decode_equals_full_forward_and_greedy_equals_generate(runs_pair):
  """Through the scanned cache (per run, its unit layers' caches stacked `[count, ...]`):
  prefill, continuation and one-token steps equal the full forward, twice (the held Mamba
  states restart at slot 0); the sampler's greedy tokens equal transformers' `generate`."""
  torch_model, _, scanned, _ = runs_pair
  tokens, mask, positions = tiny_hf.padded_batch(VOCAB)
  full = _jd_logits(scanned, tokens, mask, positions)
  graphdef, state = nnx.split(scanned)
  cache = init_cache(scanned.cfg, 3, 11)
  assert [len(run) for run in cache] == [1, 2, 2]
  assert cache[1][1]["ssm"].shape == (2, 3, 8, 8, 16)
  assert cache[2][0]["k"].shape == (2, 3, 11, 2, 16)
  decode = _decoder(scanned, tokens, mask, positions)
  decoded, used = decode(cache)
  np.testing.assert_allclose(decoded[mask], full[mask], atol=1e-5)
  assert all(np.abs(np.asarray(used[1][1]["ssm"][row])).max() > 0 for row in range(2))
  again, _ = decode(used)
  np.testing.assert_allclose(again[mask], full[mask], atol=1e-5)
  prompts = [[5, 17, 99], [3, 44, 8, 61, 70, 12, 9]]
  sp = SamplingParams(max_new_tokens=8, temperature=0.0, prompt_buckets=(16,))
  out = Sampler(graphdef, _single_mesh()).generate(state, prompts, jax.random.key(0), sp)
  tiny_hf.assert_greedy_equals_generate(torch_model, out.tokens, prompts, 8)


def test_scanned_export_and_checkpoints_cross_layouts(runs_pair, tmp_path):
  """A scanned model exports what transformers loads (the same logits as the original) and
  re-imports unrolled bit for bit; its checkpoint resumes in its own layout, names
  `scan_layers` to a run of the other, and loads as the unrolled model (and the unrolled
  one's as the scanned model)."""
  from jdistill.runtime import checkpoint as ckpt

  torch_model, _, scanned, unrolled = runs_pair
  out_dir = str(tmp_path / "export")
  hf.to_hf(scanned, out_dir)
  from transformers import AutoModelForCausalLM

  loaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
  tokens, mask, positions = tiny_hf.padded_batch(VOCAB)
  np.testing.assert_array_equal(
    _torch_logits(loaded, tokens, mask, positions),
    _torch_logits(torch_model, tokens, mask, positions),
  )
  _assert_same_leaves(nnx.state(hf.from_hf(out_dir, scan_layers=False)), nnx.state(unrolled))
  zero = jnp.zeros((), jnp.int32)
  train_state = lambda m: {"params": nnx.state(m), "opt_state": {"count": zero}, "step": zero}  # noqa: E731
  for name, model, other in (("s", scanned, unrolled), ("u", unrolled, scanned)):
    checkpointer = ckpt.Checkpointer(str(tmp_path / name), every=1, keep=1, async_save=False)
    checkpointer.write_model_config(model.cfg)
    state = train_state(model)
    ckpt.save_train_state(checkpointer, 1, state, rng=jax.random.key(0), data_state={}, identity={})
    checkpointer.wait()
    restored, *_ = ckpt.restore_train_state(checkpointer, state)  # a resume, in its layout
    _assert_same_leaves(restored["params"], state["params"])
    with pytest.raises(ValueError, match=f"set config.student.scan_layers={model.cfg.scan_layers}"):
      ckpt.restore_train_state(checkpointer, train_state(other))
    checkpointer.close()
    back = ckpt.load_model_from_checkpoint(
      str(tmp_path / name), _single_mesh(), scan_layers=other.cfg.scan_layers
    )
    assert back.cfg.scan_layers == other.cfg.scan_layers
    _assert_same_leaves(nnx.state(back, nnx.Param), nnx.state(other, nnx.Param))


def test_scanned_opd_step_equals_unrolled(pair, one_device_step):
  """The compiled OPD step with the scanned student (`M*-EM`: one run, its unit every kind)
  equals the unrolled one's: the loss, every gradient, the next step's loss. (The rows of
  longer runs are `test_scanned_runs_*`'s; a second 9-layer step would cost ~80 s.)"""
  _, _, model = pair
  cfg = model.cfg.replace(scan_layers=True)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  scanned = nnx.merge(graphdef, stack_layers(nnx.state(model), cfg))
  params, new, metrics, again, grads = tiny_hf.opd_step(scanned, VOCAB)
  back = (params, new, metrics, again, unstack_layers(grads, cfg))
  tiny_hf.assert_step_equals_one_device(one_device_step, back)


def test_scanned_router_loads_move_the_bias_as_unrolled(runs_pair):
  """The MoE loads sown inside the scans move each layer's score-correction bias as the
  unrolled layers' loads do."""
  from jdistill.models import moe

  _, _, scanned, unrolled = runs_pair
  tokens, mask, positions = map(jnp.asarray, tiny_hf.padded_batch(VOCAB))
  moved = []
  for model in (unrolled, scanned):
    *_, loads = moe.forward_with_router_stats(model, tokens, positions, mask)
    p = nnx.state(model, nnx.Param)
    moved.append(moe.next_score_bias(p, p, loads, 0.1))
  assert set(loads) == {("layers", 2, "block", "layer_1", "mixer")}
  _assert_same_leaves(unstack_layers(moved[1], scanned.cfg), moved[0])


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

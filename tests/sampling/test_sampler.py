"""Rollout sampler: greedy vs transformers, cached vs full logits, sampling statistics,
stop tokens, sharded vs single device, compile caching and input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdistill import sampling as smp
from jdistill.models import ModelConfig, Transformer, hf
from jdistill.models.transformer import init_cache
from jdistill.runtime import sharding as shd
from jdistill.sampling import Sampler, SamplingParams
from jdistill.testing import tiny_hf
from jdistill.testing.tiny_hf import tiny_hf_model

VOCAB = 128
NEW = 8
BUCKETS = (16, 32)
PROMPTS = [[5, 17, 99], [3, 44, 8, 61, 70, 12, 9], [100, 2, 77, 31, 6, 90, 13, 57, 25, 40, 11, 64]]


def _single_mesh():
  return shd.make_mesh({"data": 1}, jax.devices()[:1])


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def pair(request, tmp_path_factory):
  """(torch model, checkpoint dir, graphdef, state, a 1-device Sampler) of one tiny family."""
  torch_model = tiny_hf_model(request.param, vocab_size=VOCAB)
  path = str(tmp_path_factory.mktemp(request.param))
  torch_model.save_pretrained(path)
  graphdef, state = nnx.split(hf.from_hf(path, _single_mesh()))
  return torch_model, path, graphdef, state, Sampler(graphdef, _single_mesh())


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  torch_model = tiny_hf_model("llama", vocab_size=VOCAB, seed=1)
  path = str(tmp_path_factory.mktemp("llama_single"))
  torch_model.save_pretrained(path)
  graphdef, state = nnx.split(hf.from_hf(path, _single_mesh()))
  return path, graphdef, state, Sampler(graphdef, _single_mesh())


@jax.jit
def _forward(graphdef, state, tokens, kv_mask):
  """Full uncached forward on right-padded rows → f32 logits `[B, T, V]`."""
  return nnx.merge(graphdef, state).forward_logits(tokens, None, kv_mask)


def _full_logp(graphdef, state, out) -> np.ndarray:
  """log_softmax of the uncached forward, aligned so index i scores token i."""
  tokens = np.asarray(out.tokens)
  real = (
    np.arange(tokens.shape[1])[None]
    < np.asarray(out.prompt_lengths + out.completion_lengths)[:, None]
  )
  logits = np.asarray(_forward(graphdef, state, jnp.asarray(tokens), jnp.asarray(real)))
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  return np.concatenate([np.zeros_like(logp[:, :1]), logp[:, :-1]], axis=1), logits


# --- correctness against references ---------------------------------------------------


def test_greedy_matches_transformers(pair):
  torch_model, _, _, state, sampler = pair
  sp = SamplingParams(max_new_tokens=NEW, temperature=0.0, prompt_buckets=BUCKETS)
  out = sampler.generate(state, PROMPTS, jax.random.key(0), sp)
  tiny_hf.assert_greedy_equals_generate(torch_model, out.tokens, PROMPTS, NEW)  # no EOS stop
  assert np.asarray(out.completion_lengths).tolist() == [NEW] * len(PROMPTS)
  assert out.tokens.shape == (len(PROMPTS), 16 + NEW)


def test_cached_decode_logits_equal_full_forward(llama):
  """Prefill (with left padding) + one-token cached steps reproduce the uncached forward."""
  _, graphdef, state, _ = llama
  rng = np.random.RandomState(0)
  lengths = np.array([4, 11, 7], np.int32)
  bucket, steps = 16, 6
  seqs = rng.randint(0, VOCAB, (3, 11 + steps)).astype(np.int32)  # row b: seqs[b, :len_b + steps]
  left = smp.left_align(seqs, lengths, bucket, 0)
  follow = np.stack([seqs[b, lengths[b] : lengths[b] + steps] for b in range(3)])  # [B, steps]

  @jax.jit
  def cached(state, left, lengths, follow):
    model = nnx.merge(graphdef, state)
    cache_len = bucket + steps
    positions, kv_mask = smp.cache_layout(lengths, bucket, cache_len)
    hidden, cache = model(
      left, positions, kv_mask=kv_mask, cache=init_cache(model.cfg, 3, cache_len), cache_index=0
    )
    prompt_logits = model.logits(hidden)  # [B, bucket, V], left layout
    step_logits = []
    for t in range(steps):
      logits, cache = smp.decode_step(model, cache, kv_mask, follow[:, t], lengths + t, bucket + t)
      step_logits.append(logits)
    return prompt_logits, jnp.stack(step_logits, 1)

  prompt_logits, step_logits = map(np.asarray, cached(state, left, lengths, follow))
  for b, n in enumerate(lengths):
    row = seqs[b : b + 1, : n + steps]
    full = np.asarray(_forward(graphdef, state, jnp.asarray(row), jnp.ones_like(row, bool)))[0]
    np.testing.assert_allclose(prompt_logits[b, bucket - n :], full[:n], atol=1e-5)
    np.testing.assert_allclose(step_logits[b], full[n : n + steps], atol=1e-5)


@pytest.mark.parametrize("mode", ["temperature", "top_k_top_p"])
def test_logprobs_equal_full_forward(llama, mode):
  _, graphdef, state, sampler = llama
  kw = (
    dict(temperature=1.0) if mode == "temperature" else dict(temperature=0.7, top_k=20, top_p=0.8)
  )
  sp = SamplingParams(max_new_tokens=NEW, prompt_buckets=BUCKETS, **kw)
  out = sampler.generate(state, PROMPTS, jax.random.key(3), sp)
  mask = np.asarray(out.completion_mask).astype(bool)
  assert mask.sum() == len(PROMPTS) * NEW
  logp, logits = _full_logp(graphdef, state, out)
  tokens = np.asarray(out.tokens)
  expect = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(out.logprobs)[mask], expect[mask], atol=1e-5)
  assert np.all(np.asarray(out.logprobs)[~mask] == 0) and np.all(
    np.asarray(out.sampling_logprobs)[~mask] == 0
  )
  # sampling log-probs: the temperature / top-k / top-p distribution, built here in numpy
  prev = np.concatenate([np.zeros_like(logits[:, :1]), logits[:, :-1]], axis=1) / kw["temperature"]
  for b, i in zip(*np.nonzero(mask)):
    filt = _np_filter(prev[b, i], kw.get("top_k", 0), kw.get("top_p", 1.0))
    lp = filt - np.logaddexp.reduce(filt)
    assert np.isfinite(lp[tokens[b, i]])
    np.testing.assert_allclose(out.sampling_logprobs[b, i], lp[tokens[b, i]], atol=1e-4)


def _np_filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
  """Reference top-k then top-p support (numpy, float64): -inf outside."""
  x = logits.astype(np.float64).copy()
  order = np.argsort(-x, kind="stable")
  if top_k:
    x[order[top_k:]] = -np.inf
  if top_p < 1.0:
    p = np.exp(x - np.logaddexp.reduce(x))
    cum = np.cumsum(p[order])
    n_keep = int(np.searchsorted(cum, top_p) + 1)  # smallest prefix with mass >= top_p
    x[order[n_keep:]] = -np.inf
  return x


# --- sampling statistics ---------------------------------------------------------------


@pytest.fixture(scope="module")
def small_vocab():
  """1-layer, vocab-16 model with spread-out next-token probabilities, and its last logits."""
  cfg = ModelConfig(
    vocab_size=16,
    hidden_size=32,
    intermediate_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
  )
  model = Transformer(cfg, nnx.Rngs(7))
  model.lm_head[...] = model.lm_head[...] * 60.0
  graphdef, state = nnx.split(model)
  prompt = [3, 1, 4, 1, 5]
  logits = np.asarray(_forward(graphdef, state, jnp.asarray([prompt]), jnp.ones((1, 5), bool)))[
    0, -1
  ]
  return graphdef, state, Sampler(graphdef, _single_mesh()), prompt, logits.astype(np.float64)


def _chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
  """Pearson chi-square p-value, pooling cells with expected count < 5."""
  from scipy import stats

  expected = probs * counts.sum()
  small = expected < 5
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  if exp[-1] == 0:
    assert obs[-1] == 0
    obs, exp = obs[:-1], exp[:-1]
  return stats.chisquare(obs, exp).pvalue


@pytest.mark.parametrize(
  "kw",
  [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.0, top_k=4),
    dict(temperature=1.0, top_p=0.7),
    dict(temperature=0.8, top_k=6, top_p=0.6),
  ],
  ids=["t1", "t0.6", "topk4", "topp0.7", "t0.8-k6-p0.6"],
)
def test_sampling_frequencies_match_distribution(small_vocab, kw):
  _, state, sampler, prompt, logits = small_vocab
  rows = 4096
  sp = SamplingParams(max_new_tokens=1, prompt_buckets=(8,), **kw)
  out = sampler.generate(state, [prompt] * rows, jax.random.key(11), sp)
  drawn = np.asarray(out.tokens[:, len(prompt)])
  filt = _np_filter(logits / kw["temperature"], kw.get("top_k", 0), kw.get("top_p", 1.0))
  probs = np.exp(filt - np.logaddexp.reduce(filt))
  support = np.isfinite(filt)
  assert support.sum() < 16 or "top" not in str(kw)
  assert np.all(support[drawn]), "a token outside the top-k / top-p support was sampled"
  counts = np.bincount(drawn, minlength=16)
  assert _chi_square_pvalue(counts, probs) > 1e-3
  np.testing.assert_allclose(
    np.asarray(out.sampling_logprobs[:, len(prompt)]), np.log(probs[drawn]), atol=1e-4
  )


def test_bf16_rollout_params_sample_the_bf16_models_own_distribution(small_vocab):
  """`rollout.param_dtype=bfloat16`: the sampler on the bf16 copy draws from, and reports the
  log-probs of, the bf16 model's softmax, which the f32 params' differs from."""
  graphdef, state, sampler, prompt, f32_logits = small_vocab
  bf16 = smp.rollout_params(state, "bfloat16")
  assert {x.dtype for x in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
  logits = np.asarray(
    _forward(graphdef, bf16, jnp.asarray([prompt]), jnp.ones((1, len(prompt)), bool))
  )[0, -1].astype(np.float64)
  assert np.abs(logits - f32_logits).max() > 1e-2  # the bf16 model is another model
  kw = dict(temperature=0.8, top_k=6, top_p=0.6)
  sp = SamplingParams(max_new_tokens=1, prompt_buckets=(8,), **kw)
  out = sampler.generate(bf16, [prompt] * 4096, jax.random.key(11), sp)
  drawn = np.asarray(out.tokens[:, len(prompt)])
  filt = _np_filter(logits / kw["temperature"], kw["top_k"], kw["top_p"])
  probs = np.exp(filt - np.logaddexp.reduce(filt))
  assert np.all(np.isfinite(filt)[drawn]), "a token outside the top-k / top-p support was sampled"
  assert _chi_square_pvalue(np.bincount(drawn, minlength=16), probs) > 1e-3
  np.testing.assert_allclose(
    np.asarray(out.sampling_logprobs[:, len(prompt)]), np.log(probs[drawn]), atol=1e-4
  )


def test_rollout_params_cast_floating_leaves_on_their_devices():
  mesh = shd.make_mesh({"data": 8})
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  params = {
    "w": jax.device_put(jnp.linspace(0.0, 1.0, 16, dtype=jnp.float32), sharding),
    "ids": jax.device_put(jnp.arange(16, dtype=jnp.int32), sharding),
  }
  assert smp.rollout_params(params, "") is params  # off: the params themselves
  out = smp.rollout_params(params, "bfloat16")
  assert out["w"].dtype == jnp.bfloat16 and out["ids"].dtype == jnp.int32
  assert out["w"].sharding == sharding and out["ids"].sharding == sharding
  np.testing.assert_array_equal(out["w"], np.asarray(params["w"]).astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="float16"):
    smp.rollout_params(params, "float16")


def test_same_seed_reproduces_and_other_seed_differs(llama):
  _, _, state, sampler = llama
  sp = SamplingParams(max_new_tokens=NEW, temperature=1.0, prompt_buckets=BUCKETS)
  a = sampler.generate(state, PROMPTS, jax.random.key(5), sp)
  b = sampler.generate(state, PROMPTS, jax.random.key(5), sp)
  c = sampler.generate(state, PROMPTS, jax.random.key(6), sp)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


# --- stop tokens and layout -------------------------------------------------------------


def test_stop_tokens_end_rows(llama):
  _, _, state, sampler = llama
  base = SamplingParams(max_new_tokens=NEW, temperature=0.0, prompt_buckets=BUCKETS, pad_id=1)
  free = sampler.generate(state, PROMPTS, jax.random.key(0), base)
  lens = [len(p) for p in PROMPTS]
  gen = [np.asarray(free.tokens[b, n : n + NEW]) for b, n in enumerate(lens)]
  stop = int(gen[1][2])  # row 1 stops at step 2 (or earlier if the token repeats)
  other = int(gen[0][0])  # row 0 stops at its first token
  out = sampler.generate(
    state,
    PROMPTS,
    jax.random.key(0),
    SamplingParams(
      max_new_tokens=NEW,
      temperature=0.0,
      prompt_buckets=BUCKETS,
      pad_id=1,
      stop_token_ids=(stop, other),
    ),
  )
  tokens, mask = np.asarray(out.tokens), np.asarray(out.completion_mask)
  for b, n in enumerate(lens):
    hits = np.nonzero(np.isin(gen[b], [stop, other]))[0]
    c = int(hits[0]) + 1 if len(hits) else NEW
    assert int(out.completion_lengths[b]) == c
    np.testing.assert_array_equal(tokens[b, : n + c], free.tokens[b, : n + c])
    assert np.all(tokens[b, n + c :] == 1)
    expect_mask = np.zeros(tokens.shape[1])
    expect_mask[n : n + c] = 1
    np.testing.assert_array_equal(mask[b], expect_mask)
    assert np.all(np.asarray(out.logprobs)[b, n + c :] == 0)
  assert int(out.completion_lengths[0]) == 1 and int(out.completion_lengths[1]) <= 3
  np.testing.assert_array_equal(out.prompt_lengths, lens)


def test_array_prompts_equal_list_prompts(llama):
  _, _, state, sampler = llama
  sp = SamplingParams(max_new_tokens=NEW, temperature=0.0, prompt_buckets=BUCKETS)
  lengths = np.array([len(p) for p in PROMPTS])
  tokens = np.zeros((3, 20), np.int32)
  for b, p in enumerate(PROMPTS):
    tokens[b, : len(p)] = p
  a = sampler.generate(state, PROMPTS, jax.random.key(0), sp)
  b = sampler.generate(state, (tokens[:, : lengths.max()], lengths), jax.random.key(0), sp)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # a wider array picks the bucket of its width; the completions are the same
  wide = sampler.generate(state, (tokens, lengths), jax.random.key(0), sp)
  assert wide.tokens.shape[1] == smp.choose_bucket(20, BUCKETS) + NEW
  completion = lambda r: np.asarray(r.tokens)[np.asarray(r.completion_mask) > 0]
  np.testing.assert_array_equal(completion(wide), completion(a))
  two = sampler.generate(state, tuple(PROMPTS[:2]), jax.random.key(0), sp)  # a tuple of 2 prompts
  np.testing.assert_array_equal(np.asarray(two.tokens), np.asarray(a.tokens)[:2])


# --- sharding and compilation ------------------------------------------------------------


@pytest.mark.parametrize(
  "axes", [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 8}], ids=["data2-fsdp2-tensor2", "data8"]
)
def test_sharded_equals_single_device(llama, axes):
  assert jax.device_count() == 8
  path, _, state, sampler = llama
  mesh = shd.make_mesh(axes)
  sharded = hf.from_hf(path, mesh)
  graphdef, sharded_state = nnx.split(sharded)
  if "tensor" in axes:
    q = nnx.state(sharded, nnx.Param)["layers"][0]["attn"]["q_proj"].get_value()
    assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape[1] == 2
  many = PROMPTS * 3  # 9 rows: padded to the data-parallel size inside
  for kw in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.9)):
    sp = SamplingParams(max_new_tokens=NEW, prompt_buckets=BUCKETS, **kw)
    ref = sampler.generate(state, many, jax.random.key(2), sp)
    out = Sampler(graphdef, mesh).generate(sharded_state, many, jax.random.key(2), sp)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)
    assert out.tokens.shape[0] == len(many)


def test_no_recompilation_across_lengths_params_and_values(llama):
  _, graphdef, state, _ = llama
  sampler = Sampler(graphdef, _single_mesh())
  sp = SamplingParams(
    max_new_tokens=NEW,
    temperature=0.9,
    top_k=10,
    top_p=0.9,
    stop_token_ids=(7,),
    prompt_buckets=BUCKETS,
  )
  sampler.generate(state, PROMPTS, jax.random.key(0), sp)
  compiled = sampler.num_compiles
  assert compiled == 2  # prefill + decode
  perturbed = jax.tree.map(lambda x: x * 1.01, state)
  for i, (prompts, params) in enumerate(
    [
      ([[1, 2], [3] * 16, [4] * 9], sp),
      (
        [[9] * 5, [8] * 2, [7]],
        SamplingParams(
          max_new_tokens=NEW,
          temperature=0.5,
          top_k=3,
          top_p=0.5,
          stop_token_ids=(99,),
          prompt_buckets=BUCKETS,
          pad_id=3,
        ),
      ),
    ]
  ):
    for st in (state, perturbed):
      sampler.generate(st, prompts, jax.random.key(i), params)
  assert sampler.num_compiles == compiled
  # a new bucket compiles once more, and only once
  long = [[5] * 20, [6], [7] * 3]
  sampler.generate(state, long, jax.random.key(0), sp)
  sampler.generate(perturbed, long, jax.random.key(1), sp)
  assert sampler.num_compiles == compiled + 2


# --- shared prefixes ---------------------------------------------------------------------


_TOP_P = dict(temperature=1.0, top_p=0.9)


@pytest.mark.parametrize(
  "axes,modes",
  [
    # the references (9 rows) are the ones test_sharded_equals_single_device compiled
    (None, [_TOP_P]),
    ({"data": 8}, [dict(temperature=0.0), _TOP_P]),
  ],
  ids=["1dev", "data8"],
)
def test_shared_prefix_equals_repeated_prompts(llama, axes, modes):
  """`group_size=G` (each prompt prefilled once, its cache rows repeated on device) gives the
  tokens of the prompts repeated G times on the host under the same key, and their log-probs
  up to f32 rounding (the prefill's batch is smaller); on 8 data shards both the 3 unique
  prompts (→ 8) and the 9 rows (→ 16) take dummy rows."""
  path, graphdef, state, sampler = llama
  if axes is not None:
    mesh = shd.make_mesh(axes)
    graphdef, state = nnx.split(hf.from_hf(path, mesh))
    sampler = Sampler(graphdef, mesh)
  g = 3
  repeated = [p for p in PROMPTS for _ in range(g)]
  for kw in modes:
    sp = SamplingParams(max_new_tokens=NEW, prompt_buckets=BUCKETS, **kw)
    ref = sampler.generate(state, repeated, jax.random.key(3), sp)
    before = sampler.num_compiles
    out = sampler.generate(state, PROMPTS, jax.random.key(3), sp, group_size=g)
    assert sampler.num_compiles == before + 2  # the shared prefill and its own decode
    assert out.tokens.shape[0] == len(repeated)
    for name in ("tokens", "completion_lengths", "completion_mask"):
      np.testing.assert_array_equal(
        np.asarray(getattr(out, name)), np.asarray(getattr(ref, name)), err_msg=f"{kw} {name}"
      )
    for name in ("logprobs", "sampling_logprobs"):
      np.testing.assert_allclose(
        np.asarray(getattr(out, name)), np.asarray(getattr(ref, name)), atol=1e-5, err_msg=name
      )
    if kw["temperature"]:  # the G samples of a prompt differ
      assert len({tuple(np.asarray(out.tokens)[i]) for i in range(g)}) > 1
  # new prompts of the same shape reuse the compiled pieces
  before = sampler.num_compiles
  sampler.generate(state, [[7] * 5, [8], [9] * 11], jax.random.key(4), sp, group_size=g)
  assert sampler.num_compiles == before


# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
  "prompts,params,match",
  [
    ([], {}, "empty"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[1] * 40], {}, "exceeds the largest prompt bucket 32"),
    ([[1, 2]], dict(stop_token_ids=(VOCAB,)), "stop_token_ids .* outside the vocabulary"),
    ([[1, VOCAB + 3]], {}, r"token ids must lie in \[0, 128\)"),
    ((np.zeros((2, 4), np.int32), np.array([0, 3])), {}, "prompt 0 is empty"),
    ((np.zeros((2, 4), np.int32), np.array([5, 3])), {}, "exceeds the token array width"),
  ],
)
def test_bad_inputs_raise(llama, prompts, params, match):
  _, _, state, sampler = llama
  sp = SamplingParams(max_new_tokens=4, temperature=0.0, prompt_buckets=BUCKETS, **params)
  with pytest.raises(ValueError, match=match):
    sampler.generate(state, prompts, jax.random.key(0), sp)


@pytest.mark.parametrize("group_size", [0, 2.0, True])
def test_bad_group_size_raises(llama, group_size):
  _, _, state, sampler = llama
  with pytest.raises(ValueError, match="group_size: expected a positive integer"):
    sampler.generate(state, PROMPTS, jax.random.key(0), SamplingParams(), group_size=group_size)


def test_cache_limit_raises(llama):
  _, graphdef, state, _ = llama
  sampler = Sampler(graphdef, _single_mesh(), max_cache_len=20)
  with pytest.raises(ValueError, match="exceed the cache limit max_cache_len=20"):
    sampler.generate(
      state, [[1, 2, 3]], jax.random.key(0), SamplingParams(max_new_tokens=8, prompt_buckets=(16,))
    )


@pytest.mark.parametrize(
  "kw,field",
  [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(stop_token_ids=(-1,)), "stop_token_ids"),
    (dict(prompt_buckets=()), "prompt_buckets"),
    (dict(prompt_buckets=(0, 8)), "prompt_buckets"),
    (dict(pad_id=-1), "pad_id"),
  ],
)
def test_sampling_params_validation(kw, field):
  with pytest.raises(ValueError, match=f"SamplingParams.{field}="):
    SamplingParams(**kw)
  assert hash(SamplingParams(stop_token_ids=[2, 3], prompt_buckets=[64, 32]))
  assert SamplingParams(prompt_buckets=[64, 32]).prompt_buckets == (32, 64)


def test_cache_is_donated_and_reused(llama):
  """With keep_cache, each call donates the previous call's cache buffers (no new allocation)."""
  _, graphdef, state, _ = llama
  sampler = Sampler(graphdef, _single_mesh(), keep_cache=True)
  sp = SamplingParams(max_new_tokens=NEW, temperature=0.0, prompt_buckets=BUCKETS)
  first = sampler.generate(state, PROMPTS, jax.random.key(0), sp)
  (cache,) = sampler._caches.values()
  second = sampler.generate(state, PROMPTS[::-1], jax.random.key(0), sp)
  assert all(x.is_deleted() for x in jax.tree.leaves(cache))
  np.testing.assert_array_equal(np.asarray(second.tokens), np.asarray(first.tokens)[::-1])


def test_inverse_cdf_draw_matches_its_distribution_and_never_draws_excluded_tokens():
  from jdistill.sampling import draw

  rng = np.random.RandomState(0)
  vocab, rows = 64, 20_000
  logits = rng.randn(vocab) * 2.0
  logits[[0, 5, 31, vocab - 1]] = -np.inf  # excluded, at both ends and inside
  logp = logits - np.logaddexp.reduce(logits[np.isfinite(logits)])
  tokens = np.asarray(
    draw(jax.random.key(3), jnp.broadcast_to(jnp.asarray(logp, jnp.float32), (rows, vocab)))
  )
  assert np.isfinite(logp[tokens]).all(), "an excluded token was drawn"
  assert _chi_square_pvalue(np.bincount(tokens, minlength=vocab), np.exp(logp)) > 1e-3
  # one allowed token, first or last: always that one
  for only in (0, vocab - 1):
    single = np.full((8, vocab), -np.inf, np.float32)
    single[:, only] = 0.0
    assert (np.asarray(draw(jax.random.key(4), jnp.asarray(single))) == only).all()


@pytest.mark.parametrize("block", [1, 5, 8, 64])
def test_blocked_draw_is_the_one_level_inverse_cdf(block):
  """The two-level walk (blocks of `block` tokens, a partial last block at 5) draws what one
  running sum over the whole row draws from the same uniform, up to f32 rounding at CDF
  boundaries; it keeps the distribution, including a whole excluded block and excluded
  tokens at block edges, and one allowed token at either end of a row."""
  from jdistill.sampling import draw

  rng = np.random.RandomState(1)
  vocab, rows = 64, 20_000
  logits = rng.randn(vocab) * 2.0
  logits[[0, 7, 8, 31, vocab - 1]] = -np.inf
  logits[16:24] = -np.inf  # one whole block of 8
  logp = logits - np.logaddexp.reduce(logits[np.isfinite(logits)])
  grid = jnp.broadcast_to(jnp.asarray(logp, jnp.float32), (rows, vocab))
  key = jax.random.key(5)
  blocked = np.asarray(draw(key, grid, block=block))
  one_level = np.asarray(draw(key, grid, block=vocab))
  assert np.mean(blocked == one_level) > 0.999
  assert np.isfinite(logp[blocked]).all(), "an excluded token was drawn"
  assert _chi_square_pvalue(np.bincount(blocked, minlength=vocab), np.exp(logp)) > 1e-3
  for only in (0, 17, vocab - 1):
    single = np.full((8, vocab), -np.inf, np.float32)
    single[:, only] = 0.0
    assert (np.asarray(draw(jax.random.key(4), jnp.asarray(single), block=block)) == only).all()


def test_sample_step_logprobs_are_the_raw_and_the_tempered_softmax():
  """Both log-probs of a step, in every unfiltered mode (greedy; T = 1, where the raw ones are
  the draw's own; T = 0.5, where they are computed apart), against numpy's float64 softmax of
  the logits and of logits / T; at a vocab (37) no block divides, so the last one is padded."""
  rng = np.random.RandomState(2)
  logits = (3.0 * rng.randn(6, 37)).astype(np.float32)
  x = logits.astype(np.float64)
  step = jax.jit(smp.sample_step, static_argnames=("greedy", "filtered"))
  for temperature in (0.0, 1.0, 0.5):  # T = 1 and 0.5 share one compile (T is traced)
    sp = SamplingParams(temperature=temperature)
    knobs = smp.params.knobs_of(sp)
    tokens, logp, sampling_logp = step(
      jnp.asarray(logits), jax.random.key(0), knobs, greedy=sp.greedy, filtered=False
    )
    tokens = np.asarray(tokens)
    picked = lambda a: np.take_along_axis(a, tokens[:, None], -1)[:, 0]
    raw = x - np.logaddexp.reduce(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(logp), picked(raw), atol=1e-5)
    if sp.greedy:
      np.testing.assert_array_equal(tokens, np.argmax(logits, -1))
      assert not np.asarray(sampling_logp).any()
    else:
      scaled = x / temperature
      tempered = scaled - np.logaddexp.reduce(scaled, axis=-1, keepdims=True)
      np.testing.assert_allclose(np.asarray(sampling_logp), picked(tempered), atol=1e-5)

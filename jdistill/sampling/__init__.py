"""Jitted rollout sampler: prefill into a preallocated KV cache, then a decode loop.

Cache layout (left-aligned prompts). A batch's prompts are padded on the LEFT to a
bucket length `P` (the smallest of `SamplingParams.prompt_buckets` that holds the
longest prompt, so new prompt lengths reuse compiled code). Row `b`'s prompt of
`len_b` tokens fills cache slots `[P - len_b, P)` with RoPE positions
`0 .. len_b - 1`; its pad slots are masked out of attention. Decode step `t` writes
slot `P + t` for every row at position `len_b + t`, so the cache holds
`cache_len = P + max_new_tokens` slots and every row's last prompt token sits at
slot `P - 1`.

Two compiled functions per static shape (batch, bucket, max_new_tokens, and the
sampling *mode*: greedy or not, filtered by top-k/top-p or not, number of stop
ids): `prefill` and `decode`. Both are plain `jax.jit` functions that take the
model state as an argument (`nnx.merge(graphdef, state)` happens inside), so the
current student params, or a teacher's, are used without recompiling. Sampling
values (temperature, top_k, top_p, stop ids, pad id) are traced arrays too, so
changing them does not recompile either. The KV cache is donated through
prefill → decode. `decode` is a `lax.while_loop` that stops once every row has
emitted a stop token, and returns the rollouts already gathered into the
trainer's right-padded layout (see `Rollouts`).

Continuous batching (`Sampler.generate_continuous`): a fixed number of slots, each owned
by a group (teacher), decode in one compiled `lax.while_loop`; a finished slot takes its
group's next queued prompt. Each slot keeps the layout above in its own cache row (its
prompt in `[P - len, P)`, decode step t at slot `P + t`), so the one decode step is vmapped
over rows to give every row its own write slot and causal horizon; a refill is a one-row
prefill of `[1, P]` inside the loop, which rewrites the row's prompt region (older decode
slots stay behind the causal horizon until rewritten).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jdistill.models.transformer import Cache, cache_logical_axes, init_cache
from jdistill.runtime import sharding as shd

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
KEY_SCHEDULES = ("step", "prompt")


# --- configuration ---------------------------------------------------------------


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to sample. Hashable; lists given for the tuple fields are converted.

  max_new_tokens: tokens generated per row (at most; rows stop at a stop token).
  temperature: 0 → greedy (argmax); otherwise logits are divided by it.
  top_k: keep the k most likely tokens (0 = off).
  top_p: nucleus — keep the smallest set of most likely tokens whose probability
    sums to ≥ top_p, always at least one (1.0 = off). Applied after top_k.
  stop_token_ids: a row stops after emitting any of these (the stop token is kept).
  prompt_buckets: allowed padded prompt lengths (sorted on construction).
  pad_id: filler token of the output layout (and of prompt padding).
  key_schedule: which key draws generated token t of row b. "step": `fold_in(rng, t)`, one
    key shared by the batch (b's uniform is row b of it). "prompt":
    `fold_in(fold_in(rng, b), t)`, so a prompt's draws do not depend on which other prompts
    share its batch, nor when it is decoded (what continuous batching needs to be
    comparable with the static loop). Unused when greedy.
  """

  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  stop_token_ids: tuple[int, ...] = ()
  prompt_buckets: tuple[int, ...] = DEFAULT_BUCKETS
  pad_id: int = 0
  key_schedule: str = "step"

  def __post_init__(self):
    object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
    object.__setattr__(self, "prompt_buckets", tuple(sorted(set(self.prompt_buckets))))
    self.validate()

  def validate(self) -> None:
    def bad(field, value, allowed):
      raise ValueError(f"SamplingParams.{field}={value!r} is invalid; allowed: {allowed}")

    if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
      bad("max_new_tokens", self.max_new_tokens, "a positive integer")
    if (
      not isinstance(self.temperature, (int, float, np.floating))
      or isinstance(self.temperature, bool)
      or not math.isfinite(self.temperature)
      or self.temperature < 0
    ):
      bad("temperature", self.temperature, "a finite float >= 0 (0 = greedy)")
    if not _is_int(self.top_k) or self.top_k < 0:
      bad("top_k", self.top_k, "an integer >= 0 (0 = off)")
    if (
      not isinstance(self.top_p, (int, float, np.floating))
      or isinstance(self.top_p, bool)
      or not 0.0 < self.top_p <= 1.0
    ):
      bad("top_p", self.top_p, "a float in (0, 1] (1.0 = off)")
    if not all(_is_int(s) and s >= 0 for s in self.stop_token_ids):
      bad("stop_token_ids", self.stop_token_ids, "a tuple of token ids >= 0")
    if not self.prompt_buckets or not all(_is_int(b) and b > 0 for b in self.prompt_buckets):
      bad("prompt_buckets", self.prompt_buckets, "a non-empty tuple of positive integers")
    if not _is_int(self.pad_id) or self.pad_id < 0:
      bad("pad_id", self.pad_id, "a token id >= 0")
    if self.key_schedule not in KEY_SCHEDULES:
      bad("key_schedule", self.key_schedule, KEY_SCHEDULES)

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  @property
  def filtered(self) -> bool:
    """Whether top-k / top-p filtering is on (a static switch of the compiled code)."""
    return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


class Knobs(NamedTuple):
  """The traced (non-static) sampling values: changing them never recompiles."""

  temperature: jax.Array  # f32 []
  top_k: jax.Array  # i32 []
  top_p: jax.Array  # f32 []
  stop_ids: jax.Array  # i32 [n_stop]
  pad_id: jax.Array  # i32 []


def knobs_of(params: SamplingParams) -> Knobs:
  return Knobs(
    np.float32(params.temperature if params.temperature > 0 else 1.0),
    np.int32(params.top_k),
    np.float32(params.top_p),
    np.asarray(params.stop_token_ids, np.int32).reshape(-1),
    np.int32(params.pad_id),
  )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rollouts:
  """Sampled sequences in the trainer's right-padded layout (`L = P + max_new_tokens`).

  tokens             int32 `[B, L]`  prompt, then completion, then pad_id
  prompt_lengths     int32 `[B]`
  completion_lengths int32 `[B]`     generated tokens, including the stop token
  completion_mask    f32   `[B, L]`  1 on generated tokens (incl. the stop token)
  logprobs           f32   `[B, L]`  log p(token) under the model's raw softmax (T = 1)
  sampling_logprobs  f32   `[B, L]`  log p(token) under the distribution sampled from
                                      (after temperature / top-k / top-p; 0 when greedy)
  Log-probs are 0 outside the completion mask.
  """

  tokens: jax.Array
  prompt_lengths: jax.Array
  completion_lengths: jax.Array
  completion_mask: jax.Array
  logprobs: jax.Array
  sampling_logprobs: jax.Array


# --- host-side prompt handling ---------------------------------------------------


def prompt_arrays(prompts, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Normalises `prompts` to right-padded `(tokens [B, P0] int32, lengths [B] int32)`.

  `prompts` is a list of token-id lists, or `(tokens [B, P0], lengths [B])`.
  """
  if (
    isinstance(prompts, tuple)
    and len(prompts) == 2
    and np.ndim(prompts[0]) == 2
    and np.ndim(prompts[1]) == 1
  ):
    tokens = np.asarray(prompts[0])
    lengths = np.asarray(prompts[1])
    if tokens.ndim != 2 or tokens.shape[0] != lengths.shape[0]:
      raise ValueError(
        f"prompts: expected (tokens [B, P0], lengths [B]); got shapes "
        f"{tokens.shape} and {lengths.shape}"
      )
    if not (np.issubdtype(tokens.dtype, np.integer) and np.issubdtype(lengths.dtype, np.integer)):
      raise ValueError("prompts: tokens and lengths must be integer arrays")
    if tokens.shape[0] == 0:
      raise ValueError("prompts: the batch is empty")
    if np.any(lengths <= 0):
      raise ValueError(
        f"prompts: prompt {int(np.argmin(lengths))} is empty (length "
        f"{int(lengths.min())}); every prompt needs at least one token"
      )
    if np.any(lengths > tokens.shape[1]):
      raise ValueError(
        f"prompts: a length {int(lengths.max())} exceeds the token array width {tokens.shape[1]}"
      )
    return tokens.astype(np.int32), lengths.astype(np.int32)
  prompts = list(prompts)
  if not prompts:
    raise ValueError("prompts: the batch is empty")
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  if np.any(lengths == 0):
    raise ValueError(
      f"prompts: prompt {int(np.argmin(lengths))} is empty; every prompt needs at least one token"
    )
  tokens = np.full((len(prompts), int(lengths.max())), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = np.asarray(p, np.int64)
  return tokens, lengths


def choose_bucket(max_len: int, buckets: Sequence[int]) -> int:
  """Smallest bucket ≥ `max_len`."""
  for b in sorted(buckets):
    if b >= max_len:
      return b
  raise ValueError(
    f"prompt length {max_len} exceeds the largest prompt bucket {max(buckets)} "
    f"(SamplingParams.prompt_buckets={tuple(buckets)})"
  )


def left_align(tokens: np.ndarray, lengths: np.ndarray, bucket: int, pad_id: int) -> np.ndarray:
  """Right-padded `[B, P0]` → left-padded `[B, bucket]`.

  Row b's tokens land at `[bucket - len_b, bucket)`.
  """
  src = np.arange(bucket)[None, :] - (bucket - lengths[:, None])  # [B, bucket]
  gathered = np.take_along_axis(tokens, np.clip(src, 0, tokens.shape[1] - 1), axis=1)
  return np.where(src >= 0, gathered, pad_id).astype(np.int32)


def pad_rows(tokens: np.ndarray, lengths: np.ndarray, multiple: int, pad_id: int):
  """Appends dummy 1-token rows so the batch divides the data-parallel size."""
  extra = (-tokens.shape[0]) % multiple
  if not extra:
    return tokens, lengths
  return (
    np.concatenate([tokens, np.full((extra, tokens.shape[1]), pad_id, np.int32)]),
    np.concatenate([lengths, np.ones((extra,), np.int32)]),
  )


# --- pure device-side pieces -----------------------------------------------------


def cache_layout(lengths: jax.Array, bucket: int, cache_len: int) -> tuple[jax.Array, jax.Array]:
  """Prompt positions `[B, bucket]` and the attention key mask `[B, cache_len]`.

  Prompt slot j of row b holds position `j - (bucket - len_b)` (clipped to 0 on pads);
  key slot j is valid if it holds a real prompt token or is a decode slot (j ≥ bucket;
  causality hides the decode slots not yet written).
  """
  start = (bucket - lengths)[:, None]  # first real slot
  slots = jnp.arange(cache_len)[None, :]
  positions = jnp.maximum(slots[:, :bucket] - start, 0).astype(jnp.int32)
  kv_mask = slots >= start
  return positions, kv_mask


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Sets logits outside the top-k, then top-p, support to -inf. `[B, V]` f32.

  One descending sort serves both. top_k ≤ 0 / top_p ≥ 1 disable that filter.
  Ties with the boundary value are kept.
  """
  vocab = logits.shape[-1]
  ranked = -jnp.sort(-logits, axis=-1)  # descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take_along_axis(ranked, jnp.broadcast_to(k - 1, ranked.shape[:-1])[:, None], axis=-1)
  ranked = jnp.where(ranked >= kth, ranked, -jnp.inf)
  probs = jax.nn.softmax(ranked, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each rank
  keep_rank = (before < top_p) | (top_p >= 1.0)
  keep_rank = keep_rank.at[:, 0].set(True)
  n_keep = jnp.sum(keep_rank & jnp.isfinite(ranked), axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(ranked, n_keep - 1, axis=-1)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_step(
  logits: jax.Array, key: jax.Array, knobs: Knobs, *, greedy: bool, filtered: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws one token per row from f32 logits `[B, V]` with `key` (one key, or `[B]` keys).

  Returns (tokens [B] int32, logprobs [B] under the raw softmax, sampling_logprobs [B]
  under the temperature/top-k/top-p distribution sampled from; 0 when greedy).
  """
  logits = logits.astype(jnp.float32)
  raw_logp = jax.nn.log_softmax(logits, axis=-1)
  if greedy:
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampling_logp = jnp.zeros(tokens.shape, jnp.float32)
  else:
    if filtered:
      scaled = filter_logits(logits / knobs.temperature, knobs.top_k, knobs.top_p)
      scaled_logp = jax.nn.log_softmax(scaled, axis=-1)
    else:  # at T = 1 (the on-policy default) the sampled distribution is the raw one
      scaled_logp = jax.lax.cond(
        knobs.temperature == 1.0,
        lambda: raw_logp,
        lambda: jax.nn.log_softmax(logits / knobs.temperature, axis=-1),
      )
    tokens = draw(key, scaled_logp)
    sampling_logp = _pick(scaled_logp, tokens)
  return tokens, _pick(raw_logp, tokens), sampling_logp


def prompt_keys(rng: jax.Array, prompt_ids: jax.Array, t: jax.Array) -> jax.Array:
  """The "prompt" key schedule: `fold_in(fold_in(rng, p), t)` per row → `[B]` keys.

  prompt_ids, t: `[B]` int (t broadcasts). A raw uint32 key is wrapped first, so the
  result is a typed key array either way.
  """
  if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  t = jnp.broadcast_to(t, prompt_ids.shape)
  return jax.vmap(lambda p, s: jax.random.fold_in(jax.random.fold_in(rng, p), s))(prompt_ids, t)


def draw(key: jax.Array, logp: jax.Array, block: int | None = None) -> jax.Array:
  """One token per row from log-probabilities `[B, V]` (-inf = excluded) → `[B]` int32.

  `key`: one key (row b takes row b of its `[B]` uniforms) or a typed key array `[B]`
  (row b takes the one uniform of key b).

  Inverse CDF: one uniform per row, where Gumbel-max (`jax.random.categorical`) draws V. The
  CDF is walked in two levels, so no running sum spans the vocabulary (XLA:CPU lowers a long
  cumsum to a slow reduce-window): the uniform picks a block of `block` tokens (default: the
  power of two ≥ √V) from the running sum of the block masses, then a token from the running
  sum inside that block. The draw is the one-level inverse CDF's up to f32 rounding of the
  sums (~1e-7 of the total mass). An excluded token is never drawn: its CDF step is empty,
  and a uniform that rounds past a block's (or the row's) allowed tokens falls back to the
  nearest allowed one in it.
  """
  rows, vocab = logp.shape
  block = block or 1 << max(math.ceil(math.log2(math.sqrt(vocab))), 0)
  n_blocks = -(-vocab // block)
  probs = jnp.exp(logp)
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1:
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(key)
  else:
    u = jax.random.uniform(key, (rows, 1), jnp.float32)[:, 0]
  blocks = jnp.pad(probs, ((0, 0), (0, n_blocks * block - vocab))).reshape(rows, n_blocks, block)
  mass = jnp.sum(blocks, axis=-1)  # [B, n_blocks]
  cdf = jnp.cumsum(mass, axis=-1)
  target = u * cdf[:, -1]
  chosen = _first_last_allowed(mass, jnp.sum(cdf <= target[:, None], axis=-1))
  inner = jnp.take_along_axis(blocks, chosen[:, None, None], axis=1)[:, 0]  # [B, block]
  rest = target - _pick(cdf - mass, chosen)  # the uniform's mass left inside the block
  index = _first_last_allowed(inner, jnp.sum(jnp.cumsum(inner, axis=-1) <= rest[:, None], axis=-1))
  return (chosen * block + index).astype(jnp.int32)


def _first_last_allowed(probs: jax.Array, index: jax.Array) -> jax.Array:
  """`index [B]` clamped into the span of `probs [B, N]`'s positive entries."""
  first = jnp.argmax(probs > 0, axis=-1)
  last = probs.shape[-1] - 1 - jnp.argmax(probs[:, ::-1] > 0, axis=-1)
  return jnp.clip(index, first, last)


def _pick(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x `[B, V]`, idx `[B]` → `[B]`."""
  return jnp.take_along_axis(x, idx[:, None], axis=-1)[:, 0]


def decode_step(
  model, cache: Cache, kv_mask: jax.Array, tokens: jax.Array, positions: jax.Array, slot: jax.Array
) -> tuple[jax.Array, Cache]:
  """Feeds one token per row (`tokens`, `positions` `[B]`) at cache `slot` → f32 logits `[B, V]`."""
  hidden, cache = model(
    tokens[:, None], positions[:, None], kv_mask=kv_mask, cache=cache, cache_index=slot
  )
  return model.logits(hidden)[:, 0], cache


def to_right_padded(
  prompt_left: jax.Array,
  generated: jax.Array,
  gen_logp: jax.Array,
  gen_slogp: jax.Array,
  lengths: jax.Array,
  completion_lengths: jax.Array,
  pad_id: jax.Array,
) -> Rollouts:
  """Left-aligned cache layout → right-padded rollouts, by one gather per array.

  prompt_left `[B, P]` (row b's prompt in `[P - len_b, P)`), generated / gen_logp /
  gen_slogp `[B, N]`. Output index i of row b reads left-layout index
  `i + P - len_b` of `concat(prompt_left, generated)`.
  """
  b, p = prompt_left.shape
  total = p + generated.shape[1]
  i = jnp.arange(total)[None, :]
  src = jnp.clip(i + (p - lengths)[:, None], 0, total - 1)
  end = (lengths + completion_lengths)[:, None]
  in_seq = i < end
  mask = (i >= lengths[:, None]) & in_seq
  zeros = jnp.zeros((b, p), jnp.float32)

  def gather(left, right, fill, where):
    full = jnp.concatenate([left, right], axis=1)
    return jnp.where(where, jnp.take_along_axis(full, src, axis=1), fill)

  return Rollouts(
    tokens=gather(prompt_left, generated, pad_id, in_seq).astype(jnp.int32),
    prompt_lengths=lengths.astype(jnp.int32),
    completion_lengths=completion_lengths.astype(jnp.int32),
    completion_mask=mask.astype(jnp.float32),
    logprobs=gather(zeros, gen_logp, 0.0, mask),
    sampling_logprobs=gather(zeros, gen_slogp, 0.0, mask),
  )


# --- the sampler -----------------------------------------------------------------


class _Key(NamedTuple):
  batch: int
  bucket: int
  max_new_tokens: int
  greedy: bool
  filtered: bool
  n_stop: int
  key_schedule: str


class _ContinuousKey(NamedTuple):
  slots: int
  prompts: int
  groups: int
  bucket: int
  max_new_tokens: int
  greedy: bool
  filtered: bool
  n_stop: int


class LoopStats(NamedTuple):
  """Work done by `Sampler.generate_continuous` (int32 scalars).

  decode_steps: iterations of the decode loop (one batched token per slot each).
  prefills: one-row prompt prefills (one per prompt).
  slot_of_prompt: `[N]` the slot that decoded each prompt.
  """

  decode_steps: jax.Array
  prefills: jax.Array
  slot_of_prompt: jax.Array


class Sampler:
  """Compiled prefill + decode for one model architecture on one mesh.

  Usage::

    graphdef, state = nnx.split(model)
    sampler = Sampler(graphdef, mesh)
    out = sampler.generate(state, prompts, jax.random.key(0), SamplingParams(...))

  `state` is an argument of every call (new params never recompile). Compiled
  functions are cached per `_Key`; `num_compiles` counts traces of the compiled
  pieces (prefill and decode are two), so a steady state leaves it unchanged.

  Args:
    graphdef: from `nnx.split(model)` of a `Transformer`.
    mesh: the device mesh; the batch is sharded over its data axes (the batch is
      padded with dummy rows up to a multiple of their size) and the KV cache's
      kv_heads over `tensor` where it divides.
    rules: logical-axis rules (`jdistill.runtime.sharding.DEFAULT_RULES`).
    cache_dtype: KV cache dtype (default: the model's compute dtype).
    max_cache_len: optional cap on `bucket + max_new_tokens` (e.g. the model's
      maximum context); exceeding it raises ValueError.
    keep_cache: keep each shape's cache buffers between calls (faster, but the
      memory stays allocated); by default a fresh cache is made per call.
  """

  def __init__(
    self,
    graphdef,
    mesh: Mesh,
    rules: shd.Rules = shd.DEFAULT_RULES,
    cache_dtype: Any = None,
    *,
    max_cache_len: int | None = None,
    keep_cache: bool = False,
  ):
    self.graphdef = graphdef
    self.mesh = mesh
    self.rules = tuple(rules)
    self.cache_dtype = cache_dtype
    self.max_cache_len = max_cache_len
    self.keep_cache = keep_cache
    self.num_compiles = 0
    self._fns: dict[_Key | _ContinuousKey, Any] = {}
    self._caches: dict[_Key, Cache] = {}
    self._cfg = None

  # -- shardings --
  def data_parallel_size(self) -> int:
    return shd.data_parallel_size(self.mesh, self.rules)

  def _batch(self, ndim: int) -> NamedSharding:
    return shd.batch_sharding(self.mesh, ndim, self.rules)

  def _cache_sharding(self, cfg, shape) -> NamedSharding:
    spec = shd.logical_to_spec(cache_logical_axes(cfg), shape, self.mesh, self.rules)
    return NamedSharding(self.mesh, spec)

  # -- compiled pieces --
  def _compiled(self, key: _Key, cfg) -> tuple:
    if key not in self._fns:
      self._fns[key] = self._build(key, cfg)
    return self._fns[key]

  def _build(self, key: _Key, cfg) -> tuple:
    bucket, n_new = key.bucket, key.max_new_tokens
    cache_len = bucket + n_new
    cache_shape = jax.tree.leaves(jax.eval_shape(lambda: init_cache(cfg, key.batch, cache_len)))[0]
    cache_sh = self._cache_sharding(cfg, cache_shape.shape)
    constrain_cache = lambda c: jax.lax.with_sharding_constraint(
      c, jax.tree.map(lambda _: cache_sh, c)
    )
    b1, b2 = self._batch(1), self._batch(2)
    graphdef, sampler = self.graphdef, self

    def alloc():
      return constrain_cache(init_cache(cfg, key.batch, cache_len, self.cache_dtype))

    def prefill(state, cache, prompt_left, lengths):
      """→ (cache with the prompts written, f32 logits `[B, V]` at the last prompt slot)."""
      sampler.num_compiles += 1
      model = nnx.merge(graphdef, state)
      positions, kv_mask = cache_layout(lengths, bucket, cache_len)
      hidden, cache = model(prompt_left, positions, kv_mask=kv_mask, cache=cache, cache_index=0)
      logits = model.logits(hidden[:, -1:])[:, 0]
      return constrain_cache(cache), jax.lax.with_sharding_constraint(logits, b2)

    def decode(state, cache, logits, prompt_left, lengths, limits, rng, knobs):
      """Samples up to `limits` `[B]` (≤ `n_new`) tokens per row; stops early once every row
      has hit a stop id or its limit."""
      sampler.num_compiles += 1
      model = nnx.merge(graphdef, state)
      _, kv_mask = cache_layout(lengths, bucket, cache_len)
      batch = lengths.shape[0]
      rows = jnp.arange(batch, dtype=jnp.int32)

      def sample(lg, t):
        if key.key_schedule == "prompt":
          step_key = prompt_keys(rng, rows, t)
        else:
          step_key = jax.random.fold_in(rng, t)
        return sample_step(lg, step_key, knobs, greedy=key.greedy, filtered=key.filtered)

      is_stop = lambda tok: jnp.any(tok[:, None] == knobs.stop_ids[None, :], axis=-1)

      def record(carry, tok, lp, slp):
        """Writes step t's (= carry[0]) outputs for rows still running; updates done / counts."""
        t, cache, _, done, count, toks, lps, slps = carry
        live = ~done
        tok = jnp.where(live, tok, knobs.pad_id)
        toks = toks.at[:, t].set(tok)
        lps = lps.at[:, t].set(jnp.where(live, lp, 0.0))
        slps = slps.at[:, t].set(jnp.where(live, slp, 0.0))
        count = count + live.astype(jnp.int32)
        return (
          t + 1,
          cache,
          tok,
          done | (live & (is_stop(tok) | (count >= limits))),
          count,
          toks,
          lps,
          slps,
        )

      def body(carry):
        t, cache, prev = carry[0], carry[1], carry[2]
        slot = bucket + t - 1  # the previous token's slot
        step_logits, cache = decode_step(model, cache, kv_mask, prev, lengths + t - 1, slot)
        return record((t, cache) + carry[2:], *sample(step_logits, t))

      def cond(carry):
        return (carry[0] < n_new) & ~jnp.all(carry[3])

      zeros_f = jax.lax.with_sharding_constraint(jnp.zeros((batch, n_new), jnp.float32), b2)
      init = (
        jnp.int32(0),
        cache,
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch,), bool),
        jnp.zeros((batch,), jnp.int32),
        jax.lax.with_sharding_constraint(jnp.full((batch, n_new), knobs.pad_id, jnp.int32), b2),
        zeros_f,
        zeros_f,
      )
      carry = record(init, *sample(logits, 0))
      _, cache, _, _, count, toks, lps, slps = jax.lax.while_loop(cond, body, carry)
      out = to_right_padded(prompt_left, toks, lps, slps, lengths, count, knobs.pad_id)
      out = jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, b1 if x.ndim == 1 else b2), out
      )
      return constrain_cache(cache), out

    return (
      jax.jit(alloc),
      jax.jit(prefill, donate_argnums=(1,)),
      jax.jit(decode, donate_argnums=(1,)),
    )

  def _build_continuous(self, key: _ContinuousKey, cfg):
    """The one compiled function of `generate_continuous` for this static shape."""
    bucket, n_new, n_slots, n_prompts = key.bucket, key.max_new_tokens, key.slots, key.prompts
    cache_len = bucket + n_new
    cache_shape = jax.tree.leaves(jax.eval_shape(lambda: init_cache(cfg, n_slots, cache_len)))[0]
    cache_sh = self._cache_sharding(cfg, cache_shape.shape)
    rows = 1 if cfg.scan_layers else 0  # the cache's batch axis (scanned: `[layers, B, ...]`)
    constrain_cache = lambda c: jax.lax.with_sharding_constraint(
      c, jax.tree.map(lambda _: cache_sh, c)
    )
    graphdef, sampler = self.graphdef, self

    def run(state, prompt_left, lengths, limits, order, group_start, group_count, slot_group, rng,
            knobs):  # fmt: skip
      """prompt_left `[N, bucket]`, lengths / limits / order `[N]` (order: prompt ids grouped
      by group, queue order within each), group_start / group_count `[G]`, slot_group `[S]`
      → (Rollouts `[N, cache_len]`, LoopStats)."""
      sampler.num_compiles += 1
      model = nnx.merge(graphdef, state)
      slot_ids = jnp.arange(n_slots, dtype=jnp.int32)
      is_stop = lambda tok: jnp.any(tok[:, None] == knobs.stop_ids[None, :], axis=-1)

      def sample(logits, prompt, t):
        keys = prompt_keys(rng, prompt, t)
        return sample_step(logits, keys, knobs, greedy=key.greedy, filtered=key.filtered)

      def record(c, live, tok, lp, slp):
        """Stores each live slot's token as position t of its prompt; frees finished slots."""
        p, t = c["prompt"], c["t"]
        row = jnp.where(live, p, n_prompts)  # out of range: dropped
        out = dict(c)
        out["toks"] = c["toks"].at[row, t].set(tok, mode="drop")
        out["lps"] = c["lps"].at[row, t].set(lp, mode="drop")
        out["slps"] = c["slps"].at[row, t].set(slp, mode="drop")
        out["count"] = c["count"].at[row].set(t + 1, mode="drop")
        limit = limits[jnp.clip(p, 0, n_prompts - 1)]
        finished = live & (is_stop(tok) | (t + 1 >= limit))
        out["prompt"] = jnp.where(finished, -1, p)
        out["t"] = jnp.where(live, t + 1, t)
        out["prev"] = jnp.where(live, tok, c["prev"])
        return out

      def waiting(c):
        """`[S]`: the slot is free and its group still has queued prompts."""
        return (c["prompt"] < 0) & (c["next"][slot_group] < group_count[slot_group])

      def refill_one(c):
        # One row's prompt is prefilled on its own ([1, bucket]): no padding to a batch of
        # refills, and the row's cache region is rewritten exactly as a fresh batch would be.
        r = jnp.argmax(waiting(c)).astype(jnp.int32)
        g = slot_group[r]
        p = order[group_start[g] + c["next"][g]]
        row_cache = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, r, 1, rows), c["cache"])
        positions, kv_mask = cache_layout(lengths[p][None], bucket, cache_len)
        hidden, row_cache = model(
          prompt_left[p][None], positions, kv_mask=kv_mask, cache=row_cache, cache_index=0
        )
        logits = model.logits(hidden[:, -1:])[:, 0]
        tok, lp, slp = sample(logits, p[None], jnp.zeros((1,), jnp.int32))
        c = dict(c)
        c["cache"] = constrain_cache(
          jax.tree.map(
            lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y, r, rows), c["cache"], row_cache
          )
        )
        c["next"] = c["next"].at[g].add(1)
        c["prefills"] = c["prefills"] + 1
        c["slot_of"] = c["slot_of"].at[p].set(r)
        c["prompt"] = c["prompt"].at[r].set(p)
        c["t"] = c["t"].at[r].set(0)
        put = lambda x: jnp.zeros((n_slots,), x.dtype).at[r].set(x[0])
        return record(c, slot_ids == r, put(tok), put(lp), put(slp))

      def refill(c):
        return jax.lax.while_loop(lambda c: jnp.any(waiting(c)), refill_one, c)

      def one_row(cache_row, tok, pos, kv_mask, slot):
        """One slot's decode step; vmapped, so each slot writes its own cache slot."""
        cache_row = jax.tree.map(lambda x: jnp.expand_dims(x, rows), cache_row)
        hidden, cache_row = model(
          tok[None, None], pos[None, None], kv_mask=kv_mask[None], cache=cache_row,
          cache_index=slot,
        )  # fmt: skip
        return model.logits(hidden)[0, 0], jax.tree.map(lambda x: jnp.squeeze(x, rows), cache_row)

      def decode(c):
        live = c["prompt"] >= 0
        p = jnp.clip(c["prompt"], 0, n_prompts - 1)
        length, t = lengths[p], c["t"]
        _, kv_mask = cache_layout(length, bucket, cache_len)
        # Slot bucket + t - 1 takes the previous token, as in the static loop. A slot left
        # free (its queue is empty) computes a discarded row: the batch shape is fixed.
        logits, cache = jax.vmap(one_row, in_axes=(rows, 0, 0, 0, 0), out_axes=(0, rows))(
          c["cache"], c["prev"], length + t - 1, kv_mask, bucket + t - 1
        )
        c = dict(c, cache=constrain_cache(cache), steps=c["steps"] + 1)
        return refill(record(c, live, *sample(logits, p, t)))

      zeros_f = jnp.zeros((n_prompts, n_new), jnp.float32)
      init = dict(
        cache=constrain_cache(init_cache(cfg, n_slots, cache_len, sampler.cache_dtype)),
        prompt=jnp.full((n_slots,), -1, jnp.int32),
        t=jnp.zeros((n_slots,), jnp.int32),
        prev=jnp.zeros((n_slots,), jnp.int32),
        next=jnp.zeros(group_count.shape, jnp.int32),
        toks=jnp.full((n_prompts, n_new), knobs.pad_id, jnp.int32),
        lps=zeros_f,
        slps=zeros_f,
        count=jnp.zeros((n_prompts,), jnp.int32),
        steps=jnp.int32(0),
        prefills=jnp.int32(0),
        slot_of=jnp.full((n_prompts,), -1, jnp.int32),
      )
      c = jax.lax.while_loop(lambda c: jnp.any(c["prompt"] >= 0), decode, refill(init))
      out = to_right_padded(
        prompt_left, c["toks"], c["lps"], c["slps"], lengths, c["count"], knobs.pad_id
      )
      return out, LoopStats(c["steps"], c["prefills"], c["slot_of"])

    return jax.jit(run)

  # -- public --
  def model_config(self, state):
    if self._cfg is None:
      self._cfg = nnx.merge(self.graphdef, state).cfg
    return self._cfg

  def generate(
    self,
    state,
    prompts,
    rng: jax.Array,
    params: SamplingParams,
    *,
    max_new_per_prompt: Sequence[int] | np.ndarray | None = None,
  ) -> Rollouts:
    """Samples completions for a batch of prompts.

    Args:
      state: model state (`nnx.split(model)[1]`), placed on `self.mesh`.
      prompts: a list of token-id lists, or `(tokens [B, P0] right-padded, lengths [B])`;
        the prompt bucket is the smallest one ≥ the padded width P0. With several
        processes each passes its own rows (joined process-major).
      rng: PRNG key, drawn from as `params.key_schedule` says (unused when greedy); with
        "prompt", prompt p is row p of the (global) batch.
      params: SamplingParams.
      max_new_per_prompt: optional `[B]` ints in [1, max_new_tokens]: row b stops after
        that many tokens (or at a stop token). Default: max_new_tokens for every row.
    Returns:
      Rollouts with `[B, P + max_new_tokens]` arrays (P = chosen prompt bucket).
    """
    cfg, tokens, lengths, bucket = self._prepare(state, prompts, params)
    n_rows = tokens.shape[0]
    limits = self._limits(max_new_per_prompt, n_rows, params.max_new_tokens)
    if jax.process_count() > 1:
      # Each process passes its own rows; they are joined process-major into the global batch.
      local_dp = self.data_parallel_size() // jax.process_count()
      if self.data_parallel_size() % jax.process_count() or n_rows % max(local_dp, 1):
        raise ValueError(
          f"{n_rows} prompt rows per process do not divide over the "
          f"{self.data_parallel_size()} data-parallel shards of "
          f"{jax.process_count()} processes"
        )
    else:
      tokens, lengths = pad_rows(tokens, lengths, self.data_parallel_size(), params.pad_id)
      # dummy rows stop after one token, so they never hold the loop open
      limits = np.concatenate([limits, np.ones(tokens.shape[0] - n_rows, np.int32)])
    left = left_align(tokens, lengths, bucket, params.pad_id)
    global_rows = left.shape[0] * jax.process_count()
    key = _Key(
      global_rows,
      bucket,
      params.max_new_tokens,
      params.greedy,
      params.filtered,
      len(params.stop_token_ids),
      params.key_schedule,
    )
    alloc, prefill, decode = self._compiled(key, cfg)
    cache = self._caches.pop(key, None) or alloc()
    left_d = jax.make_array_from_process_local_data(self._batch(2), left)
    lengths_d = jax.make_array_from_process_local_data(self._batch(1), lengths)
    limits_d = jax.make_array_from_process_local_data(self._batch(1), limits)
    cache, logits = prefill(state, cache, left_d, lengths_d)
    cache, out = decode(state, cache, logits, left_d, lengths_d, limits_d, rng, knobs_of(params))
    if self.keep_cache:
      self._caches[key] = cache
    if global_rows != n_rows * jax.process_count():
      out = jax.tree.map(lambda x: x[:n_rows], out)
    return out

  def generate_continuous(
    self,
    state,
    prompts,
    rng: jax.Array,
    params: SamplingParams,
    *,
    slots_per_group: int | Sequence[int],
    groups: Sequence[int] | np.ndarray | None = None,
    max_new_per_prompt: Sequence[int] | np.ndarray | None = None,
  ) -> tuple[Rollouts, LoopStats]:
    """Samples every prompt with a fixed number of decode slots (continuous batching).

    Each group (a teacher) owns `slots_per_group[g]` slots and a queue of its prompts in
    their given order. One compiled `lax.while_loop` decodes all slots together; when a
    slot's row emits a stop token or reaches its limit, the next queued prompt of the
    slot's group is prefilled into that slot's KV cache (a one-row prefill inside the
    loop) and the slot decodes on, until every prompt is done. Rows that finish early thus
    stop costing: the loop runs about `sum(lengths) / slots` steps, not `max(lengths)` per
    batch.

    Draws follow the "prompt" key schedule (prompt p = its index in `prompts`), so with the
    same rng each prompt gets the tokens `generate` gives it with
    `key_schedule="prompt"`, whatever the slot count or queue order. `params.key_schedule`
    must therefore be "prompt".

    Args:
      state, prompts, params, max_new_per_prompt: as for `generate` (`N` prompts).
      rng: PRNG key; token t of prompt p draws with `fold_in(fold_in(rng, p), t)`.
      slots_per_group: decode slots per group (an int: the same for every group), each ≥ 1.
      groups: `[N]` group index in [0, G) of each prompt (default: one group).
    Returns:
      (Rollouts `[N, P + max_new_tokens]` in the order of `prompts`, LoopStats).
    """
    if not isinstance(params, SamplingParams):
      raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
    if params.key_schedule != "prompt":
      raise ValueError(
        "generate_continuous draws with the per-prompt key schedule; pass SamplingParams("
        f"key_schedule='prompt') (got {params.key_schedule!r})"
      )
    if jax.process_count() > 1:
      raise ValueError("generate_continuous runs on one process only")
    cfg, tokens, lengths, bucket = self._prepare(state, prompts, params)
    n = tokens.shape[0]
    limits = self._limits(max_new_per_prompt, n, params.max_new_tokens)
    groups = np.zeros((n,), np.int64) if groups is None else np.asarray(groups)
    if groups.shape != (n,) or not np.issubdtype(groups.dtype, np.integer) or groups.min() < 0:
      raise ValueError(f"groups: expected {n} group indices >= 0, one per prompt")
    n_groups = int(groups.max()) + 1
    if _is_int(slots_per_group):
      slots_per_group = [slots_per_group] * n_groups
    slots = np.asarray(slots_per_group)
    if (
      slots.shape != (n_groups,) or not np.issubdtype(slots.dtype, np.integer) or np.any(slots < 1)
    ):
      raise ValueError(
        f"slots_per_group: expected an int or {n_groups} ints >= 1 (one per group); got "
        f"{slots_per_group!r}"
      )
    order = np.argsort(groups, kind="stable").astype(np.int32)
    count = np.bincount(groups, minlength=n_groups).astype(np.int32)
    start = (np.cumsum(count) - count).astype(np.int32)
    slot_group = np.repeat(np.arange(n_groups, dtype=np.int32), slots)
    left = left_align(tokens, lengths, bucket, params.pad_id)
    key = _ContinuousKey(
      len(slot_group),
      n,
      n_groups,
      bucket,
      params.max_new_tokens,
      params.greedy,
      params.filtered,
      len(params.stop_token_ids),
    )
    if key not in self._fns:
      self._fns[key] = self._build_continuous(key, cfg)
    return self._fns[key](
      state, left, lengths, limits, order, start, count, slot_group, rng, knobs_of(params)
    )

  def _prepare(self, state, prompts, params: SamplingParams):
    """Validates a call → (model cfg, tokens `[B, P0]`, lengths `[B]`, prompt bucket)."""
    if not isinstance(params, SamplingParams):
      raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
    cfg = self.model_config(state)
    tokens, lengths = prompt_arrays(prompts, params.pad_id)
    self._check_ids(tokens, lengths, params, cfg.vocab_size)
    # From the padded width, not the longest prompt: batches from one data pipeline (fixed
    # width) then always reuse the same compiled functions, and all processes agree.
    bucket = choose_bucket(tokens.shape[1], params.prompt_buckets)
    cache_len = bucket + params.max_new_tokens
    if self.max_cache_len is not None and cache_len > self.max_cache_len:
      raise ValueError(
        f"prompt bucket {bucket} + max_new_tokens {params.max_new_tokens} = "
        f"{cache_len} cache slots exceed the cache limit max_cache_len="
        f"{self.max_cache_len}"
      )
    return cfg, tokens, lengths, bucket

  @staticmethod
  def _limits(max_new_per_prompt, n_rows: int, max_new_tokens: int) -> np.ndarray:
    """Per-row token limits `[B]` int32 (default: max_new_tokens each)."""
    if max_new_per_prompt is None:
      return np.full((n_rows,), max_new_tokens, np.int32)
    limits = np.asarray(max_new_per_prompt)
    if (
      limits.shape != (n_rows,)
      or not np.issubdtype(limits.dtype, np.integer)
      or np.any(limits < 1)
      or np.any(limits > max_new_tokens)
    ):
      raise ValueError(
        f"max_new_per_prompt: expected {n_rows} integers in [1, {max_new_tokens}] "
        f"(max_new_tokens), one per prompt; got {limits.tolist()}"
      )
    return limits.astype(np.int32)

  @staticmethod
  def _check_ids(tokens: np.ndarray, lengths: np.ndarray, params: SamplingParams, vocab: int):
    bad_stop = [s for s in params.stop_token_ids if not 0 <= s < vocab]
    if bad_stop:
      raise ValueError(
        f"SamplingParams.stop_token_ids {bad_stop} are outside the vocabulary [0, {vocab})"
      )
    real = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    if np.any(real & ((tokens < 0) | (tokens >= vocab))):
      raise ValueError(f"prompts: token ids must lie in [0, {vocab})")

"""Per-step token drawing: top-k / top-p filtering, the two-level inverse-CDF `draw`, one
sampling step over a batch of logits, and the per-prompt key schedule. Pure device code."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jdistill.sampling.params import Knobs


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

  No `[B, V]` log-softmax or probabilities are written: at T = 1 without top-k/top-p the
  step reads the logits twice (their max, then the block masses of `draw_logits`), and both
  log-probs come from the draw's normaliser.
  """
  logits = logits.astype(jnp.float32)
  if greedy:
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tokens, _pick(logits, tokens) - _logsumexp(logits), jnp.zeros(tokens.shape, jnp.float32)
  if filtered:
    scaled = filter_logits(logits / knobs.temperature, knobs.top_k, knobs.top_p)
    tokens, sampling_logp = draw_logits(key, scaled)
    return tokens, _pick(logits, tokens) - _logsumexp(logits), sampling_logp
  # the temperature scales inside the draw's passes (no `logits / T` array); at T = 1 (the
  # on-policy default) the sampled distribution is the raw one
  tokens, sampling_logp = draw_logits(key, logits, inv_temperature=1.0 / knobs.temperature)
  raw_logp = jax.lax.cond(
    knobs.temperature == 1.0,
    lambda: sampling_logp,
    lambda: _pick(logits, tokens) - _logsumexp(logits),
  )
  return tokens, raw_logp, sampling_logp


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

  `draw_logits`' tokens (any shift of a row draws the same); see there.
  """
  return draw_logits(key, logp, block)[0]


def draw_logits(
  key: jax.Array,
  logits: jax.Array,
  block: int | None = None,
  inv_temperature: jax.Array | float = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """One token per row from the softmax of `logits * inv_temperature` (`[B, V]` f32, -inf =
  excluded; inv_temperature > 0) → (tokens `[B]` int32, their log-probabilities `[B]` under
  that softmax).

  `key`: one key (row b takes row b of its `[B]` uniforms) or a typed key array `[B]`
  (row b takes the one uniform of key b).

  Inverse CDF: one uniform per row, where Gumbel-max (`jax.random.categorical`) draws V. The
  CDF is walked in two levels, so no running sum spans the vocabulary (XLA:CPU lowers a long
  cumsum to a slow reduce-window): the uniform picks a block of `block` tokens (default:
  `_block_size(V)`, about √V) from the running sum of the block masses, then a token from the
  running sum inside that block. The draw is the one-level inverse CDF's up to f32 rounding of the
  sums (~1e-7 of the total mass). An excluded token is never drawn: its CDF step is empty,
  and a uniform that rounds past a block's (or the row's) allowed tokens falls back to the
  nearest allowed one in it.

  Two passes over the row (its max; the masses `exp((x - max) · inv_temperature)` summed per
  block) and no `[B, V]` output: the normaliser is the sum of the block masses, and only the
  chosen block's `block` weights are formed again.
  """
  rows, vocab = logits.shape
  block = block or _block_size(vocab)
  n_blocks = -(-vocab // block)
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1:
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(key)
  else:
    u = jax.random.uniform(key, (rows, 1), jnp.float32)[:, 0]
  top = jnp.max(logits, axis=-1)
  top = jnp.where(jnp.isfinite(top), top, 0.0)  # a row without a finite weight draws token 0
  padded = jnp.pad(logits, ((0, 0), (0, n_blocks * block - vocab)), constant_values=-jnp.inf)
  blocks = padded.reshape(rows, n_blocks, block)
  mass = jnp.sum(jnp.exp((blocks - top[:, None, None]) * inv_temperature), axis=-1)  # [B, n_blocks]
  cdf = jnp.cumsum(mass, axis=-1)
  total = cdf[:, -1]
  target = u * total
  chosen = _first_last_allowed(mass, jnp.sum(cdf <= target[:, None], axis=-1))
  inner = jnp.take_along_axis(blocks, chosen[:, None, None], axis=1)[:, 0]  # [B, block]
  inner = jnp.exp((inner - top[:, None]) * inv_temperature)
  rest = target - _pick(cdf - mass, chosen)  # the uniform's mass left inside the block
  index = _first_last_allowed(inner, jnp.sum(jnp.cumsum(inner, axis=-1) <= rest[:, None], axis=-1))
  tokens = (chosen * block + index).astype(jnp.int32)
  return tokens, (_pick(logits, tokens) - top) * inv_temperature - jnp.log(total)


def _block_size(vocab: int) -> int:
  """Tokens per block of `draw_logits`: the largest power of two ≤ the one ≥ √V that divides
  V (no padded copy of the logits: 256 at 32,000, 128 at 151,936), unless that is under a
  quarter of it; then the power of two ≥ √V, with the last block padded."""
  target = 1 << max(math.ceil(math.log2(math.sqrt(vocab))), 0)
  block = target
  while block > 1 and vocab % block:
    block //= 2
  return block if 4 * block >= target else target


def _logsumexp(x: jax.Array) -> jax.Array:
  """`[B, V]` → `[B]`: two passes (max, sum of exp), no `[B, V]` output."""
  top = jax.lax.stop_gradient(jnp.max(x, axis=-1))
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  return top + jnp.log(jnp.sum(jnp.exp(x - top[:, None]), axis=-1))


def _first_last_allowed(probs: jax.Array, index: jax.Array) -> jax.Array:
  """`index [B]` clamped into the span of `probs [B, N]`'s positive entries."""
  first = jnp.argmax(probs > 0, axis=-1)
  last = probs.shape[-1] - 1 - jnp.argmax(probs[:, ::-1] > 0, axis=-1)
  return jnp.clip(index, first, last)


def _pick(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x `[B, V]`, idx `[B]` → `[B]`."""
  return jnp.take_along_axis(x, idx[:, None], axis=-1)[:, 0]

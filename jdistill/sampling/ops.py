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

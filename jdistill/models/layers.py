"""Building blocks both attentions share (`transformer.Attention`, `mla.MLAttention`):
parameters with logical axes, RMSNorm (and Gemma's `1 + w` one), RoPE with its scalings
(linear, Llama 3, YaRN), and causal (optionally sliding-window) attention over materialised
or query-blocked scores."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.config import ModelConfig


def _param(rngs: nnx.Rngs, shape, axes, dtype, scale: float | None = None, ones=False):
  if ones:
    value = jnp.ones(shape, dtype)
  elif scale is None:
    value = jnp.zeros(shape, dtype)
  else:
    value = (scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, logical_axes=axes)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis in float32, cast back to x's dtype before the scale (as HF)."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * xf.astype(x.dtype)


def gemma_rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """Gemma's RMSNorm: scaled by `1 + weight`, in float32, cast to x's dtype after the scale
  (HF's `Gemma3RMSNorm`; the order matters below float32)."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (xf * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature `0.1 * mscale * ln(factor) + 1` (1 for factor <= 1)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_attention_factor(cfg: ModelConfig, sliding: bool = False) -> float:
  """The scale of RoPE's cos and sin: YaRN's `attention_factor` (given, or from `mscale` /
  `mscale_all_dim`), 1 for the other RoPE types and for sliding (local) layers."""
  rope = {} if sliding else cfg.rope_dict or {}
  if rope.get("rope_type", "default") != "yarn":
    return 1.0
  if rope.get("attention_factor") is not None:
    return float(rope["attention_factor"])
  factor, mscale, mscale_all = rope["factor"], rope.get("mscale"), rope.get("mscale_all_dim")
  if mscale and mscale_all:
    return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
  return yarn_mscale(factor)


def _yarn_inv_freq(inv_freq, rope: dict, dim: int, base: float) -> jax.Array:
  """YaRN (NTK-by-parts): interpolated frequencies below the `beta_slow` rotations,
  extrapolated above `beta_fast`, a linear ramp between (HF's `_compute_yarn_parameters`)."""
  factor, old_len = rope["factor"], rope["original_max_position_embeddings"]
  fast, slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

  def correction_dim(rotations):
    return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(fast), correction_dim(slow)
  if rope.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # no zero-width ramp
  ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  extrapolated = 1 - ramp
  return inv_freq / factor * (1 - extrapolated) + inv_freq * extrapolated


def rope_inv_freq(cfg: ModelConfig, sliding: bool = False) -> jax.Array:
  """Inverse frequencies `[rope_dim // 2]`, with linear, Llama-3 or YaRN scaling; a sliding
  (Gemma 3 local) layer's: unscaled, of base `rope_local_theta`."""
  dim = cfg.rope_dim
  theta = cfg.rope_local_theta if sliding else cfg.rope_theta
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  rope = {} if sliding else cfg.rope_dict or {}
  rope_type = rope.get("rope_type", "default")
  if rope_type == "yarn":
    return _yarn_inv_freq(inv_freq, rope, dim, cfg.rope_theta)
  if rope_type == "linear":
    return inv_freq / rope["factor"]
  if rope_type == "llama3":
    factor = rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(is_medium, smoothed, scaled)
  return inv_freq


def apply_rope(
  x: jax.Array, positions: jax.Array, inv_freq: jax.Array, scale: float = 1.0
) -> jax.Array:
  """Rotary embedding (HF's rotate-half layout), cos and sin times `scale` (YaRN's attention
  factor). x: `[B, T, H, Dh]`, positions: `[B, T]`."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = (jnp.cos(emb) * scale).astype(x.dtype), (jnp.sin(emb) * scale).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def _visible(query_slot, key_slots, window: int | None) -> jax.Array:
  """`[T, S]`: key slot not after the query's and, with a `window`, fewer than `window`
  slots before it (HF's sliding window: the query and the `window - 1` keys before it)."""
  seen = key_slots[None, :] <= query_slot[:, None]
  if window is not None:
    seen &= query_slot[:, None] - key_slots[None, :] < window
  return seen


def _attention(
  q, k, v, key_mask, query_slot, scale: float | None = None, window=None, key_slots=None
):
  """Causal grouped-query attention with materialised scores.

  q: `[B, T, kv_heads, groups, Dh]`; k: `[B, S, kv_heads, Dh]`; v: `[B, S, kv_heads, Dv]`;
  key_mask: `[B, 1 or T, S]`; query_slot: `[T]`, the cache slot of each query; scale: of the
  scores (None: `Dh ** -0.5`); window: None, or attend only to keys fewer than this many
  slots back; key_slots: `[S]`, the slot of each key (None: `arange(S)`; a ring buffer's
  differ). Returns `[B, T, kv_heads, groups, Dv]`.
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  key_slots = jnp.arange(k.shape[1]) if key_slots is None else key_slots
  if q.shape[1] == 1:
    return _one_query_attention(q, k, v, key_mask, query_slot, scale, window, key_slots)
  dt = q.dtype
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * scale
  causal = _visible(query_slot, key_slots, window)  # [T, S]
  mask = causal[None] & key_mask.astype(bool)  # [B, T, S]
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dt)
  return jnp.einsum("bkgts,bskd->btkgd", probs, v)


def _one_query_attention(q, k, v, key_mask, query_slot, scale, window, key_slots):
  """`_attention` of one query per row (a decode step), as products and sums in f32 over
  the cache in its own `[B, S, kv_heads, Dh]` layout: the two dots would have XLA:CPU copy
  every layer's cache into their operand layout on every step (~0.2 ms a layer at
  [16, 192, 2, 64]; this is 0.4 -> 0.25 ms a layer with the softmax)."""
  f32 = jnp.float32
  query = q[:, 0, None].astype(f32)  # [B, 1, kv_heads, groups, Dh]
  scores = jnp.sum(query * k[:, :, :, None].astype(f32), axis=-1) * scale
  mask = _visible(query_slot, key_slots, window) & key_mask[:, 0].astype(bool)  # [B, S]
  scores = jnp.where(mask[:, :, None, None], scores, jnp.finfo(f32).min)  # [B, S, kv, groups]
  probs = jax.nn.softmax(scores, axis=1)
  out = jnp.sum(probs[..., None] * v[:, :, :, None].astype(f32), axis=1)  # [B, kv, groups, Dh]
  return out[:, None].astype(q.dtype)


def _chunked_attention(q, k, v, key_mask, chunk: int, scale: float | None = None, window=None):
  """`_attention` of a cache-less forward, one block of `chunk` queries at a time.

  Only one block's `[B, kv_heads, groups, chunk, S]` scores are live, and each block is
  rematerialised in the backward pass, so attention memory grows with T·chunk instead of
  T² (the part of flash attention that matters for memory; the scores are still exact).
  """
  b, t = q.shape[:2]
  n = -(-t // chunk)
  pad = n * chunk - t  # padded queries attend like the last ones and are dropped
  q = jnp.pad(q, [(0, 0), (0, pad)] + [(0, 0)] * (q.ndim - 2))
  q_blocks = jnp.moveaxis(q.reshape(b, n, chunk, *q.shape[2:]), 1, 0)
  mask_blocks = None
  if key_mask.shape[1] != 1:  # a mask per query (packed rows): blocked like the queries
    key_mask = jnp.pad(key_mask, [(0, 0), (0, pad), (0, 0)], mode="edge")
    mask_blocks = jnp.moveaxis(key_mask.reshape(b, n, chunk, -1), 1, 0)

  @jax.checkpoint
  def block(i, q_block, mask_block):
    slots = i * chunk + jnp.arange(chunk)
    mask = key_mask if mask_block is None else mask_block
    return _attention(q_block, k, v, mask, slots, scale, window)

  out = jax.lax.map(lambda a: block(*a), (jnp.arange(n), q_blocks, mask_blocks))
  return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, *out.shape[3:])[:, :t]

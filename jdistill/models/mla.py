"""DeepSeek-V3's multi-head latent attention (MLA), with the latent KV cache.

Keys and values of all heads come from one `kv_lora_rank` latent per token (after
`kv_a_norm`) and one `qk_rope_head_dim` RoPE key shared by every head. Without a cache
(training, scoring) the latent is expanded into per-head keys `[nope | rope]` and values and
attention runs as GQA's does (`layers._attention`, in query blocks with
`attention_chunk`). With a cache only the latent and the RoPE key are stored (per layer
`{"latent": [B, S, 1, kv_lora_rank], "k_rope": [B, S, 1, qk_rope_head_dim]}`, the `1` a
single shared head so the cache has the GQA cache's rank) and attention runs against the
latent with the absorbed projections: `q_nope · W_UK` is folded into a query over the latent
(`[B, T, heads, kv_lora_rank]`), and `W_UV` is applied to the probability-weighted latent
after the softmax, so no per-head key or value of the past is ever formed.

Softmax scale: `(qk_nope_head_dim + qk_rope_head_dim) ** -0.5`, times `mscale(factor,
mscale_all_dim) ** 2` under YaRN (HF's `yarn_apply_mscale`), on top of YaRN's attention factor
in RoPE's cos and sin.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jdistill.models.config import ModelConfig
from jdistill.models.layers import (
  _attention,
  _chunked_attention,
  _param,
  apply_rope,
  rms_norm,
  rope_attention_factor,
  rope_inv_freq,
  yarn_mscale,
)

# HF builds q_a_layernorm and kv_a_layernorm with their default eps, not `rms_norm_eps`
LATENT_NORM_EPS = 1e-6


def softmax_scale(cfg: ModelConfig) -> float:
  """The `q · k` scale: `qk_head_dim ** -0.5`, with YaRN's `mscale_all_dim` correction."""
  scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
  rope = cfg.rope_dict or {}
  if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
    scale *= yarn_mscale(rope["factor"], rope["mscale_all_dim"]) ** 2
  return scale


def _deinterleave(x: jax.Array) -> jax.Array:
  """`[..., (x0, x1), (x2, x3), ...]` → `[..., x0, x2, ..., x1, x3, ...]`: interleaved RoPE
  pairs in the rotate-half layout (the same dot products as HF's interleaved rotation)."""
  return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


class MLAttention(nnx.Module):
  """Multi-head latent attention; same call contract as `transformer.Attention`."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, pd = cfg.hidden_size, cfg.num_heads, cfg.jnp_param_dtype
    dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    std = 0.02
    self.cfg = cfg
    if cfg.q_lora_rank is None:
      self.q_proj = _param(rngs, (d, h, dn + dr), ("embed", "heads", "head_dim"), pd, std)
    else:
      q = cfg.q_lora_rank
      self.q_a_proj = _param(rngs, (d, q), ("embed", "latent"), pd, std)
      self.q_a_norm = _param(rngs, (q,), ("norm",), pd, ones=True)
      self.q_b_proj = _param(rngs, (q, h, dn + dr), ("latent", "heads", "head_dim"), pd, std)
    self.kv_a_proj = _param(rngs, (d, r + dr), ("embed", "latent"), pd, std)
    self.kv_a_norm = _param(rngs, (r,), ("norm",), pd, ones=True)
    # per head: [W_UK (qk_nope_head_dim) | W_UV (v_head_dim)]
    self.kv_b_proj = _param(rngs, (r, h, dn + dv), ("latent", "heads", "head_dim"), pd, std)
    self.o_proj = _param(rngs, (h, dv, d), ("heads", "head_dim", "embed"), pd, std)

  def __call__(self, x, positions, kv_mask, layer_cache, cache_index):
    """x `[B, T, hidden]` → (`[B, T, hidden]`, the layer cache with the T new slots written
    (None without a cache)). kv_mask `[B, S]` or `[B, T, S]`."""
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    dn, dr, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank is None:
      q = jnp.einsum("btd,dhk->bthk", x, self.q_proj[...].astype(dt))
    else:
      q_lat = rms_norm(x @ self.q_a_proj[...].astype(dt), self.q_a_norm[...], LATENT_NORM_EPS)
      q = jnp.einsum("btq,qhk->bthk", q_lat, self.q_b_proj[...].astype(dt))
    kv = x @ self.kv_a_proj[...].astype(dt)  # [B, T, kv_lora_rank + qk_rope_head_dim]
    # names for remat_policy="save_qkv_proj"
    q, kv = checkpoint_name(q, "q_proj"), checkpoint_name(kv, "k_proj")
    latent = rms_norm(kv[..., :r], self.kv_a_norm[...], LATENT_NORM_EPS)[:, :, None]
    q_nope, q_rope, k_rope = q[..., :dn], q[..., dn:], kv[..., r:][:, :, None]
    if cfg.rope_interleave:
      q_rope, k_rope = _deinterleave(q_rope), _deinterleave(k_rope)
    inv_freq, factor = rope_inv_freq(cfg), rope_attention_factor(cfg)
    q_rope = apply_rope(q_rope, positions, inv_freq, factor)
    k_rope = apply_rope(k_rope, positions, inv_freq, factor)  # [B, T, 1, qk_rope_head_dim]

    kv_b = self.kv_b_proj[...].astype(dt)
    w_uk, w_uv = kv_b[..., :dn], kv_b[..., dn:]  # [r, H, dn], [r, H, dv]
    t = x.shape[1]
    f32 = jnp.float32
    key_mask = kv_mask[:, None, :] if kv_mask.ndim == 2 else kv_mask  # [B, 1 or T, S]
    o_proj = self.o_proj[...].astype(dt)
    if layer_cache is None:  # expanded: per-head keys `[nope | rope]` and values, as GQA's
      k_nope = jnp.einsum("bsr,rhk->bshk", latent[:, :, 0], w_uk)
      k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (*k_nope.shape[:3], dr))], -1)
      v = jnp.einsum("bsr,rhk->bshk", latent[:, :, 0], w_uv)
      q = jnp.concatenate([q_nope, q_rope], axis=-1)[:, :, :, None]  # one query per "kv head"
      chunk = cfg.attention_chunk
      if chunk and t > chunk:
        out = _chunked_attention(q, k, v, key_mask, chunk, softmax_scale(cfg))
      else:
        out = _attention(q, k, v, key_mask, jnp.arange(t), softmax_scale(cfg))
      return jnp.einsum("bthk,hkd->btd", out[:, :, :, 0], o_proj), None
    # absorbed: attention against the cached latent
    zero = jnp.zeros((), jnp.int32)
    idx = (zero, jnp.asarray(cache_index, jnp.int32), zero, zero)
    new_cache = {
      "latent": jax.lax.dynamic_update_slice(
        layer_cache["latent"], latent.astype(layer_cache["latent"].dtype), idx
      ),
      "k_rope": jax.lax.dynamic_update_slice(
        layer_cache["k_rope"], k_rope.astype(layer_cache["k_rope"].dtype), idx
      ),
    }
    latent, k_rope = new_cache["latent"].astype(dt), new_cache["k_rope"].astype(dt)
    slots = cache_index + jnp.arange(t)
    q_absorbed = jnp.einsum("bthk,rhk->bthr", q_nope, w_uk)
    scores = jnp.einsum("bthr,bsr->bhts", q_absorbed, latent[:, :, 0], preferred_element_type=f32)
    scores += jnp.einsum("bthk,bsk->bhts", q_rope, k_rope[:, :, 0], preferred_element_type=f32)
    scores = scores * softmax_scale(cfg)
    causal = jnp.arange(scores.shape[-1])[None, :] <= slots[:, None]  # [T, S]
    mask = causal[None] & key_mask.astype(bool)  # [B, T, S]
    scores = jnp.where(mask[:, None], scores, jnp.finfo(f32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out_latent = jnp.einsum("bhts,bsr->bthr", probs, latent[:, :, 0])
    out = jnp.einsum("bthr,rhk->bthk", out_latent, w_uv)
    return jnp.einsum("bthk,hkd->btd", out, o_proj), new_cache


def cache_shapes(cfg: ModelConfig, batch: int, cache_len: int) -> dict[str, tuple[int, ...]]:
  """One layer's cache: the latent and the RoPE key, each with one shared head."""
  return {
    "latent": (batch, cache_len, 1, cfg.kv_lora_rank),
    "k_rope": (batch, cache_len, 1, cfg.qk_rope_head_dim),
  }

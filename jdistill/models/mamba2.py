"""Nemotron-H's Mamba-2 mixer: in_proj → causal depthwise conv → SSD scan → gated RMSNorm →
out_proj (HF's `NemotronHMamba2Mixer`, its torch path).

Sizes: `H = mamba_num_heads` heads of `P = mamba_head_dim` (inner width `I = H * P`), `G =
mamba_n_groups` groups of B and C, each `N = ssm_state_size` wide (head h reads group
`h // (H / G)`), `C = I + 2 * G * N` conv channels (x, B, C), a conv of `K = conv_kernel` taps.
`in_proj` gives `[z (I) | x, B, C (C) | dt (H)]`.

The state space model per head h, with `a_t = exp(dt_t * A_h)` (`A_h = -exp(A_log_h)`,
`dt_t = clamp(softplus(dt_raw + dt_bias))`):
`state_t = a_t * state_{t-1} + dt_t * x_t ⊗ B_t` (`[P, N]`), `y_t = state_t · C_t + D_h * x_t`.
Without a cache and in multi-token calls it runs as the chunked SSD (`ssd_chunked`: quadratic
attention-like within chunks of `mamba_chunk_size`, the recurrence between chunks); a one-token
call with a cache runs the recurrence itself (`ssd_step`).

Cache per Mamba layer: `{"conv": [B, K - 1, C], "ssm": [B, H, P, N]}`: the last `K - 1` conv
inputs and the SSM state after every token so far (the SSM state stays float32, HF's
`mamba_ssm_cache_dtype`). A call at `cache_index == 0` starts a sequence: it ignores the
states the cache holds (a continuous-batching slot refilled with a new prompt).

Padding: as HF, the mixer's input and its conv output are zeroed on padding tokens (`mask`).
With left padding and no in_proj bias (Nemotron-H has none) a pad token then feeds zeros to the
conv, exactly what the zero state of a sequence start holds, and adds nothing to the SSM
state (its x and B are 0; the decay of a zero state is zero), so a left-padded row computes
what the unpadded row does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.config import ModelConfig
from jdistill.models.layers import _param


def causal_conv(
  x: jax.Array, state: jax.Array, weight: jax.Array, bias: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
  """Depthwise causal conv of `[B, T, C]` after the `[B, K - 1, C]` inputs in `state`.

  weight `[K, C]` (tap k reads input `t - (K - 1) + k`), bias `[C]` or None. Returns the conv
  output `[B, T, C]` (no activation) and the new state: the last `K - 1` inputs."""
  k = weight.shape[0]
  t = x.shape[1]
  full = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, K - 1 + T, C]
  out = sum(full[:, i : i + t] * weight[i] for i in range(k))
  if bias is not None:
    out = out + bias
  return out, full[:, t:]


def _segsum(x: jax.Array) -> jax.Array:
  """`[..., L]` → `[..., L, L]` with `[i, j] = sum(x[j + 1 : i + 1])` for `i >= j`, else -inf
  (as HF's `segment_sum`: masked cumulative sums, not differences of one cumsum)."""
  n = x.shape[-1]
  rep = jnp.broadcast_to(x[..., :, None], (*x.shape, n))  # [i, j] = x[i]
  strict = jnp.tril(jnp.ones((n, n), bool), -1)
  seg = jnp.cumsum(jnp.where(strict, rep, 0.0), axis=-2)
  return jnp.where(jnp.tril(jnp.ones((n, n), bool)), seg, -jnp.inf)


def _heads(bc: jax.Array, heads: int) -> jax.Array:
  """`[..., G, N]` → `[..., H, N]`: each group's B or C repeated for its `H / G` heads."""
  return jnp.repeat(bc, heads // bc.shape[-2], axis=-2)


def ssd_chunked(
  x: jax.Array,
  dt: jax.Array,
  a: jax.Array,
  b: jax.Array,
  c: jax.Array,
  chunk: int,
  initial_state: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """The SSD scan in chunks of `chunk` tokens (float32; without the `D` skip).

  Args:
    x: `[B, T, H, P]`; dt: `[B, T, H]` (after softplus and clamp); a: `[H]` (negative);
    b, c: `[B, T, G, N]`; initial_state: `[B, H, P, N]`.
  Returns:
    y `[B, T, H, P]` and the state after the last token `[B, H, P, N]`. The last chunk is
    padded with `dt = 0` tokens, which leave the state as it is.
  """
  f32 = jnp.float32
  bsz, t, h, p = x.shape
  pad = -t % chunk
  n_chunks = (t + pad) // chunk

  def chunks(z):  # [B, T, ...] → [B, n_chunks, chunk, ...]
    z = jnp.pad(z.astype(f32), [(0, 0), (0, pad)] + [(0, 0)] * (z.ndim - 2))
    return z.reshape(bsz, n_chunks, chunk, *z.shape[2:])

  xdt = chunks(x * dt[..., None])  # [B, c, l, H, P]
  adt = chunks(dt * a)  # [B, c, l, H]
  b, c = chunks(_heads(b, h)), chunks(_heads(c, h))  # [B, c, l, H, N]
  adt = jnp.moveaxis(adt, -1, 1)  # [B, H, c, l]
  a_cum = jnp.cumsum(adt, axis=-1)

  # within each chunk: attention-like scores C_l · B_s, decayed from s to l
  decay = jnp.exp(_segsum(adt))  # [B, H, c, l, s]
  scores = jnp.einsum("bclhn,bcshn->bhcls", c, b) * decay
  y_diag = jnp.einsum("bhcls,bcshp->bclhp", scores, xdt)

  # each chunk's own contribution to the state at its end
  to_end = jnp.exp(a_cum[..., -1:] - a_cum)  # [B, H, c, l]
  states = jnp.einsum("bclhn,bhcl,bclhp->bchpn", b, to_end, xdt)
  # the recurrence between chunks: the state entering each chunk, and the final one
  states = jnp.concatenate([initial_state.astype(f32)[:, None], states], axis=1)
  chunk_decay = jnp.exp(_segsum(jnp.pad(a_cum[..., -1], [(0, 0), (0, 0), (1, 0)])))
  states = jnp.einsum("bhzs,bshpn->bzhpn", chunk_decay, states)  # [B, c + 1, H, P, N]
  entering, final = states[:, :-1], states[:, -1]

  # the entering state's part of each output, decayed to the token
  y_off = jnp.einsum("bclhn,bchpn,bhcl->bclhp", c, entering, jnp.exp(a_cum))
  y = (y_diag + y_off).reshape(bsz, n_chunks * chunk, h, p)[:, :t]
  return y, final


def ssd_step(
  state: jax.Array, x: jax.Array, dt: jax.Array, a: jax.Array, b: jax.Array, c: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """One token of the recurrence (float32; without the `D` skip).

  state `[B, H, P, N]`; x `[B, H, P]`; dt `[B, H]`; a `[H]`; b, c `[B, G, N]` →
  (y `[B, H, P]`, the new state)."""
  f32 = jnp.float32
  h = x.shape[1]
  dt = dt.astype(f32)
  b, c = _heads(b.astype(f32), h), _heads(c.astype(f32), h)  # [B, H, N]
  decay = jnp.exp(dt * a)[..., None, None]
  state = state.astype(f32) * decay + (dt[..., None] * x.astype(f32))[..., None] * b[:, :, None]
  return jnp.einsum("bhpn,bhn->bhp", state, c), state


def gated_rms_norm(y: jax.Array, z: jax.Array, weight: jax.Array, groups: int, eps: float):
  """`y * silu(z)` RMS-normalised per group of `I / groups` channels (float32), times weight.

  y, z `[..., I]`; weight `[I]`. Returns float32 `[..., I]`."""
  f32 = jnp.float32
  h = y.astype(f32) * jax.nn.silu(z.astype(f32))
  g = h.reshape(*h.shape[:-1], groups, -1)
  g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + eps)
  return weight.astype(f32) * g.reshape(h.shape)


class Mamba2(nnx.Module):
  """The Mamba-2 mixer of one `M` layer (see the module docstring for sizes and the cache)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, pd = cfg.hidden_size, cfg.mamba_num_heads, cfg.jnp_param_dtype
    inner = h * cfg.mamba_head_dim
    conv = inner + 2 * cfg.mamba_n_groups * cfg.ssm_state_size
    std = 0.02
    self.cfg = cfg
    self.in_proj = _param(rngs, (d, inner + conv + h), ("embed", None), pd, std)
    self.conv_weight = _param(rngs, (cfg.conv_kernel, conv), (None, None), pd, 0.2)
    if cfg.use_conv_bias:
      self.conv_bias = _param(rngs, (conv,), (None,), pd)
    self.dt_bias = _param(rngs, (h,), (None,), pd, ones=True)
    self.A_log = nnx.Param(jnp.log(jnp.arange(1, h + 1, dtype=jnp.float32)).astype(pd),
                           logical_axes=(None,))  # fmt: skip
    self.D = _param(rngs, (h,), (None,), pd, ones=True)
    self.norm = _param(rngs, (inner,), ("norm",), pd, ones=True)
    self.out_proj = _param(rngs, (inner, d), (None, "embed"), pd, std)

  def __call__(self, x, mask, layer_cache, cache_index):
    """x `[B, T, hidden]`, mask `[B, T]` (False on padding) or None → (`[B, T, hidden]`, the
    layer cache after these tokens, None without a cache)."""
    cfg, dt_ = self.cfg, self.cfg.jnp_dtype
    h, p, g, n = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.mamba_n_groups, cfg.ssm_state_size
    inner, bsz, t = h * p, x.shape[0], x.shape[1]
    keep = None if mask is None else mask[..., None].astype(dt_)
    if keep is not None:
      x = x * keep
    proj = x @ self.in_proj[...].astype(dt_)
    z, xbc, dt = proj[..., :inner], proj[..., inner:-h], proj[..., -h:]

    conv_dim = xbc.shape[-1]
    if layer_cache is None:
      conv_state = jnp.zeros((bsz, cfg.conv_kernel - 1, conv_dim), dt_)
      ssm_state = jnp.zeros((bsz, h, p, n), jnp.float32)
    else:  # cache_index 0 starts a sequence: the held states are another row's
      fresh = jnp.asarray(cache_index) == 0
      conv_state = jnp.where(fresh, 0, layer_cache["conv"]).astype(dt_)
      ssm_state = jnp.where(fresh, 0, layer_cache["ssm"]).astype(jnp.float32)
    bias = self.conv_bias[...].astype(dt_) if cfg.use_conv_bias else None
    xbc, conv_state = causal_conv(xbc, conv_state, self.conv_weight[...].astype(dt_), bias)
    xbc = jax.nn.silu(xbc)
    if keep is not None:
      xbc = xbc * keep
    xs = xbc[..., :inner].reshape(bsz, t, h, p)
    b = xbc[..., inner : inner + g * n].reshape(bsz, t, g, n)
    c = xbc[..., inner + g * n :].reshape(bsz, t, g, n)

    f32 = jnp.float32
    dt = jax.nn.softplus(dt.astype(f32) + self.dt_bias[...].astype(f32))
    dt = jnp.clip(dt, *cfg.time_step_limit)
    a = -jnp.exp(self.A_log[...].astype(f32))
    if layer_cache is not None and t == 1:
      y, ssm_state = ssd_step(ssm_state, xs[:, 0], dt[:, 0], a, b[:, 0], c[:, 0])
      y = y[:, None]
    else:
      y, ssm_state = ssd_chunked(xs, dt, a, b, c, cfg.mamba_chunk_size, ssm_state)
    y = y + self.D[...].astype(f32)[:, None] * xs.astype(f32)
    y = gated_rms_norm(y.reshape(bsz, t, inner), z, self.norm[...], g, cfg.rms_norm_eps)
    out = y.astype(dt_) @ self.out_proj[...].astype(dt_)
    if layer_cache is None:
      return out, None
    new_cache = {
      "conv": conv_state.astype(layer_cache["conv"].dtype),
      "ssm": ssm_state.astype(layer_cache["ssm"].dtype),
    }
    return out, new_cache


def cache_shapes(cfg: ModelConfig, batch: int) -> dict[str, tuple[int, ...]]:
  """One Mamba layer's cache: the conv inputs `[B, K - 1, C]` and the SSM state
  `[B, H, P, N]` (independent of the cache length)."""
  conv = cfg.mamba_num_heads * cfg.mamba_head_dim + 2 * cfg.mamba_n_groups * cfg.ssm_state_size
  return {
    "conv": (batch, cfg.conv_kernel - 1, conv),
    "ssm": (batch, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size),
  }

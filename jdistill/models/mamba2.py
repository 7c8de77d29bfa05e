"""Nemotron-H's Mamba-2 mixer: in_proj → causal depthwise conv → SSD scan → gated RMSNorm →
out_proj (HF's `NemotronHMamba2Mixer`, its torch path).

Sizes: `H = mamba_num_heads` heads of `P = mamba_head_dim` (inner width `I = H * P`), `G =
mamba_n_groups` groups of B and C, each `N = ssm_state_size` wide (head h reads group
`h // (H / G)`), `C = I + 2 * G * N` conv channels (x, B, C), a conv of `K = conv_kernel` taps.
HF's fused `in_proj` gives `[z (I) | x, B, C (C) | dt (H)]`; `Mamba2` holds it (and the conv)
by role.

The state space model per head h, with `a_t = exp(dt_t * A_h)` (`A_h = -exp(A_log_h)`,
`dt_t = clamp(softplus(dt_raw + dt_bias))`):
`state_t = a_t * state_{t-1} + dt_t * x_t ⊗ B_t` (`[P, N]`), `y_t = state_t · C_t + D_h * x_t`.
Without a cache and in multi-token calls it runs as the chunked SSD (`ssd_chunked`: quadratic
attention-like within chunks of `mamba_chunk_size`, the recurrence between chunks); a one-token
call with a cache runs the recurrence itself (`ssd_step`).

Cache per Mamba layer: `{"conv_x": [B, K - 1, H, P], "conv_bc": [B, K - 1, 2, G, N], "ssm":
[B, H, P, N]}`: the last `K - 1` conv inputs (x; B and C) and the SSM state after every token
so far (the SSM state stays float32, HF's `mamba_ssm_cache_dtype`). A call at
`cache_index == 0` starts a sequence: it ignores the states the cache holds (a
continuous-batching slot refilled with a new prompt).

Sharding: the per-head weights, the x conv inputs and the SSM state have a `heads` axis
(`tensor`); B and C, shared by a group's heads, are replicated.

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
  """The Mamba-2 mixer of one `M` layer (see the module docstring for sizes and the cache).

  HF's fused `in_proj` and conv are held by role, so every per-head weight has a `heads` axis
  (sharded over `tensor`; B and C, shared by a group's heads, are replicated): `z_proj`,
  `x_proj` `[hidden, H, P]`, `bc_proj` `[hidden, 2, G, N]` (B then C), `dt_proj` `[hidden, H]`;
  the depthwise conv `conv_x` `[K, H, P]`, `conv_bc` `[K, 2, G, N]` (and their biases);
  `dt_bias`, `A_log`, `D` `[H]`; the gated norm `norm` `[H, P]`; `out_proj` `[H, P, hidden]`.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, p, pd = cfg.hidden_size, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.jnp_param_dtype
    g, n, k = cfg.mamba_n_groups, cfg.ssm_state_size, cfg.conv_kernel
    std = 0.02
    self.cfg = cfg
    self.z_proj = _param(rngs, (d, h, p), ("embed", "heads", "head_dim"), pd, std)
    self.x_proj = _param(rngs, (d, h, p), ("embed", "heads", "head_dim"), pd, std)
    self.bc_proj = _param(rngs, (d, 2, g, n), ("embed", None, None, None), pd, std)
    self.dt_proj = _param(rngs, (d, h), ("embed", "heads"), pd, std)
    self.conv_x = _param(rngs, (k, h, p), (None, "heads", "head_dim"), pd, 0.2)
    self.conv_bc = _param(rngs, (k, 2, g, n), (None, None, None, None), pd, 0.2)
    if cfg.use_conv_bias:
      self.conv_x_bias = _param(rngs, (h, p), ("heads", "head_dim"), pd)
      self.conv_bc_bias = _param(rngs, (2, g, n), (None, None, None), pd)
    self.dt_bias = _param(rngs, (h,), ("heads",), pd, ones=True)
    a_log = jnp.log(jnp.arange(1, h + 1, dtype=jnp.float32)).astype(pd)
    self.A_log = nnx.Param(a_log, logical_axes=("heads",))
    self.D = _param(rngs, (h,), ("heads",), pd, ones=True)
    self.norm = _param(rngs, (h, p), ("heads", "head_dim"), pd, ones=True)
    self.out_proj = _param(rngs, (h, p, d), ("heads", "head_dim", "embed"), pd, std)

  def __call__(self, x, mask, layer_cache, cache_index):
    """x `[B, T, hidden]`, mask `[B, T]` (False on padding) or None → (`[B, T, hidden]`, the
    layer cache after these tokens, None without a cache)."""
    cfg, dt_, f32 = self.cfg, self.cfg.jnp_dtype, jnp.float32
    h, p, g, n = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.mamba_n_groups, cfg.ssm_state_size
    bsz, t = x.shape[:2]
    keep = None if mask is None else mask[..., None].astype(dt_)
    if keep is not None:
      x = x * keep
    w = lambda param: param[...].astype(dt_)  # noqa: E731
    z = jnp.einsum("btd,dhp->bthp", x, w(self.z_proj))
    xs = jnp.einsum("btd,dhp->bthp", x, w(self.x_proj)).reshape(bsz, t, h * p)
    bc = jnp.einsum("btd,dsgn->btsgn", x, w(self.bc_proj)).reshape(bsz, t, 2 * g * n)
    dt = jnp.einsum("btd,dh->bth", x, w(self.dt_proj))

    states = {
      "conv_x": jnp.zeros((bsz, cfg.conv_kernel - 1, h * p), dt_),
      "conv_bc": jnp.zeros((bsz, cfg.conv_kernel - 1, 2 * g * n), dt_),
      "ssm": jnp.zeros((bsz, h, p, n), f32),
    }
    if layer_cache is not None:  # cache_index 0 starts a sequence: the held states are stale
      fresh = jnp.asarray(cache_index) == 0
      states = {
        name: jnp.where(fresh, 0, layer_cache[name].reshape(states[name].shape)).astype(a.dtype)
        for name, a in states.items()
      }
    conv = {}
    for name, inp, weight, bias in (
      ("conv_x", xs, self.conv_x, "conv_x_bias"),
      ("conv_bc", bc, self.conv_bc, "conv_bc_bias"),
    ):
      b_ = getattr(self, bias)[...].astype(dt_).reshape(-1) if cfg.use_conv_bias else None
      out, conv[name] = causal_conv(inp, states[name], w(weight).reshape(cfg.conv_kernel, -1), b_)
      out = jax.nn.silu(out)
      conv[name + "_out"] = out if keep is None else out * keep
    xs = conv["conv_x_out"].reshape(bsz, t, h, p)
    b, c = jnp.moveaxis(conv["conv_bc_out"].reshape(bsz, t, 2, g, n), 2, 0)

    dt = jax.nn.softplus(dt.astype(f32) + self.dt_bias[...].astype(f32))
    dt = jnp.clip(dt, *cfg.time_step_limit)
    a = -jnp.exp(self.A_log[...].astype(f32))
    if layer_cache is not None and t == 1:
      y, ssm_state = ssd_step(states["ssm"], xs[:, 0], dt[:, 0], a, b[:, 0], c[:, 0])
      y = y[:, None]
    else:
      y, ssm_state = ssd_chunked(xs, dt, a, b, c, cfg.mamba_chunk_size, states["ssm"])
    y = y + self.D[...].astype(f32)[:, None] * xs.astype(f32)
    norm = self.norm[...].reshape(h * p)
    y = gated_rms_norm(
      y.reshape(bsz, t, h * p), z.reshape(bsz, t, h * p), norm, g, cfg.rms_norm_eps
    )
    out = jnp.einsum("bthp,hpd->btd", y.reshape(bsz, t, h, p).astype(dt_), w(self.out_proj))
    if layer_cache is None:
      return out, None
    new_cache = {
      "conv_x": conv["conv_x"].reshape(layer_cache["conv_x"].shape),
      "conv_bc": conv["conv_bc"].reshape(layer_cache["conv_bc"].shape),
      "ssm": ssm_state,
    }
    return out, {name: a.astype(layer_cache[name].dtype) for name, a in new_cache.items()}


def cache_shapes(cfg: ModelConfig, batch: int) -> dict[str, tuple[int, ...]]:
  """One Mamba layer's cache (independent of the cache length): the last `K - 1` conv inputs
  of x `[B, K - 1, H, P]` and of B, C `[B, K - 1, 2, G, N]`, and the SSM state
  `[B, H, P, N]`."""
  h, p, g, n = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.mamba_n_groups, cfg.ssm_state_size
  return {
    "conv_x": (batch, cfg.conv_kernel - 1, h, p),
    "conv_bc": (batch, cfg.conv_kernel - 1, 2, g, n),
    "ssm": (batch, h, p, n),
  }

"""Decoder-only transformer in Flax NNX covering Llama 3, Qwen2 and Qwen3 (and their MoE
variants, whose sparse layers use `jdistill.models.moe.MoE` in place of the MLP),
DeepSeek-V3 (its attention is `jdistill.models.mla.MLAttention`), Gemma 3's text model
(`GemmaBlock`; its sliding-window layers' cache is `jdistill.models.sliding_cache`'s ring) and
Nemotron-H (`HybridBlock`s of one mixer each: Mamba-2 (`jdistill.models.mamba2`), attention,
MLP or MoE).

Every weight is an `nnx.Param` whose `logical_axes` metadata names its
dimensions; `jdistill.runtime.sharding` maps those names to mesh axes.

The forward returns final (post-norm) hidden states `[batch, seq, hidden]`;
`logits` / `unembedding` turn them into vocabulary scores, so loss kernels can
compute logits chunk by chunk instead of holding `[batch, seq, vocab]`.

KV cache (MLA's latent one: `jdistill.models.mla`): a tuple with one `{"k", "v"}` dict per
layer, each `[batch, cache_len, kv_heads, head_dim]`; with `cfg.scan_layers` one `{"k", "v"}`
dict of stacked `[layers, batch, cache_len, kv_heads, head_dim]` arrays (`init_cache` makes
the layout of a config; a Gemma 3 sliding layer's `[batch, min(sliding_window, cache_len),
kv_heads, head_dim]` ring). A call with a cache writes its `seq` new keys/values at
slots `[cache_index, cache_index + seq)` and attends over all `cache_len` slots
where `kv_mask` is true and the slot is not in the future of the query.

Scanned layers (`cfg.scan_layers`): `ScannedBlocks` holds one block whose every parameter
has a leading `layers` axis (logical name `layers`, never sharded) and runs it under
`jax.lax.scan`; `stack_layers` / `unstack_layers` convert a model state between the two
layouts (HF import/export, checkpoints, tests).

Nemotron-H's cache: one dict per layer by its kind: `{"k", "v"}` for attention, Mamba-2's
`{"conv_x", "conv_bc", "ssm"}` (`jdistill.models.mamba2`), `{}` for MLP and MoE layers.
Scanned layers of several kinds (Nemotron-H's, or dense and sparse blocks: `cfg.scanned_runs`)
are `jdistill.models.layer_runs.repeat_runs`' runs, each a `ScannedBlocks` of a `LayerUnit`,
and their cache is one tuple per run of its unit layers' dicts, every array with a leading
`[count]` axis (`init_cache`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jdistill.models.config import ModelConfig
from jdistill.models.layer_runs import (
  repeat_runs,
  unit_layer_index,
  unit_layer_name,
  unrolled_layers,
)
from jdistill.models.layers import (
  _attention,
  _chunked_attention,
  _param,
  apply_rope,
  gemma_rms_norm,
  rms_norm,
  rope_attention_factor,
  rope_inv_freq,
)
from jdistill.models.mamba2 import Mamba2
from jdistill.models.mamba2 import cache_shapes as mamba_cache_shapes
from jdistill.models.mla import MLAttention
from jdistill.models.mla import cache_shapes as mla_cache_shapes
from jdistill.models.moe import MoE
from jdistill.models.sliding_cache import ring_attend, ring_len

Cache = tuple[dict[str, jax.Array], ...] | dict[str, jax.Array]
# Mamba-2's cache entries: whole states, rewritten by every call (K/V: one slot per token)
STATE_NAMES = ("conv_x", "conv_bc", "ssm")


class Attention(nnx.Module):
  """Grouped-query attention with optional q/k/v biases (Qwen2) and q/k RMSNorm (Qwen3);
  under `cfg.gemma` Gemma's `1 + w` q/k norms, `query_pre_attn_scalar`'s scale and, when
  `sliding`, a `sliding_window` of keys with local RoPE and a ring-buffer cache; without RoPE
  under `not cfg.rope` (Nemotron-H)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, sliding: bool = False):
    d, h, kv, hd, pd = (
      cfg.hidden_size,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.head_dim,
      cfg.jnp_param_dtype,
    )
    std = 0.02
    self.cfg = cfg
    self.sliding = sliding
    self.q_proj = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pd, std)
    self.k_proj = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd, std)
    self.v_proj = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd, std)
    self.o_proj = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pd, std)
    if cfg.qkv_bias:
      self.q_bias = _param(rngs, (h, hd), ("heads", "head_dim"), pd)
      self.k_bias = _param(rngs, (kv, hd), ("kv_heads", "head_dim"), pd)
      self.v_bias = _param(rngs, (kv, hd), ("kv_heads", "head_dim"), pd)
    if cfg.qk_norm:  # Gemma's scale by 1 + w: zeros are its identity
      self.q_norm = _param(rngs, (hd,), ("norm",), pd, ones=not cfg.gemma)
      self.k_norm = _param(rngs, (hd,), ("norm",), pd, ones=not cfg.gemma)

  def __call__(self, x, positions, kv_mask, layer_cache, cache_index):
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    q = jnp.einsum("btd,dhk->bthk", x, self.q_proj[...].astype(dt))
    k = jnp.einsum("btd,dhk->bthk", x, self.k_proj[...].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", x, self.v_proj[...].astype(dt))
    if cfg.qkv_bias:
      q = q + self.q_bias[...].astype(dt)
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    # names for remat_policy="save_qkv_proj"
    q, k, v = (checkpoint_name(a, n) for a, n in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj")))
    if cfg.qk_norm:
      norm = gemma_rms_norm if cfg.gemma else rms_norm
      q = norm(q, self.q_norm[...], cfg.rms_norm_eps)
      k = norm(k, self.k_norm[...], cfg.rms_norm_eps)
    sliding = self.sliding
    if cfg.rope:
      inv_freq, factor = rope_inv_freq(cfg, sliding), rope_attention_factor(cfg, sliding)
      q = apply_rope(q, positions, inv_freq, factor)
      k = apply_rope(k, positions, inv_freq, factor)

    seq = x.shape[1]
    window = cfg.sliding_window if sliding else None
    scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5
    key_slots = None
    if layer_cache is None:
      start = 0
      new_cache = None
    elif sliding:
      start = cache_index
      k, v, key_slots, kv_mask, new_cache = ring_attend(layer_cache, k, v, kv_mask, cache_index)
    else:
      start = cache_index
      zero = jnp.zeros((), jnp.int32)
      idx = (zero, jnp.asarray(cache_index, jnp.int32), zero, zero)
      k_all = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), idx)
      v_all = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), idx)
      new_cache = {"k": k_all, "v": v_all}
      k, v = k_all.astype(dt), v_all.astype(dt)

    b = k.shape[0]
    groups = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(b, seq, cfg.num_kv_heads, groups, cfg.head_dim)
    key_mask = kv_mask[:, None, :] if kv_mask.ndim == 2 else kv_mask  # [B, 1 or T, S]
    chunk = cfg.attention_chunk
    if chunk and layer_cache is None and seq > chunk:
      out = _chunked_attention(q, k, v, key_mask, chunk, scale, window)
    else:
      out = _attention(q, k, v, key_mask, start + jnp.arange(seq), scale, window, key_slots)
    out = out.reshape(b, seq, cfg.num_heads, cfg.head_dim)
    return jnp.einsum("bthk,hkd->btd", out, self.o_proj[...].astype(dt)), new_cache


class MLP(nnx.Module):
  """Feed-forward: SwiGLU, GELU-tanh gated under `cfg.gemma`; Nemotron-H's (`cfg.hybrid`) is
  ungated, `relu(x @ up)² @ down`."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.jnp_param_dtype
    self.dtype = cfg.jnp_dtype
    self.gated = not cfg.hybrid
    self.gelu = cfg.gemma
    if self.gated:
      self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), pd, 0.02)
    self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), pd, 0.02)
    self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), pd, 0.02)

  def __call__(self, x):
    dt = self.dtype
    up = x @ self.up_proj[...].astype(dt)
    if not self.gated:
      return jnp.square(jax.nn.relu(up)) @ self.down_proj[...].astype(dt)
    gate = x @ self.gate_proj[...].astype(dt)
    gate = jax.nn.gelu(gate, approximate=True) if self.gelu else jax.nn.silu(gate)
    return (gate * up) @ self.down_proj[...].astype(dt)


class Block(nnx.Module):
  """Pre-norm residual block: attention (latent attention under `cfg.mla`) then MLP (or a
  mixture of experts when `moe`)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, moe: bool = False):
    pd = cfg.jnp_param_dtype
    self.eps = cfg.rms_norm_eps
    self.input_norm = _param(rngs, (cfg.hidden_size,), ("norm",), pd, ones=True)
    self.attn = MLAttention(cfg, rngs) if cfg.mla else Attention(cfg, rngs)
    self.post_attn_norm = _param(rngs, (cfg.hidden_size,), ("norm",), pd, ones=True)
    self.mlp = MoE(cfg, rngs) if moe else MLP(cfg, rngs)

  def __call__(self, x, positions, kv_mask, layer_cache, cache_index):
    attn_out, new_cache = self.attn(
      rms_norm(x, self.input_norm[...], self.eps), positions, kv_mask, layer_cache, cache_index
    )
    x = x + attn_out
    x = x + self.mlp(rms_norm(x, self.post_attn_norm[...], self.eps))
    return x, new_cache


class GemmaBlock(nnx.Module):
  """Gemma 3's block: input norm, attention (sliding-window when `sliding`), post-attention
  norm, residual; pre-feedforward norm, MLP, post-feedforward norm, residual. Every norm is
  Gemma's `1 + w` RMSNorm."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, sliding: bool):
    pd, d = cfg.jnp_param_dtype, cfg.hidden_size
    self.eps = cfg.rms_norm_eps
    self.input_norm = _param(rngs, (d,), ("norm",), pd)  # zeros: `1 + w` is the identity
    self.attn = Attention(cfg, rngs, sliding=sliding)
    self.post_attn_norm = _param(rngs, (d,), ("norm",), pd)
    self.pre_mlp_norm = _param(rngs, (d,), ("norm",), pd)
    self.mlp = MLP(cfg, rngs)
    self.post_mlp_norm = _param(rngs, (d,), ("norm",), pd)

  def __call__(self, x, positions, kv_mask, layer_cache, cache_index):
    norm = lambda h, w: gemma_rms_norm(h, w[...], self.eps)  # noqa: E731
    attn_out, new_cache = self.attn(
      norm(x, self.input_norm), positions, kv_mask, layer_cache, cache_index
    )
    x = x + norm(attn_out, self.post_attn_norm)
    x = x + norm(self.mlp(norm(x, self.pre_mlp_norm)), self.post_mlp_norm)
    return x, new_cache


class HybridBlock(nnx.Module):
  """Nemotron-H's layer: `x + mixer(rms_norm(x))`, the mixer of `kind` (a `layer_pattern`
  character): `M` Mamba-2, `*` attention (no RoPE), `-` MLP, `E` MoE. Same call contract as
  `Block`; the Mamba mixer reads its tokens' padding mask from `kv_mask` (`[B, T]` without a
  cache, the `T` slots from `cache_index` of `[B, cache_len]` with one)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, kind: str):
    self.kind = kind
    self.eps = cfg.rms_norm_eps
    self.norm = _param(rngs, (cfg.hidden_size,), ("norm",), cfg.jnp_param_dtype, ones=True)
    mixers = {"M": Mamba2, "*": Attention, "-": MLP, "E": MoE}
    self.mixer = mixers[kind](cfg, rngs)

  def __call__(self, x, positions, kv_mask, layer_cache, cache_index):
    h = rms_norm(x, self.norm[...], self.eps)
    if self.kind == "*":
      out, layer_cache = self.mixer(h, positions, kv_mask, layer_cache, cache_index)
    elif self.kind == "M":
      mask = kv_mask
      if layer_cache is not None:
        mask = jax.lax.dynamic_slice_in_dim(kv_mask, cache_index, x.shape[1], axis=1)
      out, layer_cache = self.mixer(h, mask, layer_cache, cache_index)
    else:
      out = self.mixer(h)
    return x + out, layer_cache


class LayerUnit(nnx.Module):
  """Consecutive layers of the kinds in `unit` (`cfg.layer_kinds` characters: Nemotron-H's
  `HybridBlock`s, or `Block`s dense `-` and sparse `E`), as one block: the unit a scanned run
  repeats (`jdistill.models.layer_runs`), its layer `j` at `layer_<j>`. Its cache is a tuple
  of its layers' dicts."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, unit: str):
    # named attributes, not an nnx.List: nnx.capture adds a `__captures__` key to every
    # module's state, and merging a list's int keys beside it (inside the scan) cannot sort
    self.size = len(unit)
    for j, kind in enumerate(unit):
      block = HybridBlock(cfg, rngs, kind) if cfg.hybrid else Block(cfg, rngs, moe=kind == "E")
      setattr(self, unit_layer_name(j), block)

  def __call__(self, x, positions, kv_mask, unit_cache, cache_index):
    written = []
    for i in range(self.size):
      block = getattr(self, unit_layer_name(i))
      layer_cache = None if unit_cache is None else unit_cache[i]
      x, layer_cache = block(x, positions, kv_mask, layer_cache, cache_index)
      written.append(layer_cache)
    return x, None if unit_cache is None else tuple(written)


def _run_block(block, x, positions, kv_mask, layer_cache, cache_index):
  return block(x, positions, kv_mask, layer_cache, cache_index)


def checkpoint_policy(name: str) -> Callable | None:
  """The `jax.checkpoint` policy of a `ModelConfig.remat_policy` name; None: no remat."""
  policies = jax.checkpoint_policies
  if name == "none":
    return None
  if name == "full":
    return policies.nothing_saveable
  if name == "save_qkv_proj":
    return policies.save_only_these_names("q_proj", "k_proj", "v_proj")
  return getattr(policies, name)  # dots_saveable, dots_with_no_batch_dims_saveable


# --- a stack of identical blocks run under scan ----------------------------------------


class ScannedBlocks(nnx.Module):
  """`num` identical blocks as one: `block`'s params are stacked `[num, ...]`, run by scan.

  `make_block(rngs)` builds one block; blocks are built one after another from the same
  `rngs` and stacked, so the stack holds exactly the weights the unrolled layers would.
  The block's `__call__(x, positions, kv_mask, layer_cache, cache_index)` returns
  `(x, layer_cache)` as `Block` does; its cache may be a dict or a tuple of dicts
  (`LayerUnit`).
  """

  def __init__(self, make_block: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs):
    blocks = [make_block(rngs) for _ in range(num)]
    graphdef, _ = nnx.split(blocks[0])
    self.block = nnx.merge(graphdef, _stack([nnx.state(b) for b in blocks]))

  def __call__(self, x, positions, kv_mask, cache, cache_index, policy):
    """x `[B, T, D]`; cache None or the block's cache stacked (`{"k", "v"}` `[layers, B, S,
    KV, Dh]`; a hybrid unit's tuple of dicts, each array `[layers, ...]`).

    Returns `(x, cache)`; only the `T` new slots of each layer's K/V are written into the
    stack (Mamba states, a few KB a row, are written whole).
    """
    graphdef, params = nnx.split(self.block)

    def layer(params, x, positions, kv_mask, layer_cache, cache_index):
      return nnx.merge(graphdef, params)(x, positions, kv_mask, layer_cache, cache_index)

    if policy is not None:
      layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
    if cache is None and hasattr(self, "__captures__"):
      # Under nnx.capture (the MoE router losses): the blocks merged inside the scan are
      # not the captured graph, so each layer's sown values come out as the scan's outputs
      # and are sown here, stacked `[layers, ...]`.
      def captured(p, x):
        (x, _), sown = nnx.capture(nnx.merge(graphdef, p), nnx.Intermediate)(
          x, positions, kv_mask, None, cache_index
        )
        return x, sown

      if policy is not None:
        captured = jax.checkpoint(captured, policy=policy, prevent_cse=False)
      x, sown = jax.lax.scan(lambda x, p: captured(p, x), x, params)
      for path, leaf in jax.tree_util.tree_leaves_with_path(sown):
        # named by its path in the block ("block/mlp/router_logits"), so that `moe` can
        # tell the router's values apart and find the layer they belong to
        keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        self.sow(nnx.Intermediate, "/".join(["block", *keys]), leaf)
      return x, None
    if cache is None:

      def body(x, p):
        return layer(p, x, positions, kv_mask, None, cache_index)[0], None

      return jax.lax.scan(body, x, params)[0], None

    zero = jnp.zeros((), jnp.int32)
    slot = jnp.asarray(cache_index, jnp.int32)

    def write(path, stacked, written, i, seq):
      if path[-1].key in STATE_NAMES:
        return jax.lax.dynamic_update_index_in_dim(stacked, written.astype(stacked.dtype), i, 0)
      # the new slots only (writing whole layers back would copy the cache every step)
      new = jax.lax.dynamic_slice_in_dim(written, slot, seq, axis=1)
      idx = (i, zero, slot, *[zero] * (stacked.ndim - 3))
      return jax.lax.dynamic_update_slice(stacked, new[None].astype(stacked.dtype), idx)

    def body(carry, xs):
      x, stacked = carry
      p, i = xs
      layer_cache = jax.tree.map(lambda a: a[i], stacked)
      x, written = layer(p, x, positions, kv_mask, layer_cache, cache_index)
      stacked = jax.tree_util.tree_map_with_path(
        lambda path, a, w: write(path, a, w, i, x.shape[1]), stacked, written
      )
      return (x, stacked), None

    num = jax.tree.leaves(params)[0].shape[0]
    (x, cache), _ = jax.lax.scan(body, (x, cache), (params, jnp.arange(num, dtype=jnp.int32)))
    return x, cache


def _relabel(var: nnx.Variable, value, axes):
  """`var` holding `value`, its `logical_axes` (if it has them) changed by `axes(old)`."""
  old = getattr(var, "logical_axes", None)
  return var.replace(value) if old is None else var.replace(value, logical_axes=axes(old))


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _stack(states):
  """Same-structure Variable states → one state of `[len(states), ...]` leaves, `layers`
  prepended to each `logical_axes`."""

  def stack(*vs):
    value = jnp.stack([v.get_value() for v in vs])
    return _relabel(vs[0], value, lambda axes: ("layers", *axes))

  return jax.tree.map(stack, *states, is_leaf=_is_var)


def _unstack(state, num: int) -> list:
  def part(v, i):
    return _relabel(v, v.get_value()[i], lambda axes: tuple(axes[1:]))

  return [jax.tree.map(lambda v, i=i: part(v, i), state, is_leaf=_is_var) for i in range(num)]


def _nested_dicts(tree):
  """Nested States → nested plain dicts around the Variables (what `nnx.split` gives)."""
  if _is_var(tree):
    return tree
  return {k: _nested_dicts(v) for k, v in tree.items()}


def stack_layers(state: nnx.State, cfg: ModelConfig) -> nnx.State:
  """State of an unrolled Transformer → the same weights in the scanned layout
  (`layers.block.*`, each leaf `[layers, ...]`; layers of several kinds at
  `layers.<run>.block.layer_<j>.*`, each leaf `[count, ...]`: `jdistill.models.layer_runs`)."""
  layers = state["layers"]
  if cfg.uniform_layers:
    block = _stack([_nested_dicts(layers[i]) for i in sorted(layers)])
    return nnx.State({**_nested_dicts(state), "layers": {"block": block}})
  runs = repeat_runs(cfg.layer_kinds)
  scanned = {}
  for r, (unit, _) in enumerate(runs):
    scanned[r] = {
      "block": {
        unit_layer_name(j): _stack([_nested_dicts(layers[i]) for i in unrolled_layers(runs, r, j)])
        for j in range(len(unit))
      }
    }
  return nnx.State({**_nested_dicts(state), "layers": scanned})


def unstack_layers(state: nnx.State, cfg: ModelConfig) -> nnx.State:
  """State of a scanned Transformer → the unrolled layout (`layers.<i>.*`)."""
  if cfg.uniform_layers:
    block = _nested_dicts(state["layers"]["block"])
    num = jax.tree.leaves(block)[0].shape[0]
    layers = dict(enumerate(_unstack(block, num)))
    return nnx.State({**_nested_dicts(state), "layers": layers})
  runs = repeat_runs(cfg.layer_kinds)
  layers = {}
  for r, (unit, count) in enumerate(runs):
    for j in range(len(unit)):
      parts = _unstack(_nested_dicts(state["layers"][r]["block"][unit_layer_name(j)]), count)
      layers.update(zip(unrolled_layers(runs, r, j), parts))
  return nnx.State({**_nested_dicts(state), "layers": dict(sorted(layers.items()))})


def stacked_layer_ids(cfg: ModelConfig, key: tuple) -> tuple[list[int], tuple] | None:
  """For a state path `key` (module and variable names) of a scanned model: the unrolled
  layers its leading axis stacks, in order, and the path inside one layer; None for a path
  that stacks no layers (the embedding, a norm, an unrolled model's)."""
  if not cfg.scan_layers or key[:1] != ("layers",):
    return None
  if not cfg.scanned_runs:
    return list(range(cfg.num_layers)), key[2:]  # layers.block.<rest>
  run, j, rest = key[1], unit_layer_index(key[3]), key[4:]  # layers.<run>.block.layer_<j>.<rest>
  return unrolled_layers(repeat_runs(cfg.layer_kinds), run, j), rest


class Transformer(nnx.Module):
  """Decoder-only LM. See the module docstring for the cache layout."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = cfg.jnp_param_dtype
    self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd, 0.02)
    if cfg.gemma:  # never scanned (ModelConfig checks)
      self.layers = nnx.List(
        [GemmaBlock(cfg, rngs, sliding=cfg.is_sliding_layer(i)) for i in range(cfg.num_layers)]
      )
    elif cfg.scanned_runs:  # layers of several kinds: one scan per run of a repeated unit
      self.layers = nnx.List(
        [
          ScannedBlocks(lambda r, u=unit: LayerUnit(cfg, r, u), count, rngs)
          for unit, count in repeat_runs(cfg.layer_kinds)
        ]
      )
    elif cfg.scan_layers:  # all dense or all sparse
      moe = cfg.is_moe_layer(0)
      self.layers = ScannedBlocks(lambda r: Block(cfg, r, moe=moe), cfg.num_layers, rngs)
    elif cfg.hybrid:
      self.layers = nnx.List([HybridBlock(cfg, rngs, kind) for kind in cfg.layer_pattern])
    else:
      self.layers = nnx.List(
        [Block(cfg, rngs, moe=cfg.is_moe_layer(i)) for i in range(cfg.num_layers)]
      )
    self.final_norm = _param(rngs, (cfg.hidden_size,), ("norm",), pd, ones=not cfg.gemma)
    if not cfg.tie_word_embeddings:
      self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd, 0.02)

  def __call__(
    self,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    *,
    kv_mask: jax.Array | None = None,
    cache: Cache | None = None,
    cache_index: jax.Array | int | None = None,
    segment_ids: jax.Array | None = None,
  ) -> tuple[jax.Array, Cache | None]:
    """Final hidden states.

    Args:
      tokens: `[B, T]` int token ids.
      positions: `[B, T]` RoPE positions (default `arange(T)`).
      kv_mask: `[B, T]` (no cache) or `[B, cache_len]` (with cache) bool, which key
        slots may be attended to (padding is False). Default: all True.
      cache: per-layer KV cache, or None for a plain causal forward.
      cache_index: scalar slot where this call's tokens are written.
      segment_ids: `[B, T]` int (no cache only): packed rows, where a token attends only to
        earlier tokens of its own segment (give `positions` restarting per segment too).
    Returns:
      hidden `[B, T, hidden]` (after the final norm, compute dtype) and the updated
      cache (None without a cache).
    """
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    runs_cache = cache is not None and self.cfg.scanned_runs
    if (cache is not None and isinstance(cache, dict) != _dict_cache(self.cfg)) or (
      runs_cache and not all(isinstance(run, tuple) for run in cache)
    ):
      raise ValueError(
        f"Transformer: the cache's layout does not match scan_layers={self.cfg.scan_layers} "
        "(make it with init_cache(model.cfg, ...))"
      )
    if kv_mask is None:
      kv_len = t if cache is None else _cache_len(cache, t)
      kv_mask = jnp.ones((b, kv_len), bool)
    if cache is not None and cache_index is None:
      raise ValueError("Transformer: cache_index is required when a cache is given")
    if segment_ids is not None:
      if "M" in self.cfg.layer_pattern:
        raise ValueError("Transformer: segment_ids (packed rows) are not supported by Mamba layers")
      if cache is not None:
        raise ValueError("Transformer: segment_ids (packed rows) need a call without a cache")
      same = segment_ids[:, :, None] == segment_ids[:, None, :]
      kv_mask = kv_mask.astype(bool)[:, None, :] & same  # [B, T, T]
    x = jnp.take(self.embed[...], tokens, axis=0)
    if self.cfg.gemma:  # HF rounds sqrt(hidden) to the embedding's dtype first
      x = x * jnp.asarray(self.cfg.hidden_size**0.5, x.dtype)
    x = x.astype(self.cfg.jnp_dtype)
    policy = checkpoint_policy(self.cfg.remat_policy)
    if self.cfg.scanned_runs:
      runs = []
      for r, scanned in enumerate(self.layers):
        run_cache = None if cache is None else cache[r]
        x, run_cache = scanned(x, positions, kv_mask, run_cache, cache_index, policy)
        runs.append(run_cache)
      cache = None if cache is None else tuple(runs)
    elif self.cfg.scan_layers:
      x, cache = self.layers(x, positions, kv_mask, cache, cache_index, policy)
    else:
      run = _run_block if policy is None else nnx.remat(_run_block, policy=policy)
      new_cache = []
      for i, block in enumerate(self.layers):
        x, layer_cache = run(
          block, x, positions, kv_mask, None if cache is None else cache[i], cache_index
        )
        new_cache.append(layer_cache)
      cache = None if cache is None else tuple(new_cache)
    norm = gemma_rms_norm if self.cfg.gemma else rms_norm
    x = norm(x, self.final_norm[...], self.cfg.rms_norm_eps)
    return x, cache

  def unembedding(self) -> jax.Array:
    """The `[hidden, vocab]` output matrix (the transposed embedding when tied)."""
    if self.cfg.tie_word_embeddings:
      return self.embed[...].T
    return self.lm_head[...]

  def logits(self, hidden: jax.Array) -> jax.Array:
    """`[B, T, hidden]` → float32 `[B, T, vocab]`. Only for small vocab or short spans."""
    w = self.unembedding().astype(hidden.dtype)
    return jnp.dot(hidden, w, preferred_element_type=jnp.float32)

  def forward_logits(self, tokens, positions=None, kv_mask=None) -> jax.Array:
    hidden, _ = self(tokens, positions, kv_mask=kv_mask)
    return self.logits(hidden)


def _dict_cache(cfg: ModelConfig) -> bool:
  """Whether `init_cache(cfg, ...)` is one dict (scanned uniform layers) or a tuple."""
  return cfg.scan_layers and not cfg.scanned_runs


def _cache_len(cache: Cache, default: int) -> int:
  """The slots of the cache's longest attention layer (a Gemma 3 sliding layer's ring is
  shorter than the cache; `default` if it has none: Mamba-only)."""
  return max(
    (
      a.shape[-3]  # K/V or MLA's latent and RoPE key: `[..., slots, heads, dim]`
      for path, a in jax.tree_util.tree_leaves_with_path(cache)
      if path[-1].key not in STATE_NAMES
    ),
    default=default,
  )


def cache_logical_axes(cfg: ModelConfig, name: str = "k") -> tuple[str | None, ...]:
  """Logical axis names of the arrays called `name` in `init_cache(cfg, ...)` (MLA's latent
  and RoPE key are shared by all heads: replicated over `tensor`; Mamba-2's x conv inputs and
  SSM states have its heads on `tensor`, the B/C conv inputs are replicated)."""
  if name == "conv_x":
    axes = ("batch", None, "heads", "head_dim")
  elif name == "conv_bc":
    axes = ("batch", None, None, None, None)
  elif name == "ssm":
    axes = ("batch", "heads", "head_dim", None)
  elif cfg.mla:
    axes = ("batch", None, None, None)
  else:
    axes = ("batch", None, "kv_heads", "head_dim")
  return ("layers", *axes) if cfg.scan_layers else axes


def init_cache(cfg: ModelConfig, batch: int, cache_len: int, dtype: Any = None) -> Cache:
  """Zeroed KV cache: per layer `{"k", "v"}` of `[batch, cache_len, kv_heads, head_dim]`, or
  with `cfg.scan_layers` one `{"k", "v"}` of `[layers, batch, cache_len, kv_heads, head_dim]`.
  Under `cfg.mla` the names and widths are `jdistill.models.mla.cache_shapes`'
  (`{"latent", "k_rope"}`, one shared head); under `cfg.gemma` a sliding layer's `{"k", "v"}`
  hold `min(sliding_window, cache_len)` slots (`jdistill.models.sliding_cache`). Nemotron-H's:
  per layer its kind's dict. Scanned layers of several kinds (`cfg.scanned_runs`): per run a
  tuple of its unit layers' dicts, each array `[count, ...]`."""
  dtype = cfg.jnp_dtype if dtype is None else dtype
  if cfg.scanned_runs:  # per run, its unit's layers stacked `[count, ...]`
    layers = init_cache(cfg.replace(scan_layers=False), batch, cache_len, dtype)
    runs = repeat_runs(cfg.layer_kinds)
    stack = lambda ids: {n: jnp.stack([layers[i][n] for i in ids]) for n in layers[ids[0]]}  # noqa: E731
    return tuple(
      tuple(stack(unrolled_layers(runs, r, j)) for j in range(len(unit)))
      for r, (unit, _) in enumerate(runs)
    )
  if cfg.hybrid:
    return tuple(
      _hybrid_layer_cache(cfg, kind, batch, cache_len, dtype) for kind in cfg.layer_pattern
    )
  if cfg.mla:
    shapes = mla_cache_shapes(cfg, batch, cache_len)
  elif cfg.gemma:
    return tuple(
      _kv_zeros(cfg, batch, ring_len(cfg.sliding_window, cache_len), dtype)
      if cfg.is_sliding_layer(i)
      else _kv_zeros(cfg, batch, cache_len, dtype)
      for i in range(cfg.num_layers)
    )
  else:
    shape = (batch, cache_len, cfg.num_kv_heads, cfg.head_dim)
    shapes = {"k": shape, "v": shape}
  if cfg.scan_layers:
    return {name: jnp.zeros((cfg.num_layers, *shape), dtype) for name, shape in shapes.items()}
  return tuple(
    {name: jnp.zeros(shape, dtype) for name, shape in shapes.items()} for _ in range(cfg.num_layers)
  )


def _hybrid_layer_cache(cfg: ModelConfig, kind: str, batch: int, cache_len: int, dtype) -> dict:
  """One Nemotron-H layer's zeroed cache: K/V (`*`), conv + f32 SSM state (`M`) or none."""
  if kind == "*":
    return _kv_zeros(cfg, batch, cache_len, dtype)
  if kind == "M":
    shapes = mamba_cache_shapes(cfg, batch)
    return {
      name: jnp.zeros(shape, jnp.float32 if name == "ssm" else dtype)
      for name, shape in shapes.items()
    }
  return {}


def _kv_zeros(cfg: ModelConfig, batch: int, slots: int, dtype) -> dict[str, jax.Array]:
  shape = (batch, slots, cfg.num_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

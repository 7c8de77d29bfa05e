"""Sparse mixture-of-experts feed-forward (Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 / Nemotron-H)
and its router losses.

Routers: Qwen's softmax top-k (`route`); DeepSeek-V3's and Nemotron-H's sigmoid scores, chosen
with a score-correction bias from the best groups and scaled (`route_grouped`).

Experts: SwiGLU (`silu(x @ gate) * (x @ up) @ down`), or Nemotron-H's ungated squared ReLU
(`relu(x @ up)² @ down`: the dispatches take `gate=None`).

Dispatch never drops a token (no capacity factor): the `[tokens * k]` (token, expert)
assignments are sorted by expert, every expert runs over its rows, and the rows are
unsorted and summed with the router weights. `moe_dispatch="blocked"` (the default) pads
each expert's rows to whole blocks and runs the blocks as batched matmuls with their
experts' gathered weights (`blocked_experts`); `"ragged"` runs one grouped matmul
(`jax.lax.ragged_dot`), which XLA lowers densely today (every expert over every row: on
CPU E times the memory, on an H200 slower than the dense reference);
`"dense"` runs every expert on every token and masks the result: E times the FLOPs, a
reference for tests only.

Router losses: under `nnx.capture(model, nnx.Intermediate)` each MoE layer sows its
float32 router logits `[batch, seq, experts]`; `forward_with_aux_losses` runs the model
that way and turns them into the load-balancing and z losses (`aux_losses`).

DeepSeek-V3's auxiliary-loss-free balancing (its report, §2.1.2): each layer with the grouped
router (DeepSeek-V3's, also Nemotron-H's) also sows the experts it chose `[batch, seq, k]`;
`forward_with_router_stats` counts each expert's tokens (`expert_load`) and after a train step
`next_score_bias` moves every layer's score-correction bias by `speed * sign(mean load -
load)` (`balance_score_bias`): an overloaded expert is chosen less, an idle one more. The
optimizer never changes the bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.config import ModelConfig

AUX_KEYS = ("router_aux_loss", "router_z_loss")


def _param(rngs: nnx.Rngs, shape, axes, dtype, scale: float = 0.02):
  value = (scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, logical_axes=axes)


def route(logits: jax.Array, k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
  """`[tokens, experts]` logits → top-k (weights, experts) `[tokens, k]` of their f32 softmax."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, k)
  if norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, experts


def route_grouped(
  logits: jax.Array,
  bias: jax.Array,
  k: int,
  n_group: int,
  topk_group: int,
  norm_topk_prob: bool,
  scaling: float,
) -> tuple[jax.Array, jax.Array]:
  """DeepSeek-V3's router: `[tokens, experts]` logits → (weights, experts) `[tokens, k]`.

  Scores are `sigmoid(logits)` (f32). Choice only: `scores + bias` (the score-correction bias,
  `[experts]`) ranks the `n_group` contiguous expert groups by the sum of their best two, and
  the top k experts are picked from the best `topk_group` groups. The weights are the chosen
  experts' plain scores, normalised to sum 1 if `norm_topk_prob`, times `scaling`.
  """
  n, e = logits.shape
  scores = jax.nn.sigmoid(logits.astype(jnp.float32))
  choice = scores + jax.lax.stop_gradient(bias.astype(jnp.float32))
  group_scores = jnp.sum(jax.lax.top_k(choice.reshape(n, n_group, e // n_group), 2)[0], -1)
  _, groups = jax.lax.top_k(group_scores, topk_group)  # [tokens, topk_group]
  kept = jnp.sum(jax.nn.one_hot(groups, n_group, dtype=jnp.int32), axis=1) > 0  # [tokens, groups]
  choice = jnp.where(jnp.repeat(kept, e // n_group, axis=1), choice, -jnp.inf)
  _, experts = jax.lax.top_k(choice, k)
  weights = jnp.take_along_axis(scores, experts, axis=1)
  if norm_topk_prob:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  return weights * scaling, experts


def _expert_hidden(gate_out, up_out):
  """SwiGLU's `silu(gate) * up`, or squared ReLU's `relu(up)²` without a gate."""
  if gate_out is None:
    return jnp.square(jax.nn.relu(up_out))
  return jax.nn.silu(gate_out) * up_out


def ragged_experts(x, experts, weights, gate, up, down) -> jax.Array:
  """Grouped-matmul SwiGLU (or squared-ReLU: `gate=None`) experts.

  Args:
    x: `[tokens, hidden]`; experts, weights: `[tokens, k]` (the router's choice).
    gate (or None), up: `[experts, hidden, moe_mlp]`; down: `[experts, moe_mlp, hidden]`.
  Returns:
    `[tokens, hidden]`: the router-weighted sum of each token's k expert outputs.
  """
  n, k = experts.shape
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  rows = x[order // k]  # [tokens * k, hidden], grouped by expert
  sizes = jnp.bincount(flat, length=up.shape[0]).astype(jnp.int32)
  g = None if gate is None else jax.lax.ragged_dot(rows, gate, sizes)
  h = _expert_hidden(g, jax.lax.ragged_dot(rows, up, sizes))
  out = jax.lax.ragged_dot(h, down, sizes)
  out = out[jnp.argsort(order)].reshape(n, k, -1)
  return jnp.einsum("nkd,nk->nd", out, weights.astype(out.dtype))


# Auto block sizes keep the static padding bound, E * (B - 1) rows, under a quarter of the
# tokens * k real rows; the auto group keeps each scan step's gathered expert weights (all
# three projections) under this many bytes.
MIN_BLOCK, MAX_BLOCK = 8, 128
GROUP_WEIGHT_BYTES = 256 * 2**20


def block_size_for(rows: int, experts: int) -> int:
  """The auto block size: the largest power of two in [8, 128] with `experts * B <= rows / 4`."""
  b = MAX_BLOCK
  while b > MIN_BLOCK and experts * b * 4 > rows:
    b //= 2
  return b


def blocked_experts(
  x, experts, weights, gate, up, down, block_size: int | None = None, group: int | None = None
) -> jax.Array:
  """Same contract as `ragged_experts`, as a sorted, block-padded grouped matmul (MegaBlocks).

  The `[tokens * k]` assignments are sorted by expert and each expert's rows padded to a
  multiple of `block_size` (B), so every block of B rows has one expert; the padded layout
  has a static `n_blocks = (tokens * k + min(E, tokens * k) * (B - 1)) // B` blocks (the
  ones past the last expert's are zeros). Each block runs the SwiGLU as a batched matmul
  with its expert's weights gathered (`[blocks, hidden, moe_mlp]`), `group` blocks at a time
  under `lax.scan` (gathered weights `[group, hidden, moe_mlp]`); `group >= n_blocks` runs
  all blocks at once, without a scan. Padding rows' outputs are dropped; nothing is.

  Args:
    block_size: rows per block (None: `block_size_for(tokens * k, E)`).
    group: blocks per scan step (None: as many as fit `GROUP_WEIGHT_BYTES` of gathered
      weights).
  """
  n, k = experts.shape
  e, d, f = up.shape
  m = n * k
  bs = block_size or block_size_for(m, e)
  n_blocks = (m + min(e, m) * (bs - 1)) // bs
  if group is None:
    per_block = ((2 if gate is not None else 1) * d * f + f * d) * up.dtype.itemsize
    group = max(1, GROUP_WEIGHT_BYTES // per_block)
  steps = -(-n_blocks // min(group, n_blocks))
  group = -(-n_blocks // steps)  # the same number of steps with the fewest dead blocks
  n_blocks = steps * group
  slots = n_blocks * bs

  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
  start = jnp.cumsum(sizes) - sizes  # each expert's first row among the sorted ones
  padded_end = jnp.cumsum((sizes + bs - 1) // bs * bs)
  padded_start = padded_end - (sizes + bs - 1) // bs * bs
  block_starts = jnp.arange(n_blocks, dtype=jnp.int32) * bs
  # blocks past the last expert's get the last expert: their rows are all padding
  block_expert = jnp.minimum(jnp.sum(padded_end[None, :] <= block_starts[:, None], 1), e - 1)
  slot_expert = jnp.repeat(block_expert, bs, total_repeat_length=slots)
  j = jnp.arange(slots, dtype=jnp.int32) - padded_start[slot_expert]  # row within its expert
  valid = j < sizes[slot_expert]
  sorted_row = jnp.minimum(start[slot_expert] + j, m - 1)
  rows = jnp.where(valid[:, None], x[order[sorted_row] // k], 0).reshape(n_blocks, bs, d)
  # where each (token, choice) landed among the padded slots
  flat_sorted = flat[order]
  dest = padded_start[flat_sorted] + jnp.arange(m, dtype=jnp.int32) - start[flat_sorted]
  position = jnp.zeros(m, jnp.int32).at[order].set(dest, unique_indices=True)

  def swiglu(rows, ids):
    """`[g, B, hidden]` rows of `[g]` experts → `[g, B, hidden]`."""
    take = dict(indices_are_sorted=True, mode="promise_in_bounds")
    u, dn = (w.at[ids].get(**take) for w in (up, down))
    g = None if gate is None else jnp.einsum("gbd,gdf->gbf", rows, gate.at[ids].get(**take))
    h = _expert_hidden(g, jnp.einsum("gbd,gdf->gbf", rows, u))
    return jnp.einsum("gbf,gfd->gbd", h, dn)

  if steps == 1:
    out = swiglu(rows, block_expert)
  else:
    # Without the remat the scan would save every step's gathered weights for the backward
    # pass (n_blocks weight copies again); regathering them is cheap, the dots are kept.
    body = jax.checkpoint(swiglu, policy=jax.checkpoint_policies.dots_saveable, prevent_cse=False)
    _, out = jax.lax.scan(
      lambda c, xs: (c, body(*xs)),
      None,
      (rows.reshape(steps, group, bs, d), block_expert.reshape(steps, group)),
    )
  out = out.reshape(slots, d)[position].reshape(n, k, d)
  return jnp.einsum("nkd,nk->nd", out, weights.astype(out.dtype))


def dense_experts(x, experts, weights, gate, up, down) -> jax.Array:
  """Same contract as `ragged_experts`, computing every expert on every token (reference)."""
  one_hot = jax.nn.one_hot(experts, up.shape[0], dtype=weights.dtype)  # [tokens, k, experts]
  combine = jnp.sum(one_hot * weights[..., None], axis=1)
  g = None if gate is None else jnp.einsum("nd,edf->nef", x, gate)
  h = _expert_hidden(g, jnp.einsum("nd,edf->nef", x, up))
  out = jnp.einsum("nef,efd->ned", h, down)
  return jnp.einsum("ned,ne->nd", out, combine.astype(out.dtype))


class MoE(nnx.Module):
  """Routed SwiGLU experts, plus a shared expert when configured (Qwen2-MoE's is
  sigmoid-gated, DeepSeek-V3's always on). DeepSeek-V3's router also holds the
  score-correction bias `score_bias` `[experts]` (f32): it only picks experts, so it gets no
  gradient; it moves only by the load rule (`next_score_bias`). Nemotron-H's experts and
  shared expert are ungated squared ReLU (no `gate_proj`), routed as DeepSeek-V3's."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    e, d, f, pd = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.jnp_param_dtype
    self.cfg = cfg
    self.gated = not cfg.hybrid
    self.router = _param(rngs, (d, e), ("embed", "expert"), pd)
    if self.gated:
      self.gate_proj = _param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), pd)
    self.up_proj = _param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), pd)
    self.down_proj = _param(rngs, (e, f, d), ("expert", "moe_mlp", "embed"), pd)
    if self.grouped_router:
      self.score_bias = nnx.Param(jnp.zeros((e,), jnp.float32), logical_axes=("expert",))
    s = cfg.shared_expert_intermediate_size
    if s:
      if self.gated:
        self.shared_gate_proj = _param(rngs, (d, s), ("embed", "mlp"), pd)
      self.shared_up_proj = _param(rngs, (d, s), ("embed", "mlp"), pd)
      self.shared_down_proj = _param(rngs, (s, d), ("mlp", "embed"), pd)
      if cfg.model_type == "qwen2_moe":
        self.shared_expert_gate = _param(rngs, (d,), ("embed",), pd)

  @property
  def grouped_router(self) -> bool:
    """DeepSeek-V3's sigmoid router (also Nemotron-H's): f32, a score bias, expert groups."""
    return self.cfg.model_type in ("deepseek_v3", "nemotron_h")

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[batch, seq, hidden]` → `[batch, seq, hidden]`."""
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    if self.grouped_router:  # HF keeps this router in f32
      logits = jnp.dot(flat.astype(jnp.float32), self.router[...].astype(jnp.float32))
    else:
      logits = jnp.dot(flat, self.router[...].astype(dt), preferred_element_type=jnp.float32)
    # Only under nnx.capture: a plain sow stores onto the module, which fails inside the
    # sampler's while_loop (TraceContextError) and would leak into later nnx.split states.
    if hasattr(self, "__captures__"):
      self.sow(nnx.Intermediate, "router_logits", logits.reshape(b, t, -1))
    if self.grouped_router:
      weights, experts = route_grouped(
        logits, self.score_bias[...], cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group,
        cfg.norm_topk_prob, cfg.routed_scaling_factor,
      )  # fmt: skip
      if hasattr(self, "__captures__"):
        self.sow(nnx.Intermediate, "router_experts", experts.reshape(b, t, -1))
    else:
      weights, experts = route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
    run = {"ragged": ragged_experts, "blocked": blocked_experts, "dense": dense_experts}[
      cfg.moe_dispatch
    ]
    gate = self.gate_proj[...].astype(dt) if self.gated else None
    w = [p[...].astype(dt) for p in (self.up_proj, self.down_proj)]
    y = run(flat, experts, weights.astype(dt), gate, *w)
    if cfg.shared_expert_intermediate_size:
      up = flat @ self.shared_up_proj[...].astype(dt)
      g = flat @ self.shared_gate_proj[...].astype(dt) if self.gated else None
      shared = _expert_hidden(g, up) @ self.shared_down_proj[...].astype(dt)
      if cfg.model_type == "qwen2_moe":
        shared = jax.nn.sigmoid(flat @ self.shared_expert_gate[...].astype(dt))[:, None] * shared
      y = y + shared
    return y.reshape(b, t, d)


def aux_losses(
  router_logits: list[jax.Array], cfg: ModelConfig, token_mask: jax.Array | None = None
) -> dict[str, jax.Array]:
  """Unweighted router losses over all MoE layers, as float32 scalars.

  Args:
    router_logits: per MoE layer `[batch, seq, experts]`, or stacked layers
      `[layers, batch, seq, experts]`.
    token_mask: `[batch, seq]`, which tokens count (padding is False). Default: all.
  Returns:
    `router_aux_loss`: HF's `load_balancing_loss_func`: `E * sum_e f_e * P_e` where, pooled
      over layers and real tokens, `f_e` is the mean number of top-k slots given to expert `e`
      and `P_e` its mean router probability. `router_z_loss`: the mean over layers and real
      tokens of `logsumexp(logits)^2` (ST-MoE).
  """
  e, k = cfg.num_experts, cfg.num_experts_per_tok
  # per layer `[b, t, e]`, or `[layers, b, t, e]` from scanned layers
  logits = jnp.concatenate(
    [x.astype(jnp.float32).reshape(-1, *x.shape[-3:]) for x in router_logits]
  )  # [layers, b, t, e]
  mask = jnp.ones(logits.shape[1:3], jnp.float32) if token_mask is None else token_mask
  mask = jnp.broadcast_to(mask.astype(jnp.float32), logits.shape[:3])
  rows = jnp.maximum(jnp.sum(mask), 1.0)
  probs = jax.nn.softmax(logits, axis=-1)
  _, chosen = jax.lax.top_k(probs, k)
  slots = jnp.sum(jax.nn.one_hot(chosen, e, dtype=jnp.float32), axis=-2)  # [layers, b, t, e]
  tokens_per_expert = jnp.einsum("lbte,lbt->e", slots, mask) / rows
  prob_per_expert = jnp.einsum("lbte,lbt->e", probs, mask) / rows
  z = jax.nn.logsumexp(logits, axis=-1)
  return {
    "router_aux_loss": e * jnp.sum(tokens_per_expert * prob_per_expert),
    "router_z_loss": jnp.sum(z * z * mask) / rows,
  }


def expert_load(experts: jax.Array, num_experts: int, token_mask=None) -> jax.Array:
  """Tokens routed to each expert: chosen experts `[..., batch, seq, k]` → f32 counts
  `[..., num_experts]` over the tokens `token_mask` `[batch, seq]` marks (default: all)."""
  *lead, b, t, k = experts.shape
  mask = jnp.ones((b, t)) if token_mask is None else token_mask
  weights = jnp.broadcast_to(mask.astype(jnp.float32)[:, :, None], (b, t, k)).reshape(-1)
  count = lambda row: jnp.bincount(row, weights, length=num_experts)  # noqa: E731
  return jax.vmap(count)(experts.reshape(-1, b * t * k)).reshape(*lead, num_experts)


def balance_score_bias(bias: jax.Array, load: jax.Array, speed: float) -> jax.Array:
  """DeepSeek-V3's bias update: `bias + speed * sign(mean(load) - load)`, the mean over the
  experts; bias, load `[..., experts]` (a leading `layers` axis for scanned layers)."""
  return bias + speed * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)


def _dict_keys(path) -> tuple:
  """A state path's module and variable names; a scanned block's sown values are named by
  their path inside it (`transformer.ScannedBlocks`: "block/mlp/router_logits")."""
  keys = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      keys += k.key.split("/") if isinstance(k.key, str) else [k.key]
  return tuple(keys)


def next_score_bias(new_params, old_params, loads: dict, speed: float):
  """`new_params` (after the optimizer) with every layer's `score_bias` as in `old_params`
  (before it): moved by `balance_score_bias` with its layer's load when `speed > 0`, else
  unchanged. (It has no gradient, but AdamW's weight decay would shrink it.)

  `loads`: `{module path: load}` (`forward_with_router_stats`); every biased layer needs one
  when `speed > 0`. Params without a `score_bias` come back as they are.
  """

  def one(path, new, old):
    keys = _dict_keys(path)
    if keys[-1:] != ("score_bias",):
      return new
    if not speed:
      return old
    return balance_score_bias(old, loads[keys[:-1]], speed).astype(old.dtype)

  return jax.tree_util.tree_map_with_path(one, new_params, old_params)


def forward_with_router_stats(model, tokens, positions=None, kv_mask=None):
  """`model(tokens, positions, kv_mask=kv_mask)` → (hidden, cache, router losses, loads).

  The losses (`aux_losses`, weighted by nothing) and the loads are computed over the tokens
  `kv_mask` marks (a `[batch, seq]` mask; padding is not a token). `loads` maps each
  grouped-router (DeepSeek-V3, Nemotron-H) MoE layer's module path (say `("layers", 1, "mlp")`)
  to its `expert_load` `[experts]` (`[layers, experts]` for scanned layers); a dense model gives
  `{}, {}`.
  """
  if not model.cfg.num_experts:
    return (*model(tokens, positions, kv_mask=kv_mask), {}, {})
  (hidden, cache), captured = nnx.capture(model, nnx.Intermediate)(
    tokens, positions, kv_mask=kv_mask
  )
  logits, loads = [], {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(captured):
    *module, name = _dict_keys(path)
    if name == "router_logits":
      logits.append(leaf)
    elif name == "router_experts":
      loads[tuple(module)] = expert_load(leaf, model.cfg.num_experts, kv_mask)
  return hidden, cache, aux_losses(logits, model.cfg, kv_mask), loads


def forward_with_aux_losses(model, tokens, positions=None, kv_mask=None):
  """`model(tokens, positions, kv_mask=kv_mask)` → (hidden, cache, router losses)
  (`forward_with_router_stats` without the loads)."""
  return forward_with_router_stats(model, tokens, positions, kv_mask)[:3]


def weighted_aux_loss(losses: dict[str, jax.Array], cfg: ModelConfig) -> jax.Array:
  """The coefficient-weighted sum of `aux_losses`' terms (0 for a dense model)."""
  total = jnp.zeros((), jnp.float32)
  if losses:
    total += cfg.router_aux_loss_coef * losses["router_aux_loss"]
    total += cfg.router_z_loss_coef * losses["router_z_loss"]
  return total

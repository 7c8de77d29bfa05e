"""Continuous batching: `Sampler.generate_continuous`.

A fixed number of slots, each owned by a group (teacher), decode in one compiled
`lax.while_loop`; a finished slot takes its group's next queued prompt. Each slot keeps the
cache layout of `jdistill.sampling.layout` in its own cache row (its prompt in `[P - len, P)`,
decode step t at slot `P + t`), so the one decode step is vmapped over rows to give every row
its own write slot and causal horizon; a refill is a one-row prefill of `[1, P]` inside the
loop, which rewrites the row's prompt region (older decode slots stay behind the causal
horizon until rewritten).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.models.transformer import init_cache
from jdistill.sampling.layout import Rollouts, cache_layout, to_right_padded
from jdistill.sampling.ops import prompt_keys, sample_step
from jdistill.sampling.params import SamplingParams, _is_int, knobs_of
from jdistill.sampling.prompts import left_align


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


class ContinuousBatching:
  """`Sampler`'s continuous-batching half (a mixin): `generate_continuous` and its compiled
  loop. It uses the sampler's `merge`, `cache_dtype`, `num_compiles`, `_fns`,
  `_cache_shardings`, `_prepare` and `_limits`."""

  def _build_continuous(self, key: _ContinuousKey, cfg):
    """The one compiled function of `generate_continuous` for this static shape."""
    bucket, n_new, n_slots, n_prompts = key.bucket, key.max_new_tokens, key.slots, key.prompts
    cache_len = bucket + n_new
    cache_sh = self._cache_shardings(
      cfg, jax.eval_shape(lambda: init_cache(cfg, n_slots, cache_len))
    )
    rows = 0  # the cache's batch axis (`cfg` is `model_config`'s: never scanned)
    constrain_cache = lambda c: jax.lax.with_sharding_constraint(c, cache_sh)
    sampler = self

    def run(state, prompt_left, lengths, limits, order, group_start, group_count, slot_group, rng,
            knobs):  # fmt: skip
      """prompt_left `[N, bucket]`, lengths / limits / order `[N]` (order: prompt ids grouped
      by group, queue order within each), group_start / group_count `[G]`, slot_group `[S]`
      → (Rollouts `[N, cache_len]`, LoopStats)."""
      sampler.num_compiles += 1
      model = sampler.merge(state)
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

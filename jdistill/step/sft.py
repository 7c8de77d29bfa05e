"""The SFT step: masked cross-entropy of the completion tokens of packed rows, then the optax
update every stage ends with (`jdistill.step.common.apply_gradients`). Pure functions of arrays.

A packed batch (`jdistill.data.packing`), every array `[rows, max_len]`: `tokens`, `positions`
(restarting at each example), `segment_ids` (1, 2, ... per example; 0 on padding) and
`loss_mask` (1 on completion tokens and their end-of-sequence token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill import losses
from jdistill.step.common import apply_gradients

BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")


def sft_loss(params, graphdef, batch: dict, chunk_size: int | None):
  """Token-mean cross-entropy of the completion tokens of a packed batch → (loss, tokens)."""
  student = nnx.merge(graphdef, params)
  segments = batch["segment_ids"][:, :-1]
  hidden, _ = student(
    batch["tokens"][:, :-1],
    batch["positions"][:, :-1],
    kv_mask=segments > 0,
    segment_ids=segments,
  )
  mask = target_mask(batch)
  loss, _ = losses.cross_entropy_loss(
    hidden, student.unembedding(), batch["tokens"][:, 1:], mask, chunk_size=chunk_size
  )
  return loss, jnp.sum(mask)


def target_mask(batch: dict):
  """`[rows, max_len - 1]`: 1 where position t's target (token t+1) carries loss — a
  completion token of the same example (a segment boundary never does: the next example
  starts with its prompt)."""
  same = batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]
  return batch["loss_mask"][:, 1:] * same


def sft_step(state: dict, batch: dict, *, graphdef, optimizer, schedule, chunk_size):
  """One SFT update → (new state, metrics)."""
  grad_fn = jax.value_and_grad(sft_loss, has_aux=True)
  (loss, tokens), grads = grad_fn(state["params"], graphdef, batch, chunk_size)
  new_state, metrics = apply_gradients(state, loss, grads, optimizer, schedule)
  return new_state, dict(
    metrics, completion_tokens=tokens, tokens=jnp.sum(batch["segment_ids"] > 0)
  )

"""Logits built chunk by chunk over T from hidden states and unembedding matrices.

``[B, T, V]`` float32 logits do not fit at real scale, so the kernels take hidden states
and unembedding matrices and build logits chunk by chunk along T inside ``jax.checkpoint``
(:func:`chunked_token_values`): neither the forward nor the backward pass ever holds more
than ``[B, chunk_size, V]`` logits per model. :func:`chunk_positions` picks the chunk size;
:func:`token_logprobs` and :func:`cross_entropy_loss` (policy gradients, SFT) stand on the
same chunking. :func:`_full_token_values` is the naive reference.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jdistill.losses.divergences import log_softmax, masked_mean, token_logp
from jdistill.losses.settings import _check_same_shape

sg = jax.lax.stop_gradient


# --------------------------------------------------------------------------
# Chunked logits kernel
# --------------------------------------------------------------------------


def _check_unembed_shapes(
  student_hidden,
  student_unembed,
  teacher_hidden,
  teacher_unembed,
  targets,
  student_bias,
  teacher_bias,
):
  for name, x, ndim in (
    ("student_hidden", student_hidden, 3),
    ("teacher_hidden", teacher_hidden, 3),
    ("student_unembed", student_unembed, 2),
    ("teacher_unembed", teacher_unembed, 2),
    ("targets", targets, 2),
  ):
    if x.ndim != ndim:
      raise ValueError(f"{name} must have {ndim} dims, got shape {x.shape}")
  if student_unembed.shape[1] != teacher_unembed.shape[1]:
    raise ValueError(
      f"vocab mismatch: student_unembed vocab {student_unembed.shape[1]} "
      f"!= teacher_unembed vocab {teacher_unembed.shape[1]}"
    )
  for who, hidden, unembed in (
    ("student", student_hidden, student_unembed),
    ("teacher", teacher_hidden, teacher_unembed),
  ):
    if hidden.shape[-1] != unembed.shape[0]:
      raise ValueError(
        f"{who}_hidden width {hidden.shape[-1]} != {who}_unembed rows {unembed.shape[0]}"
      )
  for name, hidden in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
    if hidden.shape[:2] != targets.shape:
      raise ValueError(f"{name} [B, T] = {hidden.shape[:2]} != targets shape {targets.shape}")
  vocab = student_unembed.shape[1]
  for name, bias in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
    if bias is not None and bias.shape != (vocab,):
      raise ValueError(f"{name} must have shape {(vocab,)}, got {bias.shape}")


# Tokens (rows x positions) per chunk with chunk_size=0. CPU: a chunk's [tokens, V] logits
# and softmax temporaries are read and written ~10 times, and ~256 tokens keep those passes
# near the caches while the vocabulary matmuls still amortise their weight reads (the
# compare-bench train step, 16 rows x 128 positions: 128-256 tokens 1.90-1.98 s against
# 2.22 s at 2,048 at vocab 32k; 7.5 s against 8.4 s at 64 tokens at 151,936).
# Accelerators: as many tokens as fit this many bytes of f32 logits per model.
AUTO_CHUNK_TOKENS_CPU = 256
AUTO_CHUNK_BYTES = 512 * 2**20


def chunk_positions(chunk_size: int, rows: int, length: int, vocab: int) -> int:
  """Positions per chunk along T (at most ``length``): ``chunk_size`` itself, or with 0
  (auto) ``AUTO_CHUNK_TOKENS_CPU`` tokens' worth on CPU and ``AUTO_CHUNK_BYTES`` of f32
  ``[rows, C, vocab]`` logits (at least 256 tokens) elsewhere, over the global ``rows``."""
  if chunk_size == 0:
    if jax.default_backend() == "cpu":
      tokens = AUTO_CHUNK_TOKENS_CPU
    else:
      tokens = max(AUTO_CHUNK_TOKENS_CPU, AUTO_CHUNK_BYTES // (4 * vocab))
    chunk_size = max(1, tokens // max(rows, 1))
  return int(min(chunk_size, length))


def project_logits(hidden, unembed, bias=None):
  """``hidden [..., D] @ unembed [D, V] (+ bias [V])`` with float32 accumulation."""
  logits = jnp.dot(hidden, unembed, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  return logits


def _split_chunks(x, n_chunks: int, chunk_size: int):
  """``[B, T, ...]`` -> ``[n_chunks, B, chunk_size, ...]``, zero-padding T."""
  pad = n_chunks * chunk_size - x.shape[1]
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape(x.shape[0], n_chunks, chunk_size, *x.shape[2:])
  return jnp.swapaxes(x, 0, 1)


def _merge_chunks(y, length: int):
  """``[n_chunks, B, chunk_size, ...]`` -> ``[B, length, ...]`` (drops padding)."""
  y = jnp.swapaxes(y, 0, 1)
  y = y.reshape(y.shape[0], y.shape[1] * y.shape[2], *y.shape[3:])
  return y[:, :length]


def chunked_token_values(
  fn: Callable,
  student_hidden,
  student_unembed,
  teacher_hidden,
  teacher_unembed,
  targets,
  *,
  chunk_size: int,
  student_bias=None,
  teacher_bias=None,
  extra=None,
):
  """Applies ``fn`` to student/teacher logits built chunk by chunk along T.

  Shapes: ``student_hidden [B, T, Ds]``, ``student_unembed [Ds, V]``,
  ``teacher_hidden [B, T, Dt]``, ``teacher_unembed [Dt, V]``, ``targets [B, T]``
  int, optional biases ``[V]``. ``fn(student_logits [B, C, V] f32,
  teacher_logits [B, C, V] f32, targets [B, C]) -> pytree of [B, C]``; the
  result is that pytree with ``[B, T]`` leaves. ``extra``: an optional pytree of ``[B, T, ...]``
  arrays, cut into the same chunks and passed to ``fn`` as a fourth argument.

  T is zero-padded to a multiple of ``chunk_size`` (padded positions are
  computed then dropped, so ``fn`` must be finite on zero hidden states). The
  chunk body runs under ``jax.lax.map`` and ``jax.checkpoint``, so at most one
  chunk's ``[B, C, V]`` logits (and their softmax temporaries) are live in the
  forward and backward passes. Teacher inputs are wrapped in stop_gradient:
  gradients reach only the student hidden states, unembedding and bias.
  """
  _check_unembed_shapes(
    student_hidden,
    student_unembed,
    teacher_hidden,
    teacher_unembed,
    targets,
    student_bias,
    teacher_bias,
  )
  if not (isinstance(chunk_size, numbers.Integral) and chunk_size >= 0):
    raise ValueError(f"chunk_size must be a positive int or 0 (auto), got {chunk_size!r}")
  length = targets.shape[1]
  chunk_size = chunk_positions(chunk_size, targets.shape[0], length, student_unembed.shape[-1])
  n_chunks = -(-length // chunk_size)
  weights = (
    student_unembed,
    student_bias,
    sg(teacher_unembed),
    None if teacher_bias is None else sg(teacher_bias),
  )
  chunks = tuple(
    _split_chunks(x, n_chunks, chunk_size) for x in (student_hidden, sg(teacher_hidden), targets)
  )
  if extra is not None:
    chunks += (jax.tree.map(lambda x: _split_chunks(x, n_chunks, chunk_size), extra),)

  @jax.checkpoint
  def chunk_values(weights, chunk):
    s_unembed, s_bias, t_unembed, t_bias = weights
    s_hidden, t_hidden, chunk_targets = chunk[:3]
    return fn(
      project_logits(s_hidden, s_unembed, s_bias),
      project_logits(t_hidden, t_unembed, t_bias),
      chunk_targets,
      *chunk[3:],
    )

  values = jax.lax.map(lambda chunk: chunk_values(weights, chunk), chunks)
  return jax.tree.map(lambda y: _merge_chunks(y, length), values)


def token_logprobs(hidden, unembed, targets, *, chunk_size: int | None = 0, bias=None):
  """Differentiable log-probs of ``targets`` from hidden states -> ``[B, T]`` float32.

  ``hidden [B, T, D]``, ``unembed [D, V]``, ``targets [B, T]`` (position t scores
  ``targets[:, t]``). Logits are built ``chunk_size`` positions at a time under
  ``jax.checkpoint`` (as in :func:`chunked_token_values`), so no ``[B, T, V]`` array lives
  in memory; ``chunk_size=0`` chooses the size (:func:`chunk_positions`), ``None`` is the
  unchunked reference. The policy-gradient losses
  (GRPO) and the cross-entropy of SFT both stand on it.
  """
  _check_same_shape("hidden[..., 0]", hidden[..., 0], "targets", targets)

  def logp(h, w, b, tg):
    return token_logp(log_softmax(project_logits(h, w, b)), tg)

  if chunk_size is None:
    return logp(hidden, unembed, bias, targets)
  length = targets.shape[1]
  size = chunk_positions(chunk_size, targets.shape[0], length, unembed.shape[-1])
  n_chunks = -(-length // size)
  chunks = (_split_chunks(hidden, n_chunks, size), _split_chunks(targets, n_chunks, size))
  step = jax.checkpoint(lambda chunk: logp(chunk[0], unembed, bias, chunk[1]))
  return _merge_chunks(jax.lax.map(step, chunks), length)


def cross_entropy_loss(
  hidden, unembed, targets, mask, *, chunk_size: int | None = 0, bias=None, normalize="token"
):
  """Masked next-token cross-entropy from hidden states -> ``(loss, nll [B, T])``.

  ``hidden [B, T, D]``, ``unembed [D, V]``, ``targets [B, T]`` (position t predicts
  ``targets[:, t]``), ``mask [B, T]`` (1 on the tokens that carry loss, e.g. completions
  only), chunked as :func:`token_logprobs`. Positions with mask 0 get no gradient.
  """
  _check_same_shape("mask", mask, "targets", targets)
  per_token = -token_logprobs(hidden, unembed, targets, chunk_size=chunk_size, bias=bias)
  return masked_mean(per_token, mask, normalize), sg(per_token)


def _full_token_values(
  fn,
  student_hidden,
  student_unembed,
  teacher_hidden,
  teacher_unembed,
  targets,
  *,
  student_bias=None,
  teacher_bias=None,
):
  """Reference for :func:`chunked_token_values`: full ``[B, T, V]`` logits, no remat."""
  _check_unembed_shapes(
    student_hidden,
    student_unembed,
    teacher_hidden,
    teacher_unembed,
    targets,
    student_bias,
    teacher_bias,
  )
  teacher_bias = None if teacher_bias is None else sg(teacher_bias)
  return fn(
    project_logits(student_hidden, student_unembed, student_bias),
    project_logits(sg(teacher_hidden), sg(teacher_unembed), teacher_bias),
    targets,
  )

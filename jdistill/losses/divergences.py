"""Per-token divergences from logits or log-probs, and the masked reductions.

* Logits are ``[..., V]``; masks are ``[B, T]`` (float weights or bool). "Per-token"
  functions return one value per position (``[B, T]`` for ``[B, T, V]`` logits).
* Softmax / log-softmax are computed in float32 whatever the input dtype.
* ``temperature`` divides both student and teacher logits before the softmax.
* P = teacher, Q = student. Reverse KL is KL(Q||P) = sum_v q (log q - log p), the
  on-policy objective; forward KL is KL(P||Q). JSD(beta) mixes the two (beta = 0 is exactly
  forward KL, beta = 1 exactly reverse KL); the top-k KLs restrict either to a top-k support.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jdistill.losses.settings import (
  KL_DIRECTIONS,
  NORMALIZE_MODES,
  TOPK_SUPPORTS,
  TOPK_TAILS,
  _check_beta,
  _check_choice,
  _check_k,
  _check_same_shape,
  _check_temperature,
)

# Finite stand-in for log(0) in masked log-sum-exps: keeps values and gradients
# finite (exp underflows to exactly 0) where a true -inf would give 0 * inf = nan.
_LOG_ZERO = -1e30

sg = jax.lax.stop_gradient


# --------------------------------------------------------------------------
# Reductions
# --------------------------------------------------------------------------


def masked_mean(values, mask, normalize: str = "token"):
  """Masked mean of per-token ``values [B, T]`` under ``mask [B, T]`` -> scalar.

  * "token": ``sum(m * v) / max(sum(m), 1)`` -- every masked token weighs the same.
  * "sequence": mean, over sequences with at least one masked token, of
    ``sum_t(m * v) / sum_t(m)`` -- every sequence weighs the same.

  Masked-out positions never contribute, even if ``values`` holds inf/nan there.
  An all-zero mask gives 0.
  """
  _check_choice("normalize", normalize, NORMALIZE_MODES)
  _check_same_shape("values", values, "mask", mask)
  m = mask.astype(jnp.float32)
  weighted = m * jnp.where(m != 0, values.astype(jnp.float32), 0.0)
  if normalize == "token":
    return weighted.sum() / jnp.maximum(m.sum(), 1.0)
  if normalize == "constant":  # Dr. GRPO: a fixed denominator, no length bias
    return weighted.sum() / m.size
  tokens_per_seq = m.sum(axis=-1)
  seq_means = weighted.sum(axis=-1) / jnp.maximum(tokens_per_seq, 1.0)
  has_tokens = (tokens_per_seq > 0).astype(jnp.float32)
  return (has_tokens * seq_means).sum() / jnp.maximum(has_tokens.sum(), 1.0)


def token_weights(mask, normalize: str = "token"):
  """``c [B, T]`` with ``masked_mean(values, mask, normalize) = Σ_t c_t values_t`` (zero
  where the mask is), so a loss can be summed chunk by chunk."""
  _check_choice("normalize", normalize, NORMALIZE_MODES)
  m = mask.astype(jnp.float32)
  if normalize == "token":
    return m / jnp.maximum(m.sum(), 1.0)
  if normalize == "constant":
    return m / m.size
  tokens_per_seq = m.sum(axis=-1, keepdims=True)
  has_tokens = (tokens_per_seq > 0).astype(jnp.float32)
  return m * has_tokens / (jnp.maximum(tokens_per_seq, 1.0) * jnp.maximum(has_tokens.sum(), 1.0))


# --------------------------------------------------------------------------
# Log-probability helpers
# --------------------------------------------------------------------------


def log_softmax(logits, temperature: float = 1.0):
  """float32 ``log_softmax(logits / temperature)`` over the last axis."""
  _check_temperature(temperature)
  logits = logits.astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  return jax.nn.log_softmax(logits, axis=-1)


def token_logp(logp, targets):
  """``logp [..., V]`` at ``targets [...]`` (int) -> ``[...]``."""
  return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _kl_from_logp(logp_a, logp_b):
  """KL(a||b) = sum_v a (log a - log b) over the last axis, from log-probs."""
  return jnp.sum(jnp.exp(logp_a) * (logp_a - logp_b), axis=-1)


def _masked_logsumexp(logp, mask):
  """log sum_{v: mask} exp(logp_v); ~_LOG_ZERO (finite) when the mask is empty."""
  return jax.nn.logsumexp(jnp.where(mask, logp, _LOG_ZERO), axis=-1)


# --------------------------------------------------------------------------
# Full-vocabulary per-token terms
# --------------------------------------------------------------------------


def _jsd_from_logp(student_logp, teacher_logp, beta: float):
  """Generalized JSD(beta) from log-probs; beta in {0, 1} gives exactly the KLs."""
  if beta == 0.0:
    return _kl_from_logp(teacher_logp, student_logp)
  if beta == 1.0:
    return _kl_from_logp(student_logp, teacher_logp)
  mixture_logp = jnp.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
  kl_teacher = _kl_from_logp(teacher_logp, mixture_logp)
  kl_student = _kl_from_logp(student_logp, mixture_logp)
  return beta * kl_teacher + (1.0 - beta) * kl_student


def _logp_pair(student_logits, teacher_logits, temperature: float):
  _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
  return log_softmax(student_logits, temperature), log_softmax(teacher_logits, temperature)


def reverse_kl_per_token(student_logits, teacher_logits, temperature: float = 1.0):
  """Full-vocab reverse KL(Q||P) = sum_v q (log q - log p) per position.

  ``[..., V]`` logits -> ``[...]`` (float32). No masking, no stop_gradient.
  """
  s, t = _logp_pair(student_logits, teacher_logits, temperature)
  return _kl_from_logp(s, t)


def forward_kl_per_token(student_logits, teacher_logits, temperature: float = 1.0):
  """Full-vocab forward KL(P||Q) = sum_v p (log p - log q) per position.

  ``[..., V]`` logits -> ``[...]`` (float32). No masking, no stop_gradient.
  """
  s, t = _logp_pair(student_logits, teacher_logits, temperature)
  return _kl_from_logp(t, s)


def jsd_per_token(student_logits, teacher_logits, beta: float, temperature: float = 1.0):
  """Generalized JSD(beta) per position, as TRL's ``generalized_jsd_loss``.

  P = teacher, Q = student, M = beta P + (1 - beta) Q;
  ``beta KL(P||M) + (1 - beta) KL(Q||M)``. ``beta`` is a Python float in [0, 1]:
  beta == 0 is exactly forward KL(P||Q), beta == 1 exactly reverse KL(Q||P).
  ``[..., V]`` logits -> ``[...]`` (float32).
  """
  _check_beta(beta)
  s, t = _logp_pair(student_logits, teacher_logits, temperature)
  return _jsd_from_logp(s, t, beta)


# --------------------------------------------------------------------------
# Top-k per-token terms
# --------------------------------------------------------------------------


def _topk_mask(logp, k: int):
  """Boolean ``[..., V]``, True at exactly the k largest entries of each row."""
  _, idx = jax.lax.top_k(logp, int(k))
  mask = jnp.zeros(logp.shape, dtype=bool)
  return jnp.put_along_axis(mask, idx, True, axis=-1, inplace=False)


def _support_mask(student_logp, teacher_logp, k: int, support: str):
  if support == "teacher":
    return _topk_mask(teacher_logp, k)
  if support == "student":
    return _topk_mask(student_logp, k)
  return _topk_mask(teacher_logp, k) | _topk_mask(student_logp, k)


def _restricted_kl(logp_a, logp_b, mask, tail: str):
  """KL(a||b) of two distributions restricted to the support ``mask``.

  "renorm": both renormalised over the support. "bucket": the support entries
  plus one tail bucket holding the remaining mass, log(1 - sum_S p) computed
  exactly as a log-sum-exp over the complement (no cancellation); an empty
  complement contributes 0.
  """
  if tail == "renorm":
    logp_a = logp_a - _masked_logsumexp(logp_a, mask)[..., None]
    logp_b = logp_b - _masked_logsumexp(logp_b, mask)[..., None]
  terms = jnp.where(mask, jnp.exp(logp_a) * (logp_a - logp_b), 0.0)
  kl = terms.sum(axis=-1)
  if tail == "bucket":
    tail_a = _masked_logsumexp(logp_a, ~mask)
    tail_b = _masked_logsumexp(logp_b, ~mask)
    kl = kl + jnp.exp(tail_a) * (tail_a - tail_b)
  return kl


def _topk_kl_from_logp(student_logp, teacher_logp, k, support, tail, direction):
  mask = _support_mask(sg(student_logp), sg(teacher_logp), k, support)
  if direction == "reverse":
    return _restricted_kl(student_logp, teacher_logp, mask, tail)
  return _restricted_kl(teacher_logp, student_logp, mask, tail)


def _check_topk_args(k, vocab, support, tail, direction):
  _check_k(k, vocab)
  _check_choice("support", support, TOPK_SUPPORTS)
  _check_choice("tail", tail, TOPK_TAILS)
  _check_choice("direction", direction, KL_DIRECTIONS)


def topk_kl_per_token(
  student_logits,
  teacher_logits,
  k: int,
  support: str = "teacher",
  tail: str = "bucket",
  direction: str = "reverse",
  temperature: float = 1.0,
):
  """KL restricted to a top-k support, per position. ``[..., V]`` -> ``[...]``.

  support: "teacher" (teacher's top-k), "student" (student's top-k) or "union"
  (both; between k and 2k entries), chosen on the tempered log-probs with ties
  broken by ``lax.top_k``; the choice carries no gradient.
  tail: "renorm" renormalises both distributions over the support; "bucket"
  keeps the support probabilities and adds one tail bucket with mass
  1 - sum_{v in S} p(v) for each distribution.
  direction: "reverse" = KL(Q||P) (student first), "forward" = KL(P||Q).
  k must be in [1, V]; with k == V both tails equal the full-vocab KL.
  """
  _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
  _check_topk_args(k, student_logits.shape[-1], support, tail, direction)
  s, t = _logp_pair(student_logits, teacher_logits, temperature)
  return _topk_kl_from_logp(s, t, k, support, tail, direction)

"""Distillation loss kernels: pure, jittable functions of arrays.

Conventions shared by every function here
-----------------------------------------
* Logits are ``[..., V]``; masks are ``[B, T]`` (float weights or bool).
  "Per-token" functions return one value per position (``[B, T]`` for ``[B, T, V]``
  logits).
* Position ``t`` predicts ``targets[:, t]``: the caller has already shifted.
* Softmax / log-softmax are computed in float32 whatever the input dtype.
* ``temperature`` divides both student and teacher logits before the softmax.
* P = teacher, Q = student. Reverse KL is KL(Q||P) = sum_v q (log q - log p), the
  on-policy objective; forward KL is KL(P||Q).
* Argument checks (names, ranges, shapes) run in Python at trace time and raise
  ``ValueError`` naming the argument and the allowed values.

Memory
------
``[B, T, V]`` float32 logits do not fit at real scale, so :func:`distill_loss`
takes hidden states and unembedding matrices and builds logits chunk by chunk
along T inside ``jax.checkpoint`` (:func:`chunked_token_values`): neither the
forward nor the backward pass ever holds more than ``[B, chunk_size, V]`` logits
per model. :func:`unchunked_distill_loss` is the naive reference.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

LOSS_NAMES = ("sampled_token", "reverse_kl", "forward_kl", "jsd", "topk", "overlap_aware")
NORMALIZE_MODES = ("token", "sequence", "constant")
TOPK_SUPPORTS = ("teacher", "student", "union")
TOPK_TAILS = ("renorm", "bucket")
KL_DIRECTIONS = ("reverse", "forward")
OVERLAP_CRITERIA = ("teacher_topk", "floor", "soft")

# Finite stand-in for log(0) in masked log-sum-exps: keeps values and gradients
# finite (exp underflows to exactly 0) where a true -inf would give 0 * inf = nan.
_LOG_ZERO = -1e30

sg = jax.lax.stop_gradient


# --------------------------------------------------------------------------
# Argument validation (Python, trace time)
# --------------------------------------------------------------------------


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_temperature(temperature: float) -> None:
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _check_beta(beta: float) -> None:
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"beta must be in [0, 1], got {beta!r}")


def _check_k(k: int, vocab: int | None) -> None:
  """k must be a positive int, and at most ``vocab`` when that is known."""
  upper = "vocab" if vocab is None else f"vocab={vocab}"
  if not (isinstance(k, numbers.Integral) and 0 < k <= (k if vocab is None else vocab)):
    raise ValueError(f"k must be an int in [1, {upper}], got {k!r}")


def _check_same_shape(name_a: str, a, name_b: str, b) -> None:
  if a.shape != b.shape:
    raise ValueError(f"{name_a} shape {a.shape} != {name_b} shape {b.shape}")


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """Everything a loss kernel needs besides arrays: the loss kind and its hyper-parameters.

  One frozen (hashable) object travels from the config to the compiled step, so it can be a
  static argument of `jax.jit`. ``loss`` is one of :data:`LOSS_NAMES`; only the fields that
  loss uses matter (e.g. ``beta`` only for "jsd", ``k``/``topk_*`` only for "topk",
  ``overlap_*`` only for "overlap_aware", ``clip_eps`` only for "sampled_token"). The
  ``diag_*`` fields configure the per-token support diagnostics every loss returns.
  ``chunk_size``: positions per chunk along T; 0 chooses it from the shapes
  (:func:`chunk_positions`); None materialises full ``[B, T, V]`` logits (the test reference).
  """

  loss: str = "reverse_kl"
  chunk_size: int | None = 0
  temperature: float = 1.0
  normalize: str = "token"
  beta: float = 0.5
  k: int = 64
  topk_support: str = "teacher"
  topk_tail: str = "bucket"
  topk_direction: str = "reverse"
  clip_eps: float | None = None
  kl_weight: float = 1.0  # λ: weight of the sampled-token distillation advantage −k1
  icepop_c: float | None = None  # > 1: sampled terms with q/π outside [1/c, c] get no gradient
  overlap_criterion: str = "teacher_topk"
  overlap_topk: int = 8
  overlap_floor_prob: float = 1e-3
  diag_topk: tuple[int, ...] = (1, 8)
  diag_floor_prob: float = 1e-4
  diag_top_p: float = 0.9

  def replace(self, **changes) -> LossSettings:
    return dataclasses.replace(self, **changes)

  def validate(self, vocab: int | None = None) -> None:
    """Raises ValueError naming the bad field. ``vocab`` bounds ``k`` when given
    (``overlap_topk`` and ``diag_topk`` may exceed it: the whole vocabulary is then inside)."""
    _check_choice("loss", self.loss, LOSS_NAMES)
    _check_choice("normalize", self.normalize, NORMALIZE_MODES)
    _check_temperature(self.temperature)
    if self.chunk_size is not None and not (
      isinstance(self.chunk_size, numbers.Integral) and self.chunk_size >= 0
    ):
      raise ValueError(
        f"chunk_size must be a positive int, 0 (auto) or None (unchunked), got {self.chunk_size!r}"
      )
    if self.loss == "jsd":
      _check_beta(self.beta)
    if self.loss == "topk":
      _check_k(self.k, vocab)
      _check_choice("topk_support", self.topk_support, TOPK_SUPPORTS)
      _check_choice("topk_tail", self.topk_tail, TOPK_TAILS)
      _check_choice("topk_direction", self.topk_direction, KL_DIRECTIONS)
    if self.loss == "overlap_aware":
      _check_choice("overlap_criterion", self.overlap_criterion, OVERLAP_CRITERIA)
      if not (
        isinstance(self.overlap_topk, numbers.Integral)
        and not isinstance(self.overlap_topk, bool)
        and self.overlap_topk > 0
      ):
        raise ValueError(f"overlap_topk must be a positive int, got {self.overlap_topk!r}")
      if not (
        isinstance(self.overlap_floor_prob, numbers.Real)
        and 0.0 <= self.overlap_floor_prob < math.inf
      ):
        raise ValueError(
          f"overlap_floor_prob must be a finite float >= 0 (> 1 puts every "
          f"token off support), got {self.overlap_floor_prob!r}"
        )
    if self.clip_eps is not None and not self.clip_eps > 0:
      raise ValueError(f"clip_eps must be > 0 or None, got {self.clip_eps!r}")
    if self.icepop_c is not None and not self.icepop_c > 1:
      raise ValueError(f"icepop_c must be > 1 or None, got {self.icepop_c!r}")
    for diag_k in self.diag_topk:
      if not (isinstance(diag_k, numbers.Integral) and diag_k > 0):
        raise ValueError(f"diag_topk entries must be positive ints, got {self.diag_topk!r}")
    if not 0.0 < self.diag_floor_prob <= 1.0:
      raise ValueError(f"diag_floor_prob must be in (0, 1], got {self.diag_floor_prob!r}")
    if not 0.0 < self.diag_top_p <= 1.0:
      raise ValueError(f"diag_top_p must be in (0, 1], got {self.diag_top_p!r}")


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


# --------------------------------------------------------------------------
# Sampled-token (k1) objective
# --------------------------------------------------------------------------


def _check_extra_advantage(extra_advantage, shape):
  b, t = shape
  if extra_advantage.shape not in ((b, t), (b, 1)):
    raise ValueError(
      f"extra_advantage must have shape {(b, t)} or {(b, 1)}, got {extra_advantage.shape}"
    )


def sampled_token_loss(
  student_logp,
  teacher_logp,
  mask,
  *,
  behaviour_logp=None,
  clip_eps: float | None = None,
  extra_advantage=None,
  normalize: str = "token",
  icepop_c: float | None = None,
):
  """Sampled-token (k1) on-policy distillation loss -> ``(loss scalar, aux)``.

  Inputs are ``[B, T]``: ``student_logp`` = log p_s(x_t) (differentiable),
  ``teacher_logp`` = log p_t(x_t), ``mask`` the completion mask.

  * k1 = student_logp - teacher_logp (the per-token reverse-KL estimator).
  * Advantage A = -stop_gradient(k1) (+ stop_gradient(extra_advantage), shape
    ``[B, T]`` or ``[B, 1]``, e.g. an RL sequence reward). A is the same in every
    mode: we do *not* use Ultra's A = sg(teacher_logp - behaviour_logp); at the
    behaviour policy (r = 1) the gradients of both forms coincide.
  * No ``behaviour_logp``: per-token loss ``-A * student_logp`` (REINFORCE).
  * With ``behaviour_logp`` (the sampler's logprobs of the stale behaviour
    policy): r = exp(student_logp - sg(behaviour_logp)), per-token loss ``-r A``
    (importance corrected); with ``clip_eps`` also the PPO clip
    ``-min(r A, clip(r, 1 - eps, 1 + eps) A)``. At r = 1 the gradient equals the
    REINFORCE one.

  The per-token losses are reduced with :func:`masked_mean` (``normalize``).
  aux: per-token ``k1``, ``advantage``, ``ratio`` (ones without behaviour),
  ``per_token_loss``, and the scalar ``clip_fraction`` (token-mean share of
  masked tokens where the clipped branch is active; 0 without clipping).
  """
  _check_choice("normalize", normalize, NORMALIZE_MODES)
  _check_same_shape("student_logp", student_logp, "teacher_logp", teacher_logp)
  _check_same_shape("student_logp", student_logp, "mask", mask)
  if clip_eps is not None:
    if behaviour_logp is None:
      raise ValueError("clip_eps requires behaviour_logp (the PPO clip is on r)")
    if not clip_eps > 0:
      raise ValueError(f"clip_eps must be > 0 or None, got {clip_eps!r}")

  if extra_advantage is not None:
    _check_extra_advantage(extra_advantage, student_logp.shape)
  if behaviour_logp is not None:
    _check_same_shape("behaviour_logp", behaviour_logp, "student_logp", student_logp)
  per_token, aux = sampled_token_terms(
    student_logp, teacher_logp, behaviour_logp, extra_advantage, clip_eps, icepop_c
  )
  loss = masked_mean(per_token, mask, normalize)
  clipped = aux.pop("clipped")
  return loss, dict(aux, clip_fraction=sg(masked_mean(clipped, mask, "token")))


def sampled_token_terms(
  student_logp, teacher_logp, behaviour_logp, extra_advantage, clip_eps, icepop_c, kl_weight=1.0
):
  """Elementwise part of :func:`sampled_token_loss` -> ``(per_token_loss, aux)``, all shaped
  like ``student_logp`` (``extra_advantage`` broadcasts); aux holds ``clipped`` (1 where the
  PPO clip is active) instead of the reduced ``clip_fraction``. The advantage is
  :func:`combined_advantage`: ``kl_weight · (−k1) + extra_advantage``."""
  student_logp = student_logp.astype(jnp.float32)
  k1 = student_logp - sg(teacher_logp.astype(jnp.float32))
  advantage = -kl_weight * sg(k1)
  if extra_advantage is not None:
    advantage = advantage + sg(extra_advantage.astype(jnp.float32))

  clipped = jnp.zeros_like(student_logp)
  if behaviour_logp is None:
    ratio = jnp.ones_like(student_logp)
    per_token = -advantage * student_logp
  else:
    ratio = jnp.exp(student_logp - sg(behaviour_logp.astype(jnp.float32)))
    unclipped_obj = ratio * advantage
    if clip_eps is None:
      per_token = -unclipped_obj
    else:
      clipped_obj = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantage
      per_token = -jnp.minimum(unclipped_obj, clipped_obj)
      clipped = (clipped_obj < unclipped_obj).astype(jnp.float32)

  masked = icepop_mask(ratio, icepop_c)
  per_token = per_token * (1.0 - masked)
  aux = {
    "k1": sg(k1),
    "advantage": advantage,
    "ratio": sg(ratio),
    "icepop_masked": masked,
    "per_token_loss": sg(per_token),
    "clipped": sg(clipped),
  }
  return per_token, aux


def icepop_mask(ratio, c: float | None):
  """1 where the importance ratio ``r = q/π`` leaves ``[1/c, c]`` (IcePop: such tokens carry
  a train/inference mismatch too large to trust and get no gradient), else 0; all 0 when
  ``c`` is None. stop_gradient'ed, shaped like ``ratio``."""
  if c is None:
    return jnp.zeros_like(ratio)
  r = sg(ratio)
  return ((r < 1.0 / c) | (r > c)).astype(jnp.float32)


def overlap_aware_loss(
  dense,
  student_logp,
  teacher_logp,
  gate,
  mask,
  normalize: str = "token",
  behaviour_logp=None,
  icepop_c: float | None = None,
):
  """The "overlap_aware" loss from per-token terms -> ``(loss, aux)``.

  ``l_t = g_t * RKL_t + (1 - g_t) * (-sg(r_t A_t) * log p_s(x_t))`` with ``RKL_t`` the
  full-vocab reverse KL(Q||P) at position t (``dense``), ``A_t = -(log p_s(x_t) -
  log p_t(x_t))``, ``r_t = q(x_t) / π(x_t)`` (1 without ``behaviour_logp``) and a gate
  ``g_t`` in [0, 1] that depends on the context only (:func:`overlap_gate`), so

    E_{x~π}[∇l_t] = g_t ∇RKL_t + (1 - g_t) ∇RKL_t = ∇RKL_t:

  the gate mixes two estimators of the same reverse-KL gradient, the dense one where the
  student's tokens are on the teacher's support and the sampled one where they are not.
  Reduced with :func:`masked_mean` (``normalize``). ``behaviour_logp`` is log π(x_t) of the
  distribution the token was sampled from.

  All inputs ``[B, T]``. aux: ``on_support`` (g), ``dense_term``, ``sampled_term``,
  ``k1``, ``advantage``, ``per_token_loss`` (all stop_gradient'ed).
  """
  for name, x in (("dense", dense), ("teacher_logp", teacher_logp), ("gate", gate), ("mask", mask)):
    _check_same_shape("student_logp", student_logp, name, x)
  if behaviour_logp is not None:
    _check_same_shape("behaviour_logp", behaviour_logp, "student_logp", student_logp)
  per_token, aux = overlap_aware_terms(
    dense, student_logp, teacher_logp, gate, behaviour_logp, icepop_c
  )
  return masked_mean(per_token, mask, normalize), aux


def overlap_aware_terms(dense, student_logp, teacher_logp, gate, behaviour_logp, icepop_c):
  """Elementwise part of :func:`overlap_aware_loss` -> ``(per_token_loss, aux)``."""
  student_logp = student_logp.astype(jnp.float32)
  gate = sg(gate.astype(jnp.float32))
  k1 = student_logp - sg(teacher_logp.astype(jnp.float32))
  advantage = -sg(k1)
  ratio = jnp.ones_like(student_logp)
  if behaviour_logp is not None:
    ratio = sg(jnp.exp(student_logp - behaviour_logp.astype(jnp.float32)))
  masked = icepop_mask(ratio, icepop_c)
  sampled = -advantage * ratio * (1.0 - masked) * student_logp
  dense = dense.astype(jnp.float32)
  per_token = gate * dense + (1.0 - gate) * sampled
  aux = {
    "on_support": gate,
    "ratio": ratio,
    "icepop_masked": masked,
    "dense_term": sg(dense),
    "sampled_term": sg(sampled),
    "k1": sg(k1),
    "advantage": advantage,
    "per_token_loss": sg(per_token),
  }
  return per_token, aux


# --------------------------------------------------------------------------
# RL: group advantages, the combined advantage, the k3 KL estimator
# --------------------------------------------------------------------------


def group_advantages(rewards, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6):
  """GRPO advantages of ``rewards [N]``, N = prompts × ``group_size`` consecutive samples of
  one prompt: ``r − mean(group)``, divided by ``std(group) + eps`` with ``normalize_std``
  (Dr. GRPO turns that off). An all-correct or all-wrong group gets 0."""
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim != 1 or rewards.shape[0] % group_size:
    raise ValueError(
      f"rewards shape {rewards.shape} is not a whole number of groups of {group_size}"
    )
  groups = rewards.reshape(-1, group_size)
  centred = groups - groups.mean(axis=1, keepdims=True)
  if normalize_std:
    centred = centred / (groups.std(axis=1, keepdims=True) + eps)
  return centred.reshape(-1)


def combined_advantage(k1, reward_advantage, *, kl_weight: float, reward_weight: float = 1.0):
  """Per-token advantage of the unified objective (Nemotron-3-Ultra style), ``[B, T]``:
  ``reward_weight · A_reward[b] + kl_weight · (−k1[b, t])`` with ``A_reward [B]`` the group
  advantage of each sequence and ``k1 = log p_s(x) − log p_t(x)`` the sampled-token
  distillation advantage's negation. ``kl_weight = 0`` is pure GRPO; ``reward_weight = 0``
  pure sampled-token OPD. (The kernel computes this as ``kl_weight`` in
  :class:`LossSettings` with ``extra_advantage = reward_weight · A_reward[:, None]``.)"""
  return reward_weight * reward_advantage[:, None] - kl_weight * sg(k1)


def k3_kl(student_logp, reference_logp):
  """Per-token k3 estimator of KL(q‖ref) from the sampled tokens' log-probs ``[...]``:
  ``exp(ref − q) − (ref − q) − 1`` ≥ 0, whose expectation over x ~ q is exactly KL(q‖ref)."""
  d = reference_logp.astype(jnp.float32) - student_logp.astype(jnp.float32)
  return jnp.exp(d) - d - 1.0


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
):
  """Applies ``fn`` to student/teacher logits built chunk by chunk along T.

  Shapes: ``student_hidden [B, T, Ds]``, ``student_unembed [Ds, V]``,
  ``teacher_hidden [B, T, Dt]``, ``teacher_unembed [Dt, V]``, ``targets [B, T]``
  int, optional biases ``[V]``. ``fn(student_logits [B, C, V] f32,
  teacher_logits [B, C, V] f32, targets [B, C]) -> pytree of [B, C]``; the
  result is that pytree with ``[B, T]`` leaves.

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

  @jax.checkpoint
  def chunk_values(weights, chunk):
    s_unembed, s_bias, t_unembed, t_bias = weights
    s_hidden, t_hidden, chunk_targets = chunk
    return fn(
      project_logits(s_hidden, s_unembed, s_bias),
      project_logits(t_hidden, t_unembed, t_bias),
      chunk_targets,
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


# --------------------------------------------------------------------------
# distill_loss: one entry point for every loss kind
# --------------------------------------------------------------------------


def support_diagnostics(
  student_logp, teacher_logp, targets, topks=(1, 8), floor_prob=1e-3, top_p=0.9, student_topks=None
):
  """Per-token support-overlap diagnostics from log-probs ``[..., V]`` (stop_gradient'ed).

  ``targets [...]`` are the sampled tokens. Returns ``[...]`` arrays: ``teacher_logp`` /
  ``student_logp`` of the target; ``in_teacher_top{k}`` for k in ``topks`` (inside if
  fewer than k teacher log-probs strictly exceed the target's); ``in_teacher_top_p``
  (inside the teacher's top-p nucleus: the teacher mass on strictly more probable tokens
  is below ``top_p``); ``off_support`` (teacher prob of the target < ``floor_prob``);
  full-vocab ``reverse_kl`` KL(s‖t) and ``forward_kl`` KL(t‖s); ``tv`` total variation;
  ``teacher_mass_on_student_top{k}`` for k in ``student_topks`` (default ``topks``).

  Calibrated (1 for a student identical to the teacher at any entropy and vocabulary size,
  0 for disjoint supports; see :func:`calibrated_overlap`): ``overlap``,
  ``nucleus_coverage``; and ``excess_xent`` (nats, 0 when identical). The raw top-k and
  floor metrics above measure the teacher's entropy and the vocabulary size as much as
  overlap: they are detail, not readings.
  """
  student_logp, teacher_logp = sg(student_logp), sg(teacher_logp)
  vocab = student_logp.shape[-1]
  s_prob, t_prob = jnp.exp(student_logp), jnp.exp(teacher_logp)
  teacher_target = token_logp(teacher_logp, targets)
  above = teacher_logp > teacher_target[..., None]
  rank = jnp.sum(above, axis=-1)
  mass_above = jnp.sum(jnp.where(above, t_prob, 0.0), axis=-1)
  out = {
    "teacher_logp": teacher_target,
    "student_logp": token_logp(student_logp, targets),
    "in_teacher_top_p": (mass_above < top_p).astype(jnp.float32),
    "off_support": (teacher_target < math.log(floor_prob)).astype(jnp.float32),
    "reverse_kl": _kl_from_logp(student_logp, teacher_logp),
    "forward_kl": _kl_from_logp(teacher_logp, student_logp),
    "tv": 0.5 * jnp.sum(jnp.abs(s_prob - t_prob), axis=-1),
    **calibrated_overlap(student_logp, teacher_logp, top_p),
  }
  for k in topks:
    out[f"in_teacher_top{k}"] = (rank < k).astype(jnp.float32)
  student_topks = tuple(topks) if student_topks is None else tuple(student_topks)
  if student_topks:
    kmax = min(max(student_topks), vocab)
    _, top_idx = jax.lax.top_k(student_logp, kmax)
    cum = jnp.cumsum(jnp.take_along_axis(t_prob, top_idx, axis=-1), axis=-1)
    for k in student_topks:
      out[f"teacher_mass_on_student_top{k}"] = cum[..., min(k, vocab) - 1]
  return out


def teacher_nucleus(teacher_logp, top_p: float, iterations: int = 24):
  """Boolean ``[..., V]``: the teacher's top-p nucleus, ``{v: log P(v) >= τ}`` with τ the
  largest threshold whose set still holds mass ``>= top_p``.

  τ is found by bisection on the log-probability (``iterations`` masked sums over the
  vocabulary) rather than a sort, which costs far more at large V on CPUs; the set can
  exceed the exact nucleus only by tokens within ``(max − min log-prob) / 2**iterations``
  of its edge.
  """
  t_prob = jnp.exp(teacher_logp)
  hi = jnp.max(teacher_logp, axis=-1)
  lo = jnp.min(teacher_logp, axis=-1) - 1.0  # the whole vocabulary: mass 1 >= top_p

  def step(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    mass = jnp.sum(jnp.where(teacher_logp >= mid[..., None], t_prob, 0.0), axis=-1)
    enough = mass >= top_p
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  lo, hi = jax.lax.fori_loop(0, iterations, step, (lo, hi))
  top_only = jnp.sum(jnp.where(teacher_logp >= hi[..., None], t_prob, 0.0), axis=-1) >= top_p
  edge = jnp.where(top_only, hi, lo)
  return teacher_logp >= edge[..., None]


def calibrated_overlap(student_logp, teacher_logp, top_p: float = 0.9) -> dict:
  """Per-position overlap of student Q and teacher P, from log-probs ``[..., V]`` → ``[...]``.

  * ``overlap`` = Σ_v min(Q(v), P(v)) = 1 − TV(Q, P): the probability mass the two share.
    1 iff Q = P, 0 iff their supports are disjoint, and it falls as they move apart.
  * ``nucleus_coverage`` = min(1, Q(N) / P(N)), N the teacher's top-p nucleus: the share
    of the mass the teacher itself puts on its nucleus that the student's samples would
    land in (the expectation of ``in_teacher_top_p`` under Q, divided by its value under P).
    1 when Q = P whatever the entropy, 0 when Q puts nothing on N.
  * ``excess_xent`` = E_{x~Q}[−log P(x)] − H(P) in nats: the teacher log-loss of student
    tokens beyond the teacher's own; 0 when Q = P (negative when Q is sharper than P on
    P's mode).
  All are exact expectations over the vocabulary, not one-sample estimates.
  """
  s_prob, t_prob = jnp.exp(student_logp), jnp.exp(teacher_logp)
  nucleus = teacher_nucleus(teacher_logp, top_p)
  t_mass = jnp.sum(jnp.where(nucleus, t_prob, 0.0), axis=-1)
  s_mass = jnp.sum(jnp.where(nucleus, s_prob, 0.0), axis=-1)
  t_entropy = -jnp.sum(t_prob * teacher_logp, axis=-1)
  return {
    "overlap": jnp.sum(jnp.minimum(s_prob, t_prob), axis=-1),
    "nucleus_coverage": jnp.minimum(1.0, s_mass / t_mass),
    "excess_xent": -jnp.sum(s_prob * teacher_logp, axis=-1) - t_entropy,
  }


def overlap_gate(student_logp, teacher_logp, criterion: str, topk: int, floor_prob: float):
  """Per-position gate ``g`` in [0, 1] of the "overlap_aware" loss, stop_gradient'ed ``[...]``.

  From temperature-1 log-probs ``[..., V]``. The gate depends on the *context only*, never
  on the sampled token, so mixing the dense and the sampled term with it keeps the expected
  gradient equal to the reverse-KL gradient (see :func:`overlap_aware_loss`):

  * "teacher_topk": Q(top-k of P), the probability that the student's token lands in the
    teacher's top-``topk`` (the expectation over x ~ Q of "x is in the teacher's top-k");
  * "floor": Q({v: P(v) >= floor_prob}), likewise for "the teacher gives x at least
    ``floor_prob``";
  * "soft": P(top-k of Q), the teacher's mass on the student's top-``topk`` tokens.

  Exactly 1 when every token is inside, exactly 0 when none is.
  """
  _check_choice("overlap_criterion", criterion, OVERLAP_CRITERIA)
  student_logp, teacher_logp = sg(student_logp), sg(teacher_logp)
  vocab = student_logp.shape[-1]
  if criterion == "soft":
    _, top_idx = jax.lax.top_k(student_logp, min(int(topk), vocab))
    mass = jnp.sum(jnp.exp(jnp.take_along_axis(teacher_logp, top_idx, axis=-1)), axis=-1)
    return jnp.clip(mass, 0.0, 1.0)
  if criterion == "teacher_topk":
    inside = _topk_mask(teacher_logp, min(int(topk), vocab))
  else:
    log_floor = math.log(floor_prob) if floor_prob > 0 else -math.inf
    inside = teacher_logp >= log_floor
  s_prob = jnp.exp(student_logp)
  mass_in = jnp.sum(jnp.where(inside, s_prob, 0.0), axis=-1)
  mass_out = jnp.sum(jnp.where(inside, 0.0, s_prob), axis=-1)
  return mass_in / (mass_in + mass_out)


def _make_token_fn(settings: LossSettings, diagnostics=True):
  """The per-chunk function: logits -> {"loss_terms": ..., "diagnostics": ...}.

  ``diagnostics``: True, False, or a traced bool (one compiled step serves logging steps and
  the others): when false the support diagnostics are zeros and cost nothing, except the
  sampled tokens' ``teacher_logp`` / ``student_logp``, which are always there.
  """
  s = settings

  def token_fn(student_logits, teacher_logits, targets):
    student_logp = log_softmax(student_logits)
    teacher_logp = log_softmax(teacher_logits)
    if s.temperature == 1.0:
      s_tau, t_tau = student_logp, teacher_logp
    else:
      s_tau = log_softmax(student_logits, s.temperature)
      t_tau = log_softmax(teacher_logits, s.temperature)
    if s.loss == "sampled_token":
      terms = {
        "student_logp": token_logp(s_tau, targets),
        "teacher_logp": token_logp(t_tau, targets),
      }
    elif s.loss == "reverse_kl":
      terms = {"per_token_loss": _kl_from_logp(s_tau, t_tau)}
    elif s.loss == "forward_kl":
      terms = {"per_token_loss": _kl_from_logp(t_tau, s_tau)}
    elif s.loss == "jsd":
      terms = {"per_token_loss": _jsd_from_logp(s_tau, t_tau, s.beta)}
    elif s.loss == "overlap_aware":
      terms = {
        "dense": _kl_from_logp(s_tau, t_tau),
        "student_logp": token_logp(s_tau, targets),
        "teacher_logp": token_logp(t_tau, targets),
        "gate": overlap_gate(
          student_logp,
          teacher_logp,
          s.overlap_criterion,
          s.overlap_topk,
          s.overlap_floor_prob,
        ),
      }
    else:
      terms = {
        "per_token_loss": _topk_kl_from_logp(
          s_tau, t_tau, s.k, s.topk_support, s.topk_tail, s.topk_direction
        )
      }

    def full_diagnostics():
      return support_diagnostics(
        student_logp, teacher_logp, targets, tuple(s.diag_topk), s.diag_floor_prob, s.diag_top_p
      )

    if diagnostics is True:
      diag = full_diagnostics()
    else:
      shapes = jax.eval_shape(full_diagnostics)
      zeros = lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
      diag = zeros() if diagnostics is False else jax.lax.cond(diagnostics, full_diagnostics, zeros)
      diag["teacher_logp"] = sg(token_logp(teacher_logp, targets))
      diag["student_logp"] = sg(token_logp(student_logp, targets))
    return {"loss_terms": terms, "diagnostics": diag}

  return token_fn


def _per_token_loss_fn(settings: LossSettings, diagnostics):
  """Chunk function: logits → ``(per_token_loss [B, C], aux and diagnostics {name: [B, C]})``,
  with the sampled estimators' elementwise terms applied (so the loss is ``Σ_t c_t l_t``)."""
  token_fn = _make_token_fn(settings, diagnostics)

  def fn(student_logits, teacher_logits, targets, behaviour_logp, extra_advantage):
    out = token_fn(student_logits, teacher_logits, targets)
    terms = out["loss_terms"]
    if settings.loss == "sampled_token":
      per_token, aux = sampled_token_terms(
        terms["student_logp"],
        terms["teacher_logp"],
        behaviour_logp,
        extra_advantage,
        settings.clip_eps,
        settings.icepop_c,
        settings.kl_weight,
      )
    elif settings.loss == "overlap_aware":
      per_token, aux = overlap_aware_terms(
        terms["dense"],
        terms["student_logp"],
        terms["teacher_logp"],
        terms["gate"],
        behaviour_logp,
        settings.icepop_c,
      )
    else:
      per_token = terms["per_token_loss"]
      aux = {"per_token_loss": sg(per_token)}
    return per_token, dict(out["diagnostics"], **aux)

  return fn


def _fused_pass(settings: LossSettings, student, fixed: dict, with_grad: bool):
  """One pass over the chunks: the loss ``Σ_t c_t l_t``, the per-token aux ``[B, T]`` and,
  with ``with_grad``, the loss's gradients wrt ``student = (hidden, unembed, bias)``.

  The gradients are taken chunk by chunk inside the forward pass (``jax.vjp`` of the chunk),
  so no chunk is recomputed: each vocabulary projection (student's and teacher's) happens
  once, and at most one chunk's ``[B, C, V]`` logits are live.
  """
  s_hidden, s_unembed, s_bias = student
  targets = fixed["targets"]
  length = targets.shape[1]
  chunk_size = chunk_positions(settings.chunk_size, targets.shape[0], length, s_unembed.shape[-1])
  n_chunks = -(-length // chunk_size)
  per_row = dict(
    s_hidden=s_hidden,
    t_hidden=fixed["t_hidden"],
    targets=targets,
    weights=fixed["weights"],
    behaviour_logp=fixed["behaviour_logp"],
    extra_advantage=fixed["extra_advantage"],
  )
  chunks = {k: _split_chunks(v, n_chunks, chunk_size) for k, v in per_row.items() if v is not None}
  fn = _per_token_loss_fn(settings, fixed["diagnostics"])

  def chunk_loss(logits, teacher_logits, c):
    per_token, aux = fn(
      logits,
      teacher_logits,
      c["targets"],
      c.get("behaviour_logp"),
      c.get("extra_advantage"),
    )
    weights = c["weights"]
    return jnp.sum(jnp.where(weights != 0, weights * per_token, 0.0)), aux

  def body(carry, c):
    teacher_logits = project_logits(c["t_hidden"], fixed["t_unembed"], fixed["t_bias"])
    logits = project_logits(c["s_hidden"], s_unembed, s_bias)
    if not with_grad:
      value, aux = chunk_loss(logits, teacher_logits, c)
      return carry + value, aux
    total, d_unembed, d_bias = carry
    value, vjp, aux = jax.vjp(lambda lg: chunk_loss(lg, teacher_logits, c), logits, has_aux=True)
    (d_logits,) = vjp(jnp.ones_like(value))  # [B, C, V] f32
    # The projection's two gradients as explicit contractions: d_logits is read in its own
    # layout (autodiff's transpose of the unembedding grad made XLA:CPU write a transposed
    # [V, B*C] copy of it, the step's slowest op).
    f32 = jnp.float32
    g_hidden = jnp.einsum("bcv,dv->bcd", d_logits, s_unembed, preferred_element_type=f32)
    g_unembed = jnp.einsum("bcd,bcv->dv", c["s_hidden"], d_logits, preferred_element_type=f32)
    g_bias = None if s_bias is None else jnp.sum(d_logits, (0, 1))
    carry = (total + value, d_unembed + g_unembed, jax.tree.map(jnp.add, d_bias, g_bias))
    return carry, (aux, g_hidden.astype(s_hidden.dtype))

  zero = jnp.zeros((), jnp.float32)
  if not with_grad:
    total, aux = jax.lax.scan(body, zero, chunks)
    return total, jax.tree.map(lambda y: _merge_chunks(y, length), aux), None
  init = (
    zero,
    jnp.zeros(s_unembed.shape, jnp.float32),
    jax.tree.map(lambda b: jnp.zeros(b.shape, jnp.float32), s_bias),
  )
  (total, d_unembed, d_bias), (aux, g_hidden) = jax.lax.scan(body, init, chunks)
  d_unembed = d_unembed.astype(s_unembed.dtype)
  d_bias = jax.tree.map(lambda g, b: g.astype(b.dtype), d_bias, s_bias)
  grads = (_merge_chunks(g_hidden, length), d_unembed, d_bias)
  return total, jax.tree.map(lambda y: _merge_chunks(y, length), aux), grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_loss(settings: LossSettings, student, fixed: dict):
  """``(loss, aux)`` of :func:`_fused_pass`; differentiable wrt ``student`` only."""
  total, aux, _ = _fused_pass(settings, student, fixed, with_grad=False)
  return total, aux


def _fused_loss_fwd(settings, student, fixed):
  total, aux, grads = _fused_pass(settings, student, fixed, with_grad=True)
  return (total, aux), grads


def _fused_loss_bwd(settings, grads, cotangents):
  del settings
  scale = cotangents[0]  # aux is stop-gradient'ed: its cotangents are dropped
  return jax.tree.map(lambda g: (scale * g).astype(g.dtype), grads), None


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


def distill_loss(
  student_hidden,
  student_unembed,
  teacher_hidden,
  teacher_unembed,
  targets,
  mask,
  settings: LossSettings,
  *,
  behaviour_logp=None,
  extra_advantage=None,
  student_bias=None,
  teacher_bias=None,
  diagnostics=True,
  fused: bool = True,
):
  """Distillation loss from hidden states, chunked over T -> ``(loss, diagnostics)``.

  Shapes as :func:`chunked_token_values` (``student_hidden [B, T, Ds]``, ``student_unembed
  [Ds, V]``, ``teacher_hidden [B, T, Dt]``, ``teacher_unembed [Dt, V]``, ``targets [B, T]``);
  ``mask [B, T]``; logits for position t score ``targets[:, t]``. ``settings.loss``:

  * "sampled_token": log p_s(x_t), log p_t(x_t) at ``temperature`` from the
    chunked pass, then :func:`sampled_token_loss`. ``behaviour_logp [B, T]`` = log π(x_t),
    the log-prob of each token under the distribution it was sampled from (the sampler's
    ``sampling_logprobs``: its temperature, top-k and top-p), makes the estimator
    importance-weighted by q(x)/π(x), so its expected gradient is the reverse-KL gradient
    whatever the sampling settings (see docs/design.md for top-k/top-p). ``settings.clip_eps``
    adds the PPO clip on that ratio. ``extra_advantage`` with another loss is a ValueError.
  * "reverse_kl" / "forward_kl" / "jsd" (``beta``) / "topk" (``k``,
    ``topk_support``, ``topk_tail``, ``topk_direction``): per-token terms at
    ``temperature`` reduced with :func:`masked_mean` (``normalize``).
  * "overlap_aware" (``overlap_criterion``, ``overlap_topk``,
    ``overlap_floor_prob``): dense reverse KL where the sampled token is on the
    teacher's support, sampled-token term elsewhere; see
    :func:`overlap_aware_loss` and :func:`overlap_gate`.

  Gradients flow to the student hidden states, unembedding and bias only.
  diagnostics (all stop_gradient'ed, ``[B, T]`` unless noted, temperature 1,
  unmasked): ``teacher_logp``, ``student_logp`` (log-probs of the target),
  full-vocab ``reverse_kl`` and ``forward_kl``, ``in_teacher_top{k}`` for each k in
  ``diag_topk`` (1.0 if fewer than k teacher log-probs exceed the target's),
  ``off_support`` (teacher prob of target < ``diag_floor_prob``), ``in_teacher_top_p``
  (``diag_top_p``), ``tv`` and ``teacher_mass_on_student_top{k}`` (see
  :func:`support_diagnostics`),
  ``per_token_loss``; for "sampled_token" also ``k1``, ``advantage``, ``ratio``
  and the scalar ``clip_fraction``; for "overlap_aware" also ``on_support`` (the
  gate g_t), ``dense_term``, ``sampled_term``, ``k1`` and ``advantage``.
  ``diagnostics`` (True, False or a traced bool): with false the support diagnostics other
  than ``teacher_logp`` / ``student_logp`` are zeros and are not computed (logging steps
  only, one compile for both).
  """
  if not isinstance(settings, LossSettings):
    raise TypeError(f"settings must be a losses.LossSettings, got {type(settings).__name__}")
  settings.validate(vocab=student_unembed.shape[-1])
  _check_same_shape("mask", mask, "targets", targets)
  if settings.loss != "sampled_token" and extra_advantage is not None:
    raise ValueError(
      f"extra_advantage applies only to loss='sampled_token', got loss={settings.loss!r}"
    )
  if settings.chunk_size is not None and fused:
    return _fused_distill_loss(
      student_hidden,
      student_unembed,
      teacher_hidden,
      teacher_unembed,
      targets,
      mask,
      settings,
      behaviour_logp,
      extra_advantage,
      student_bias,
      teacher_bias,
      diagnostics,
    )
  args = (student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets)
  biases = dict(student_bias=student_bias, teacher_bias=teacher_bias)
  token_fn = _make_token_fn(settings, diagnostics)
  if settings.chunk_size is None:
    values = _full_token_values(token_fn, *args, **biases)
  else:
    values = chunked_token_values(token_fn, *args, chunk_size=settings.chunk_size, **biases)
  terms, diagnostics = values["loss_terms"], values["diagnostics"]
  if settings.loss == "sampled_token":
    value, aux = sampled_token_loss(
      terms["student_logp"],
      terms["teacher_logp"],
      mask,
      behaviour_logp=behaviour_logp,
      clip_eps=settings.clip_eps,
      extra_advantage=extra_advantage,
      normalize=settings.normalize,
      icepop_c=settings.icepop_c,
    )
    diagnostics.update(aux)
  elif settings.loss == "overlap_aware":
    value, aux = overlap_aware_loss(
      terms["dense"],
      terms["student_logp"],
      terms["teacher_logp"],
      terms["gate"],
      mask,
      normalize=settings.normalize,
      behaviour_logp=behaviour_logp,
      icepop_c=settings.icepop_c,
    )
    diagnostics.update(aux)
  else:
    value = masked_mean(terms["per_token_loss"], mask, settings.normalize)
    diagnostics["per_token_loss"] = sg(terms["per_token_loss"])
  return value, diagnostics


def _fused_distill_loss(
  student_hidden,
  student_unembed,
  teacher_hidden,
  teacher_unembed,
  targets,
  mask,
  settings,
  behaviour_logp,
  extra_advantage,
  student_bias,
  teacher_bias,
  diagnostics,
):
  """The chunked path of :func:`distill_loss` through :func:`_fused_loss`."""
  _check_unembed_shapes(
    student_hidden,
    student_unembed,
    teacher_hidden,
    teacher_unembed,
    targets,
    student_bias,
    teacher_bias,
  )
  if settings.clip_eps is not None and behaviour_logp is None and settings.loss == "sampled_token":
    raise ValueError("clip_eps requires behaviour_logp (the PPO clip is on r)")
  for name, x in (("behaviour_logp", behaviour_logp),):
    if x is not None:
      _check_same_shape(name, x, "targets", targets)
  if extra_advantage is not None:
    _check_extra_advantage(extra_advantage, targets.shape)
    extra_advantage = jnp.broadcast_to(extra_advantage, targets.shape)
  fixed = dict(
    t_hidden=sg(teacher_hidden),
    t_unembed=sg(teacher_unembed),
    t_bias=None if teacher_bias is None else sg(teacher_bias),
    targets=targets,
    weights=token_weights(mask, settings.normalize),
    behaviour_logp=None if behaviour_logp is None else sg(behaviour_logp),
    extra_advantage=None if extra_advantage is None else sg(extra_advantage),
    diagnostics=jnp.asarray(diagnostics),
  )
  value, aux = _fused_loss(settings, (student_hidden, student_unembed, student_bias), fixed)
  if "clipped" in aux:
    aux["clip_fraction"] = sg(masked_mean(aux.pop("clipped"), mask, "token"))
  return value, aux


def unchunked_distill_loss(*args, **kwargs):
  """Naive :func:`distill_loss`: materialises full ``[B, T, V]`` logits, no remat.

  Same arguments and results (``settings.chunk_size`` is ignored). The test reference for
  the chunked kernel and the "naive" line of the memory bench.
  """
  args = list(args)
  if len(args) >= 7:
    args[6] = args[6].replace(chunk_size=None)
  else:
    kwargs["settings"] = kwargs["settings"].replace(chunk_size=None)
  return distill_loss(*args, **kwargs)

"""Sampled-token estimators and the RL advantages.

The sampled-token (k1) loss and the "overlap_aware" loss from per-token log-probs of the
sampled tokens (their ``*_terms`` functions are the elementwise parts the fused kernel
runs per chunk), the IcePop mask of the importance ratio q/π, GRPO group advantages, the
combined (reward + distillation) advantage and the k3 KL estimator. Inputs are ``[B, T]``;
the formulas and expected gradients are in docs/design.md#the-losses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdistill.losses.divergences import masked_mean
from jdistill.losses.settings import NORMALIZE_MODES, _check_choice, _check_same_shape

sg = jax.lax.stop_gradient


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
  kl_weight: float = 1.0,
  baseline=None,
):
  """Sampled-token (k1) on-policy distillation loss -> ``(loss scalar, aux)``.

  Inputs are ``[B, T]``: ``student_logp`` = log p_s(x_t) (differentiable),
  ``teacher_logp`` = log p_t(x_t), ``mask`` the completion mask.

  * k1 = student_logp - teacher_logp (the per-token reverse-KL estimator).
  * Advantage A = -kl_weight · stop_gradient(k1 − b) (+ stop_gradient(extra_advantage),
    shape ``[B, T]`` or ``[B, 1]``, e.g. an RL sequence reward), where the baseline
    ``baseline`` b ``[B, T]`` (default 0) depends on the context only, e.g. the exact
    per-position KL(q || p_T): E_x[b ∇log q(x)] = 0, so the expected gradient is unchanged
    and only the variance moves. A is the same in every
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
  if baseline is not None:
    _check_same_shape("baseline", baseline, "student_logp", student_logp)
  per_token, aux = sampled_token_terms(
    student_logp,
    teacher_logp,
    behaviour_logp,
    extra_advantage,
    clip_eps,
    icepop_c,
    kl_weight,
    baseline,
  )
  loss = masked_mean(per_token, mask, normalize)
  clipped = aux.pop("clipped")
  return loss, dict(aux, clip_fraction=sg(masked_mean(clipped, mask, "token")))


def sampled_token_terms(
  student_logp,
  teacher_logp,
  behaviour_logp,
  extra_advantage,
  clip_eps,
  icepop_c,
  kl_weight=1.0,
  baseline=None,
):
  """Elementwise part of :func:`sampled_token_loss` -> ``(per_token_loss, aux)``, all shaped
  like ``student_logp`` (``extra_advantage`` broadcasts); aux holds ``clipped`` (1 where the
  PPO clip is active) instead of the reduced ``clip_fraction``. The advantage is
  :func:`combined_advantage`: ``kl_weight · (−(k1 − baseline)) + extra_advantage``."""
  student_logp = student_logp.astype(jnp.float32)
  k1 = student_logp - sg(teacher_logp.astype(jnp.float32))
  centred = k1 if baseline is None else k1 - baseline.astype(jnp.float32)
  advantage = -kl_weight * sg(centred)
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

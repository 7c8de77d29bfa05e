"""Support overlap of student and teacher: the per-token diagnostics every loss logs, the
teacher's top-p nucleus, the calibrated overlap readings and the gate of the
"overlap_aware" loss.

All from log-probs ``[..., V]`` → ``[...]`` and stop_gradient'ed (or boolean).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jdistill.losses.divergences import _kl_from_logp, _topk_mask, token_logp
from jdistill.losses.settings import OVERLAP_CRITERIA, _check_choice

sg = jax.lax.stop_gradient


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

"""Support-overlap diagnostics: do the student's rollouts fall on each teacher's support?

On-policy distillation grades tokens the *student* sampled. That signal is only
meaningful where those tokens lie inside the teacher's support (tokens the teacher
itself would give real probability). This module measures that, per token, per
teacher and per domain, before or during training.

Per-token metrics (:func:`overlap_token_metrics`, all float32 ``[B, C]``; P =
teacher, Q = student, x = the sampled token, softmax in float32 at temperature 1)
--------------------------------------------------------------------------------
* ``teacher_logp``       log P(x).
* ``student_logp``       log Q(x).
* ``in_teacher_top{k}``  1 if x is among the teacher's top-k: fewer than k teacher
                         logits are *strictly* greater than x's (ties count inside).
* ``in_teacher_top_p``   1 if x is inside the teacher's top-p nucleus (the smallest
                         set of most probable tokens whose mass reaches ``top_p``):
                         the teacher mass of tokens strictly more probable than x is
                         < ``top_p``.
* ``off_support``        1 if P(x) < ``floor_prob``.
* ``reverse_kl``         KL(Q||P) over the full vocabulary; ``forward_kl`` KL(P||Q).
* ``tv``                 total variation 1/2 sum_v |Q(v) - P(v)|.
* ``teacher_mass_on_student_top{k}``  sum of P over the student's k most probable
                         tokens (exactly k tokens; k is capped at V).

:func:`chunked_overlap_metrics` computes them from hidden states and unembedding
matrices chunk by chunk along T (``losses.chunked_token_values``), so full
``[B, T, V]`` logits never exist; the results are stop_gradient'ed.
:func:`aggregate` reduces them on the host per group (domain or teacher): token-level
masked means, sequence-level means (mean over sequences of the per-sequence masked
mean) and quantiles of ``teacher_logp``.

Alarms and readings (thresholds are ``config.overlap.*``)
--------------------------------------------------------
Only the calibrated metrics decide (``losses.calibrated_overlap``: 1 for a student
identical to the teacher at any entropy and vocabulary size, 0 for disjoint supports):
``overlap`` = 1 − TV and ``nucleus_coverage`` = min(1, Q(N)/P(N)) over the teacher's
top-p nucleus N (token means). The raw top-k coverage and floor rate stay in the tables as
detail: they fall with the teacher's entropy and the vocabulary size even when the
student equals the teacher.

* :func:`overlap_alarms` warns, naming the teacher, when ``overlap < min_overlap`` or
  ``nucleus_coverage < min_nucleus_coverage`` (defaults 0.5 / 0.5). The trainer logs these
  from its per-step per-teacher metrics.
* :func:`reading` classifies a teacher:
  - **off-support** if an alarm fires: *warmup SFT recommended* (on the teacher's
    data, to pull the student onto its support), then a sampled-token or
    overlap-aware loss;
  - **on-support** if ``overlap >= on_support_overlap`` and ``nucleus_coverage >=
    on_support_nucleus_coverage`` (defaults 0.8 / 0.9): *full-vocab reverse KL is fine*;
  - **partially on-support** otherwise: *consider the sampled-token loss or the
    overlap-aware loss*.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jdistill import losses
from jdistill.losses.span import LOG_TINY, log_mass, span_sums

log = logging.getLogger("jdistill")

sg = jax.lax.stop_gradient

QUANTILES = (5, 25, 50, 75, 95)
DEFAULT_THRESHOLDS = dict(
  min_overlap=0.5,
  min_nucleus_coverage=0.5,
  on_support_overlap=0.8,
  on_support_nucleus_coverage=0.9,
)
ON, PARTIAL, OFF = "on-support", "partially on-support", "off-support"
RECOMMENDATIONS = {
  ON: "full-vocab reverse KL is fine",
  PARTIAL: "consider the sampled-token loss or the overlap-aware loss",
  OFF: "warmup SFT recommended (on this teacher's data), then a sampled-token or "
  "overlap-aware loss",
}


# --------------------------------------------------------------------------
# Per-token metrics (pure, jittable)
# --------------------------------------------------------------------------


def _check_metric_args(topks, top_p, floor_prob, student_k=None):
  for k in tuple(topks) + (() if student_k is None else tuple(student_k)):
    if not (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k > 0):
      raise ValueError(f"topks entries must be positive ints, got {tuple(topks)!r}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
  if not 0.0 < floor_prob <= 1.0:
    raise ValueError(f"floor_prob must be in (0, 1], got {floor_prob!r}")


def overlap_token_metrics(
  student_logits,
  teacher_logits,
  targets,
  *,
  topks=(1, 8, 32),
  top_p: float = 0.9,
  floor_prob: float = 1e-3,
  student_topks=None,
) -> dict:
  """Per-token support-overlap metrics (see the module docstring) -> dict of ``[...]``.

  ``student_logits``, ``teacher_logits``: ``[..., V]``; ``targets``: ``[...]`` int
  (the sampled tokens). ``topks`` gives the ``in_teacher_top{k}`` keys;
  ``student_topks`` (default: ``topks``) the ``teacher_mass_on_student_top{k}`` keys.
  """
  student_topks = tuple(topks) if student_topks is None else tuple(student_topks)
  _check_metric_args(topks, top_p, floor_prob, student_topks)
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
      f"student_logits shape {student_logits.shape} != teacher_logits shape {teacher_logits.shape}"
    )
  if targets.shape != student_logits.shape[:-1]:
    raise ValueError(
      f"targets shape {targets.shape} != logits batch shape {student_logits.shape[:-1]}"
    )
  return losses.support_diagnostics(
    losses.log_softmax(student_logits),
    losses.log_softmax(teacher_logits),
    targets,
    tuple(topks),
    floor_prob,
    top_p,
    student_topks,
  )


def chunked_overlap_metrics(
  student_hidden,
  student_unembed,
  teacher_hidden,
  teacher_unembed,
  targets,
  *,
  chunk_size: int,
  student_bias=None,
  teacher_bias=None,
  **metric_kw,
) -> dict:
  """:func:`overlap_token_metrics` from hidden states, chunked along T -> dict of ``[B, T]``.

  Shapes as ``losses.chunked_token_values`` (``student_hidden [B, T, Ds]``,
  ``student_unembed [Ds, V]``, ``teacher_hidden [B, T, Dt]``, ``teacher_unembed
  [Dt, V]``, ``targets [B, T]``); at most ``[B, chunk_size, V]`` logits per model are
  live. ``metric_kw``: ``topks``, ``top_p``, ``floor_prob``, ``student_topks``.
  Results are stop_gradient'ed and unmasked.
  """
  fn = functools.partial(overlap_token_metrics, **metric_kw)
  values = losses.chunked_token_values(
    fn,
    student_hidden,
    student_unembed,
    teacher_hidden,
    teacher_unembed,
    targets,
    chunk_size=chunk_size,
    student_bias=student_bias,
    teacher_bias=teacher_bias,
  )
  return jax.tree.map(sg, values)


# --------------------------------------------------------------------------
# Across tokenizers: single spans on the matched vocabulary, and the span log-ratio
# --------------------------------------------------------------------------

# the log-prob of an empty entry of the coarsened vocabulary: log of float32's smallest normal
# (a mass of 1e-38, nothing in any sum), not -1e30, which would stretch the nucleus bisection
# of `losses.teacher_nucleus` (its range starts at the lowest log-prob) past any resolution
LOG_EMPTY = LOG_TINY  # the dense loss's floor of a log-probability (losses.span)


def coarsened(logp_at, tail_logp, matched):
  """A distribution on the matched student ids plus one tail bucket -> ``[..., Vs + 1]``:
  ``logp_at [..., Vs]`` where ``matched [Vs]``, :data:`LOG_EMPTY` at the other ids, then
  ``tail_logp [...]`` (at least :data:`LOG_EMPTY`) as the last entry."""
  body = jnp.where(matched, logp_at.astype(jnp.float32), LOG_EMPTY)
  tail = jnp.maximum(tail_logp.astype(jnp.float32), LOG_EMPTY)
  return jnp.concatenate([body, tail[..., None]], axis=-1)


def matched_overlap_metrics(
  student_logp,
  teacher_logp_at,
  teacher_tail_logp,
  matched,
  targets,
  *,
  topks=(1, 8, 32),
  top_p: float = 0.9,
  floor_prob: float = 1e-3,
  student_topks=None,
) -> dict:
  """:func:`overlap_token_metrics` across tokenizers, on the matched vocabulary plus a tail
  bucket -> dict of ``[...]``.

  ``student_logp [..., Vs]`` the student's log-probs; ``teacher_logp_at [..., Vs]`` = log
  p(m(v)), the teacher's log-prob of the token matched to each student id v (any finite value
  where ``matched [Vs]`` is false: `step.cross_tokenizer.dense_scores`); ``teacher_tail_logp
  [...]`` = log p̄, the teacher's mass on its ids no student id is matched to; ``targets
  [...]`` the sampled student ids.

  Both distributions are coarsened to the same Vs + 1 outcomes (:func:`coarsened`): each
  matched id, and "anything else" (the student's mass on its unmatched ids, q̄ = 1 − q(M);
  the teacher's p̄). That is the pair whose reverse KL is the dense loss's term
  (`losses.span.matched_reverse_kl_at`), and the metrics keep their calibration: 1 (or 0) for
  two identical distributions, whatever the tokenizers. A sampled id without a match is read
  as the bucket (``teacher_logp`` is then log p̄, ``student_logp`` log q̄).
  """
  matched = jnp.asarray(matched).astype(bool)
  s = student_logp.astype(jnp.float32)
  s_ext = coarsened(s, log_mass(s, ~matched), matched)
  t_ext = coarsened(teacher_logp_at, teacher_tail_logp, matched)
  on = jnp.take(matched, targets.astype(jnp.int32), axis=0)
  bucket = jnp.where(on, targets.astype(jnp.int32), matched.shape[0])
  student_topks = tuple(topks) if student_topks is None else tuple(student_topks)
  _check_metric_args(topks, top_p, floor_prob, student_topks)
  return losses.support_diagnostics(
    s_ext, t_ext, bucket, tuple(topks), floor_prob, top_p, student_topks
  )


def chunked_matched_overlap_metrics(
  student_hidden,
  student_unembed,
  teacher_hidden_at,
  teacher_unembed_at,
  teacher_tail_logp,
  matched,
  targets,
  *,
  chunk_size: int,
  **metric_kw,
) -> tuple[dict, jax.Array]:
  """:func:`matched_overlap_metrics` from hidden states, chunked along T -> (dict of ``[B,
  T]``, ``student_token_logp [B, T]``, log q of each target over the whole vocabulary).

  ``student_hidden [B, T, Ds]``, ``student_unembed [Ds, Vs]``; the teacher as
  `step.cross_tokenizer.dense_scores` returns it: ``teacher_hidden_at [B, T, Dt+1]``,
  ``teacher_unembed_at [Dt+1, Vs]`` (their product is log p(m(v)) at its gated positions),
  ``teacher_tail_logp [B, T]``, ``matched [Vs]``. The values are meaningful at those gated
  positions only (elsewhere the teacher's entries are zeros); stop_gradient'ed."""

  def values(s_logits, t_logp_at, chunk_targets, tail):
    s_logp = losses.log_softmax(s_logits)
    return (
      matched_overlap_metrics(s_logp, t_logp_at, tail, matched, chunk_targets, **metric_kw),
      losses.token_logp(s_logp, chunk_targets),
    )

  out = losses.chunked_token_values(
    values, student_hidden, student_unembed, teacher_hidden_at, teacher_unembed_at, targets,
    chunk_size=chunk_size, extra=teacher_tail_logp,
  )  # fmt: skip
  return jax.tree.map(sg, out)


def span_log_ratio(student_token_logp, teacher_span_logp, student_span, mask) -> dict:
  """The sequence's log-ratio spread over its student tokens, span by span -> dict of ``[B,
  T]`` (0 where a token has no span or ``mask`` is 0).

  ``student_token_logp [B, T]`` log q of each student token; ``teacher_span_logp [B, ≥T]``
  log p_T of each span id (its own tokens summed, `dense_scores`' ``span_logp``);
  ``student_span [B, T]`` (-1: none); ``mask [B, T]``. Each token of span k gets its share
  (1 / the span's student tokens) of ``span_reverse_kl`` = log q(σ_k) − log p_T(σ_k),
  ``span_student_logp`` = log q(σ_k) and ``span_teacher_logp`` = log p_T(σ_k): their token
  mean over the tokens with a span is what `step.cross_tokenizer.span_loss` reports as
  ``reverse_kl``, ``student_logp`` and ``teacher_logp``, and a sequence's mean its k1
  estimate of the sequence reverse KL per token."""
  t = student_span.shape[1]
  has = (student_span >= 0) & (mask != 0)
  span = jnp.where(has, student_span, -1)
  sid = jnp.maximum(student_span, 0)
  at = lambda per_span: jnp.take_along_axis(per_span, sid, axis=1)  # noqa: E731
  q = span_sums(jnp.where(has, student_token_logp.astype(jnp.float32), 0.0), span, t)
  count = span_sums(has.astype(jnp.float32), span, t)
  p = teacher_span_logp[:, :t].astype(jnp.float32)
  share = lambda per_span: jnp.where(has, at(per_span) / jnp.maximum(at(count), 1.0), 0.0)  # noqa: E731
  return sg(
    dict(span_reverse_kl=share(q - p), span_student_logp=share(q), span_teacher_logp=share(p))
  )


# --------------------------------------------------------------------------
# Host-side aggregation (numpy)
# --------------------------------------------------------------------------


def _masked_stats(values: dict, mask: np.ndarray) -> dict:
  """Token means, sequence means and teacher_logp quantiles of ``[S, T]`` values."""
  m = mask.astype(np.float64)
  tokens_per_seq = m.sum(axis=1)
  has = tokens_per_seq > 0
  n_tokens = float(m.sum())
  token_mean, seq_mean = {}, {}
  for key, v in values.items():
    v = np.where(m != 0, np.asarray(v, np.float64), 0.0)
    weighted = (m * v).sum(axis=1)
    token_mean[key] = float(weighted.sum() / n_tokens) if n_tokens else float("nan")
    seq_mean[key] = (
      float(np.mean(weighted[has] / tokens_per_seq[has])) if has.any() else float("nan")
    )
  out = {
    "tokens": int(round(n_tokens)),
    "sequences": int(has.sum()),
    "token_mean": token_mean,
    "sequence_mean": seq_mean,
  }
  if "teacher_logp" in values:
    sel = np.asarray(values["teacher_logp"], np.float64)[m != 0]
    out["teacher_logp_quantiles"] = {
      f"p{q}": (float(np.percentile(sel, q)) if sel.size else float("nan")) for q in QUANTILES
    }
  return out


def aggregate(per_token: Mapping, mask, group, n_groups: int) -> dict[int, dict]:
  """Per-group aggregates of per-token metrics (host side, numpy).

  ``per_token``: dict of ``[B, T]`` arrays; ``mask [B, T]`` (weights, nonzero =
  counted); ``group [B]`` int in ``[0, n_groups)`` (e.g. domain or teacher index).
  Returns ``{g: {"tokens", "sequences", "token_mean": {metric: float},
  "sequence_mean": {metric: float}, "teacher_logp_quantiles": {"p5", "p25", "p50",
  "p75", "p95"}}}``: ``token_mean`` weighs every masked token of the group alike;
  ``sequence_mean`` is the mean over the group's sequences with at least one masked
  token of their per-sequence masked mean. Empty groups give NaN means.
  """
  mask = np.asarray(mask)
  group = np.asarray(group)
  values = {k: np.asarray(v) for k, v in per_token.items()}
  for k, v in values.items():
    if v.shape != mask.shape:
      raise ValueError(f"per_token[{k!r}] shape {v.shape} != mask shape {mask.shape}")
  if group.shape != mask.shape[:1]:
    raise ValueError(f"group shape {group.shape} != (B,) = {mask.shape[:1]}")
  if group.size and (group.min() < 0 or group.max() >= n_groups):
    raise ValueError(f"group values must lie in [0, {n_groups}), got {np.unique(group)}")
  out = {}
  for g in range(n_groups):
    rows = group == g
    out[g] = _masked_stats({k: v[rows] for k, v in values.items()}, mask[rows])
  return out


# --------------------------------------------------------------------------
# Alarms and readings
# --------------------------------------------------------------------------


def _as_float(x) -> float:
  try:
    return float(np.asarray(x))
  except (TypeError, ValueError):
    return float("nan")


def overlap_alarms(
  metrics_per_teacher: Mapping[str, Mapping], *, min_overlap: float, min_nucleus_coverage: float
) -> list[str]:
  """Human-readable warnings for teachers whose rollouts look off their support.

  ``metrics_per_teacher``: ``{teacher: {"overlap": float, "nucleus_coverage": float, ...}}``
  (token means over the student's rollouts on that teacher's rows; other keys are ignored,
  scalars may be jax/numpy). Both metrics are calibrated (1 when the student equals the
  teacher at any entropy, 0 for disjoint supports). A warning fires when ``overlap`` is
  strictly below ``min_overlap`` or ``nucleus_coverage`` strictly below
  ``min_nucleus_coverage``; missing or NaN values never fire.
  """
  alarms = []
  advice = "rollouts look off its support; consider a warmup SFT or a sampled-token loss"
  for name, m in metrics_per_teacher.items():
    overlap = _as_float(m["overlap"]) if "overlap" in m else float("nan")
    nucleus = _as_float(m["nucleus_coverage"]) if "nucleus_coverage" in m else float("nan")
    if overlap < min_overlap:
      alarms.append(
        f"teacher {name!r}: student and teacher share only {overlap:.0%} of their probability "
        f"mass (overlap = 1 - TV; threshold {min_overlap:.0%}) — {advice}"
      )
    if nucleus < min_nucleus_coverage:
      alarms.append(
        f"teacher {name!r}: the student puts only {nucleus:.0%} of the teacher's own mass on "
        f"the teacher's top-p nucleus (threshold {min_nucleus_coverage:.0%}) — {advice}"
      )
  return alarms


def thresholds_from_config(config) -> dict:
  """The reading/alarm thresholds from ``config.overlap`` (defaults where absent)."""
  o = config.overlap
  return {key: (o[key] if key in o else default) for key, default in DEFAULT_THRESHOLDS.items()}


class AlarmTracker:
  """Overlap alarms during training: a console WARNING naming the teacher when it crosses a
  threshold (once, not every step), and a line when it is back within them."""

  def __init__(self, overlap_config):
    o = overlap_config
    self.thresholds = dict(min_overlap=o.min_overlap, min_nucleus_coverage=o.min_nucleus_coverage)
    self.active: set[str] = set()

  def update(self, step: int, metrics_per_teacher: Mapping[str, Mapping]) -> dict[str, bool]:
    """Token-mean metrics per teacher at `step` → whether each teacher's alarm is on."""
    on = {}
    for name, m in metrics_per_teacher.items():
      alarms = overlap_alarms({name: m}, **self.thresholds)
      on[name] = bool(alarms)
      if alarms and name not in self.active:
        for a in alarms:
          log.warning("step %d: %s", step, a)
        self.active.add(name)
      elif not alarms and name in self.active:
        log.info("step %d: teacher %r is back within the overlap thresholds", step, name)
        self.active.discard(name)
    return on


def reading(
  metrics: Mapping,
  *,
  min_overlap: float = 0.5,
  min_nucleus_coverage: float = 0.5,
  on_support_overlap: float = 0.8,
  on_support_nucleus_coverage: float = 0.9,
) -> dict:
  """Classifies one teacher's token-mean metrics -> ``{"verdict", "recommendation", ...}``.

  off-support if an alarm fires (:func:`overlap_alarms`), on-support if ``overlap >=
  on_support_overlap`` and ``nucleus_coverage >= on_support_nucleus_coverage``, partially
  on-support otherwise. Only calibrated metrics decide.
  """
  overlap = _as_float(metrics.get("overlap", float("nan")))
  nucleus = _as_float(metrics.get("nucleus_coverage", float("nan")))
  alarms = overlap_alarms(
    {"_": metrics}, min_overlap=min_overlap, min_nucleus_coverage=min_nucleus_coverage
  )
  if alarms:
    verdict = OFF
  elif overlap >= on_support_overlap and nucleus >= on_support_nucleus_coverage:
    verdict = ON
  else:
    verdict = PARTIAL
  return {
    "verdict": verdict,
    "recommendation": RECOMMENDATIONS[verdict],
    "overlap": overlap,
    "nucleus_coverage": nucleus,
  }

"""The sampled-token estimator across tokenizers: one advantage per aligned span.

A teacher with another tokenizer scores the student's rollout in its own tokens; the
alignment (`jdistill.data.alignment`) cuts both tokenisations into spans that cover the same
text. Per span k, with ``h_k`` the text before it:

  A_k = log p_T(σ_k | h_k) − log q(σ_k | h_k)        (both sums of token log-probs, sg)

is the advantage of every student token of the span, with the sampled-token estimator's
importance ratio, PPO clip and IcePop (`estimators.sampled_token_terms`, which this reuses).
Its expected gradient, on-policy (or off-policy with ``ratio="span"``, the whole span's
q/π), is that of the per-span reverse KL with the history distribution held fixed,

  J(θ) = Σ_k E_{h_k ~ q} [ Σ_σ q_θ(σ | h_k) (log q_θ(σ | h_k) − log p_T(σ | h_k)) ],

the span analogue of the per-position reverse KL of `sampled_token` (a span of one token on
both sides is that term exactly). It holds when a span's extent and its teacher tokens are
fixed by the text up to its end (the teacher's tokenisation does not change a finished span
when more text follows); docs/design.md#sampled-token-across-tokenizers says what else.

The dense loss across tokenizers (:func:`span_dense_loss`) puts the reverse KL over the
matched vocabularies (:func:`matched_reverse_kl`) on the spans of one equal token per side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.losses.chunking import chunked_token_values
from jdistill.losses.divergences import log_softmax, masked_mean, token_logp
from jdistill.losses.estimators import sampled_token_terms
from jdistill.losses.settings import NORMALIZE_MODES, _check_choice, _check_same_shape

sg = jax.lax.stop_gradient
RATIO_MODES = ("token", "span")


def span_sums(values, span, n_spans: int):
  """Sums of ``values [B, N]`` per span: ``span [B, N]`` int ids in ``[0, n_spans)``, -1 for
  none (not summed) -> ``[B, n_spans]``."""
  b = values.shape[0]
  seg = jnp.where(span >= 0, span, n_spans) + (n_spans + 1) * jnp.arange(b)[:, None]
  sums = jax.ops.segment_sum(
    values.reshape(-1), seg.reshape(-1), num_segments=b * (n_spans + 1), indices_are_sorted=False
  )
  return sums.reshape(b, n_spans + 1)[:, :n_spans]


def span_k1(student_logp, teacher_logp, student_span, teacher_span, mask):
  """Per student token, the log-ratio of its span ``log q(σ) − log p_T(σ)`` -> ``[B, T]``
  (stop-gradient'ed; 0 where the token has no span or ``mask`` is 0).

  ``student_logp [B, T]``, ``student_span [B, T]``, ``mask [B, T]``; ``teacher_logp [B, Tt]``
  (the teacher's log-probs of its own tokens), ``teacher_span [B, Tt]``; spans ids < T."""
  n = student_logp.shape[1]
  valid = (student_span >= 0) & (mask != 0)
  s = jnp.where(valid, sg(student_logp.astype(jnp.float32)), 0.0)
  t = jnp.where(teacher_span >= 0, sg(teacher_logp.astype(jnp.float32)), 0.0)
  per_span = span_sums(s, jnp.where(valid, student_span, -1), n) - span_sums(t, teacher_span, n)
  k1 = jnp.take_along_axis(per_span, jnp.maximum(student_span, 0), axis=1)
  return jnp.where(valid, k1, 0.0)


def span_sampled_token_loss(
  student_logp,
  teacher_logp,
  student_span,
  teacher_span,
  mask,
  *,
  behaviour_logp=None,
  clip_eps: float | None = None,
  normalize: str = "token",
  icepop_c: float | None = None,
  kl_weight: float = 1.0,
  ratio: str = "token",
):
  """Sampled-token loss across tokenizers -> ``(loss scalar, aux)``.

  ``student_logp [B, T]`` = log q(x_t) of the student's sampled tokens (differentiable),
  ``teacher_logp [B, Tt]`` = the teacher's log-probs of *its* tokens of the same text,
  ``student_span [B, T]`` / ``teacher_span [B, Tt]`` the alignment's span ids (-1: none),
  ``mask [B, T]`` the completion mask; ``behaviour_logp [B, T]`` log π(x_t) of the sampler.

  Token t of span k gets ``k1_t = log q(σ_k) − log p_T(σ_k)`` (:func:`span_k1`) and then
  exactly the per-token loss of :func:`sampled_token_terms` (``A_t = −kl_weight · k1_t``,
  ratio ``r_t = q(x_t)/π(x_t)``, the PPO clip on ``r_t``, IcePop), reduced with
  :func:`masked_mean` over the tokens that have a span. With one token per span on both sides
  this is :func:`sampled_token_loss`.

  ``ratio``: "token" (default, today's ``r_t``) or "span", ``r_t = q(σ_k)/π(σ_k)`` the
  ratio of the token's whole span (the clip and IcePop then act on it; the gradient flows
  through token t's own factor). Off-policy only "span" keeps the expectation on the stated
  objective (token t's ratio does not correct the other tokens of its span); on-policy
  both are 1, and on one-token spans they are the same.

  aux: per-token ``k1``, ``advantage``, ``ratio``, ``icepop_masked``, ``per_token_loss``,
  and the scalar ``clip_fraction``.
  """
  _check_choice("normalize", normalize, NORMALIZE_MODES)
  _check_same_shape("student_logp", student_logp, "student_span", student_span)
  _check_same_shape("student_logp", student_logp, "mask", mask)
  _check_same_shape("teacher_logp", teacher_logp, "teacher_span", teacher_span)
  if behaviour_logp is not None:
    _check_same_shape("behaviour_logp", behaviour_logp, "student_logp", student_logp)
  if clip_eps is not None and behaviour_logp is None:
    raise ValueError("clip_eps requires behaviour_logp (the PPO clip is on r)")
  per_token, aux = span_sampled_token_terms(
    student_logp,
    teacher_logp,
    student_span,
    teacher_span,
    mask,
    behaviour_logp,
    clip_eps,
    icepop_c,
    kl_weight,
    ratio,
  )
  weight = mask.astype(jnp.float32) * (student_span >= 0)
  loss = masked_mean(per_token, weight, normalize)
  clipped = aux.pop("clipped")
  return loss, dict(aux, clip_fraction=sg(masked_mean(clipped, weight, "token")))


def span_sampled_token_terms(
  student_logp,
  teacher_logp,
  student_span,
  teacher_span,
  mask,
  behaviour_logp=None,
  clip_eps=None,
  icepop_c=None,
  kl_weight=1.0,
  ratio="token",
):
  """Elementwise part of :func:`span_sampled_token_loss` -> ``(per_token_loss [B, T], aux)``;
  aux holds ``clipped`` instead of the reduced ``clip_fraction``."""
  _check_choice("ratio", ratio, RATIO_MODES)
  k1 = span_k1(student_logp, teacher_logp, student_span, teacher_span, mask)
  s = student_logp.astype(jnp.float32)
  if ratio == "span" and behaviour_logp is not None:
    # r_t = q(σ)/π(σ) of the whole span, differentiable through token t's own factor only:
    # a "behaviour" that moves the rest of the span's log-ratio into token t's
    log_r = sg(s) - sg(behaviour_logp.astype(jnp.float32))
    valid = (student_span >= 0) & (mask != 0)
    per_span = span_sums(
      jnp.where(valid, log_r, 0.0), jnp.where(valid, student_span, -1), s.shape[1]
    )
    others = jnp.take_along_axis(per_span, jnp.maximum(student_span, 0), axis=1) - log_r
    behaviour_logp = behaviour_logp.astype(jnp.float32) - jnp.where(valid, others, 0.0)
  # the per-token kernel's k1 = s − teacher, so this "teacher" makes its k1 the span's
  as_teacher = sg(s) - k1
  per_token, aux = sampled_token_terms(
    s, as_teacher, behaviour_logp, None, clip_eps, icepop_c, kl_weight
  )
  aux["k1"] = k1
  return per_token, aux


# --------------------------------------------------------------------------
# Dense across tokenizers: matched vocabularies with a tail bucket
# --------------------------------------------------------------------------


def matched_reverse_kl(student_logp, teacher_logp, vocab_map):
  """Reverse KL over the matched part of two vocabularies plus one tail bucket -> ``[...]``.

  ``student_logp [..., Vs]``, ``teacher_logp [..., Vt]`` log-probs; ``vocab_map [Vs]`` the
  teacher id of each student id with the same string, -1 where none
  (`data.alignment.vocab_map`). With M the matched student ids,

    Σ_{v∈M} q(v) log(q(v) / p(m(v))) + q̄ log(q̄ / p̄),   q̄ = 1 − q(M), p̄ = 1 − p(m(M)),

  the KL between the two distributions coarsened to the matched tokens and "anything else".
  Teacher terms are stop-gradient'ed."""
  vocab_map = jnp.asarray(vocab_map)
  t = teacher_logp.astype(jnp.float32)
  t_at = jnp.take(t, jnp.maximum(vocab_map, 0), axis=-1)  # [..., Vs]: log p(m(v))
  tail = log_mass(t, ~teacher_matched(vocab_map, t.shape[-1]))
  return matched_reverse_kl_at(student_logp, t_at, vocab_map >= 0, tail)


def teacher_matched(vocab_map, teacher_vocab: int):
  """``[Vt]`` bool: the teacher ids some student id is matched to."""
  vocab_map = jnp.asarray(vocab_map)
  ids = jnp.where(vocab_map >= 0, vocab_map, teacher_vocab)
  return jnp.zeros((teacher_vocab,), bool).at[ids].set(True, mode="drop")


# a log-probability of nothing that keeps logsumexp and its gradient finite
LOG_NONE = -1e30
# p̄ = 0 (the teacher has no unmatched id): a finite, large tail term where q̄ > 0
LOG_TINY = float(np.log(np.finfo(np.float32).tiny))


def log_mass(logp, where):
  """``log Σ_{v: where[v]} exp(logp[..., v])`` -> ``[...]`` (-1e30 for an empty set).

  Summed directly rather than as 1 − the rest: a tail of 1e-16 is 1 − (1 − 1e-16), which
  float32 rounds to 0 or 6e-8, and its log (the tail term) with it."""
  return jax.nn.logsumexp(jnp.where(where, logp.astype(jnp.float32), LOG_NONE), axis=-1)


def matched_reverse_kl_at(student_logp, teacher_logp_at, matched, teacher_tail_logp):
  """:func:`matched_reverse_kl` with the teacher's log-probs already on the student's ids:
  ``teacher_logp_at [..., Vs]`` = log p(m(v)) (any finite value where ``matched [Vs]`` is
  false) and ``teacher_tail_logp [...]`` = log p̄ -> ``[...]``. Teacher terms are
  stop-gradient'ed."""
  matched = jnp.asarray(matched).astype(bool)
  s = student_logp.astype(jnp.float32)
  t_at = sg(teacher_logp_at.astype(jnp.float32))
  body = jnp.sum(jnp.where(matched, jnp.exp(s) * (s - t_at), 0.0), axis=-1)
  log_q_tail = log_mass(s, ~matched)
  log_p_tail = jnp.maximum(sg(teacher_tail_logp.astype(jnp.float32)), LOG_TINY)
  return body + jnp.exp(log_q_tail) * (log_q_tail - log_p_tail)


def span_dense_loss(
  student_logits,
  teacher_logits,
  targets,
  teacher_targets,
  student_span,
  teacher_span,
  single,
  vocab_map,
  mask,
  *,
  behaviour_logp=None,
  clip_eps: float | None = None,
  normalize: str = "token",
  icepop_c: float | None = None,
):
  """Dense loss across tokenizers -> ``(loss scalar, aux)``.

  ``student_logits [B, T, Vs]`` score ``targets [B, T]``; ``teacher_logits [B, Tt, Vt]``
  score ``teacher_targets [B, Tt]``; ``student_span``, ``teacher_span`` and ``single [B, T]``
  (per span id: one token on both sides with equal strings) from
  `data.alignment.align_batch`; ``vocab_map [Vs]``; ``mask [B, T]``.

  Student token t of span k: where ``single[k]``, ``l_t`` = :func:`matched_reverse_kl` of
  the student's distribution at t and the teacher's at the span's one teacher token (the
  full-vocab reverse KL on the matched vocabulary, the rest in a tail bucket); elsewhere the
  span sampled-token term of :func:`span_sampled_token_terms`. Reduced with
  :func:`masked_mean` over the tokens that have a span. aux: ``dense`` (the gate, per
  token), ``dense_term``, ``sampled_term``, ``k1``, ``per_token_loss``.
  """
  _check_same_shape("targets", targets, "student_span", student_span)
  _check_same_shape("teacher_targets", teacher_targets, "teacher_span", teacher_span)
  _check_same_shape("targets", targets, "single", single)
  s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  t_logp = jax.nn.log_softmax(sg(teacher_logits).astype(jnp.float32), axis=-1)
  s_tok = jnp.take_along_axis(s_logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  t_tok = jnp.take_along_axis(t_logp, teacher_targets[..., None].astype(jnp.int32), axis=-1)
  sampled, aux = span_sampled_token_terms(
    s_tok, t_tok[..., 0], student_span, teacher_span, mask, behaviour_logp, clip_eps, icepop_c
  )
  has_span = student_span >= 0
  span = jnp.maximum(student_span, 0)
  gate = has_span & jnp.take_along_axis(single.astype(bool), span, axis=1)
  # the teacher position of each span (its only token where the span is single)
  n = targets.shape[1]
  t_pos = jnp.arange(teacher_span.shape[1], dtype=jnp.int32)[None, :]
  pos_of_span = span_sums(jnp.broadcast_to(t_pos, teacher_span.shape), teacher_span, n)
  pos = jnp.take_along_axis(pos_of_span, span, axis=1).astype(jnp.int32)
  pos = jnp.where(gate, pos, 0)  # elsewhere a sum of several positions, maybe out of range
  t_at = jnp.take_along_axis(t_logp, pos[..., None], axis=1)  # [B, T, Vt]
  dense = matched_reverse_kl(s_logp, t_at, vocab_map)
  per_token = jnp.where(gate, dense, sampled)
  weight = mask.astype(jnp.float32) * has_span
  loss = masked_mean(per_token, weight, normalize)
  clipped = aux.pop("clipped")
  aux.update(
    dense=gate.astype(jnp.float32),
    dense_term=sg(dense),
    sampled_term=sg(sampled),
    per_token_loss=sg(per_token),
  )
  return loss, dict(aux, clip_fraction=sg(masked_mean(clipped * (1 - gate), weight, "token")))


def chunked_span_dense_loss(
  student_hidden,
  student_unembed,
  teacher_hidden_at,
  teacher_unembed_at,
  targets,
  teacher_span_logp,
  teacher_tail_logp,
  student_span,
  gate,
  matched,
  mask,
  *,
  behaviour_logp=None,
  clip_eps: float | None = None,
  normalize: str = "token",
  icepop_c: float | None = None,
  chunk_size: int = 0,
  teacher_logp_at=None,
  kl_weight: float = 1.0,
):
  """:func:`span_dense_loss` from hidden states, the logits built ``chunk_size`` positions at a
  time (`chunking.chunked_token_values`) -> ``(loss scalar, aux)``.

  ``student_hidden [B, T, Ds]``, ``student_unembed [Ds, Vs]`` score ``targets [B, T]``.
  The teacher comes already aligned (`step.cross_tokenizer.dense_scores` builds it):
  ``teacher_hidden_at [B, T, Dt']`` and ``teacher_unembed_at [Dt', Vs]`` whose product at a
  gated token is log p(m(v)), the teacher's log-prob (at the span's one teacher position) of
  the teacher token matched to each student id v; ``teacher_tail_logp [B, T]`` log p̄ there,
  the teacher's mass on the ids no student id is matched to; ``teacher_span_logp [B, ≥T]``
  log p_T of each span id; ``student_span [B, T]``, ``gate [B, T]`` (the token's span is one
  equal token per side), ``matched [Vs]`` (or ``[B, T, Vs]``, per token), ``mask [B, T]``.
  ``teacher_logp_at [B, T, Vs]``, if
  given, is added to that product (the prefix reading, `cross_tokenizer.prefix_scores`, gives
  the teacher's log-probs on the student's ids directly, with a zero hidden state).
  ``kl_weight`` scales the span sampled-token term's advantage, as in
  :func:`span_sampled_token_loss` (the dense term is unweighted, as ``distill_loss``'s).

  Per token: :func:`matched_reverse_kl_at` where gated, the span sampled-token term
  (:func:`span_sampled_token_terms`) elsewhere; reduced as :func:`span_dense_loss` does, which
  it equals on the same inputs. aux: ``dense`` (the gate), ``dense_term``, ``sampled_term``,
  ``k1``, ``per_token_loss``, ``student_logp`` and the scalar ``clip_fraction``.
  """
  _check_same_shape("targets", targets, "student_span", student_span)
  _check_same_shape("targets", targets, "gate", gate)

  matched_per_token = jnp.ndim(matched) == 3

  def values(s_logits, t_logp_at, chunk_targets, extra):
    t_tail, t_offset, t_matched = extra
    s_logp = log_softmax(s_logits)
    if t_offset is not None:
      t_logp_at = t_logp_at + t_offset
    return dict(
      dense=matched_reverse_kl_at(
        s_logp, t_logp_at, t_matched if matched_per_token else matched, t_tail
      ),
      logp=token_logp(s_logp, chunk_targets),
    )

  out = chunked_token_values(
    values, student_hidden, student_unembed, teacher_hidden_at, teacher_unembed_at, targets,
    chunk_size=chunk_size,
    extra=(teacher_tail_logp, teacher_logp_at, matched if matched_per_token else None),
  )  # fmt: skip
  t = targets.shape[1]
  ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), targets.shape)
  sampled, aux = span_sampled_token_terms(
    out["logp"], sg(teacher_span_logp[:, :t]), student_span, ids, mask, behaviour_logp,
    clip_eps, icepop_c, kl_weight,
  )  # fmt: skip
  has_span = student_span >= 0
  on = has_span & gate.astype(bool)
  per_token = jnp.where(on, out["dense"], sampled)
  weight = mask.astype(jnp.float32) * has_span
  loss = masked_mean(per_token, weight, normalize)
  clipped = aux.pop("clipped")
  aux.update(
    dense=on.astype(jnp.float32),
    dense_term=sg(out["dense"]),
    sampled_term=sg(sampled),
    per_token_loss=sg(per_token),
    student_logp=sg(out["logp"]),
  )
  return loss, dict(aux, clip_fraction=sg(masked_mean(clipped * (1 - on), weight, "token")))

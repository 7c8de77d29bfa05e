"""The sampled-token estimator across tokenizers: one advantage per aligned span.

A teacher with another tokenizer scores the student's rollout in its own tokens; the
alignment (`jdistill.data.alignment`) cuts both tokenisations into spans that cover the same
text. Per span k, with ``h_k`` the text before it:

  A_k = log p_T(σ_k | h_k) − log q(σ_k | h_k)        (both sums of token log-probs, sg)

is the advantage of every student token of the span, with the sampled-token estimator's
importance ratio, PPO clip and IcePop (`estimators.sampled_token_terms`, which this reuses).
Its expected gradient, on-policy, is that of the per-span reverse KL with the history
distribution held fixed,

  J(θ) = Σ_k E_{h_k ~ q} [ Σ_σ q_θ(σ | h_k) (log q_θ(σ | h_k) − log p_T(σ | h_k)) ],

the span analogue of the per-position reverse KL of `sampled_token` (a span of one token on
both sides is that term exactly). It holds when a span's extent and its teacher tokens are
fixed by the text up to its end (the teacher's tokenisation does not change a finished span
when more text follows); docs/design.md#sampled-token-across-tokenizers says what else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdistill.losses.divergences import masked_mean
from jdistill.losses.estimators import sampled_token_terms
from jdistill.losses.settings import NORMALIZE_MODES, _check_choice, _check_same_shape

sg = jax.lax.stop_gradient


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
  this is :func:`sampled_token_loss`. aux: per-token ``k1``, ``advantage``, ``ratio``,
  ``icepop_masked``, ``per_token_loss``, and the scalar ``clip_fraction``.
  """
  _check_choice("normalize", normalize, NORMALIZE_MODES)
  _check_same_shape("student_logp", student_logp, "student_span", student_span)
  _check_same_shape("student_logp", student_logp, "mask", mask)
  _check_same_shape("teacher_logp", teacher_logp, "teacher_span", teacher_span)
  if behaviour_logp is not None:
    _check_same_shape("behaviour_logp", behaviour_logp, "student_logp", student_logp)
  if clip_eps is not None and behaviour_logp is None:
    raise ValueError("clip_eps requires behaviour_logp (the PPO clip is on r)")
  k1 = span_k1(student_logp, teacher_logp, student_span, teacher_span, mask)
  s = student_logp.astype(jnp.float32)
  # the per-token kernel's k1 = s − teacher, so this "teacher" makes its k1 the span's
  as_teacher = sg(s) - k1
  per_token, aux = sampled_token_terms(
    s, as_teacher, behaviour_logp, None, clip_eps, icepop_c, kl_weight
  )
  weight = mask.astype(jnp.float32) * (student_span >= 0)
  loss = masked_mean(per_token, weight, normalize)
  clipped = aux.pop("clipped")
  aux["k1"] = k1
  return loss, dict(aux, clip_fraction=sg(masked_mean(clipped, weight, "token")))

"""distill_loss: one entry point for every loss kind, from hidden states.

Position ``t`` predicts ``targets[:, t]``: the caller has already shifted. The per-chunk
function (:func:`_make_token_fn`) computes each kernel loss's per-token terms and the
support diagnostics; :func:`distill_loss` runs it chunked over T either in one fused pass
that takes the student's gradients chunk by chunk (:func:`_fused_loss`, a ``custom_vjp``:
each vocabulary projection happens once) or under ``jax.checkpoint``
(:func:`chunked_token_values`). :func:`unchunked_distill_loss` materialises full
``[B, T, V]`` logits: the test reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jdistill.losses.chunking import (
  _check_unembed_shapes,
  _full_token_values,
  _merge_chunks,
  _split_chunks,
  chunk_positions,
  chunked_token_values,
  project_logits,
)
from jdistill.losses.divergences import (
  _jsd_from_logp,
  _kl_from_logp,
  _topk_kl_from_logp,
  log_softmax,
  masked_mean,
  token_logp,
  token_weights,
)
from jdistill.losses.estimators import (
  _check_extra_advantage,
  overlap_aware_loss,
  overlap_aware_terms,
  sampled_token_loss,
  sampled_token_terms,
)
from jdistill.losses.settings import LossSettings, _check_same_shape
from jdistill.losses.support import overlap_gate, support_diagnostics

sg = jax.lax.stop_gradient


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
      if s.kl_baseline:  # the exact KL(q || p_T) at this position: the advantage's baseline
        terms["baseline"] = sg(_kl_from_logp(s_tau, t_tau))
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
    elif s.loss == "topk":
      terms = {
        "per_token_loss": _topk_kl_from_logp(
          s_tau, t_tau, s.k, s.topk_support, s.topk_tail, s.topk_direction
        )
      }
    else:  # a registry kernel without its branch here must not run another loss silently
      raise ValueError(f"loss kernel {s.loss!r} has no per-token terms in _make_token_fn")

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
        terms.get("baseline"),
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
      kl_weight=settings.kl_weight,
      baseline=terms.get("baseline"),
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

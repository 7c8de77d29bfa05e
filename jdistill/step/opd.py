"""The one compiled OPD train step: teachers on their slots, student, loss kernels, optax update.

Pure functions of arrays and pytrees; the batch layout, the teachers' rows and forwards and the
optax update are `jdistill.step.common`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jdistill import losses
from jdistill.models import moe
from jdistill.step import cross_tokenizer
from jdistill.step.common import (
  TeacherSpec,
  apply_gradients,
  completion_window,
  group_hidden,
  shifted_inputs,
  take_positions,
  take_rows,
)

sg = jax.lax.stop_gradient
SAMPLED_LOSSES = losses.SAMPLED_LOSSES  # estimators that use the sampled tokens (the registry)


def teacher_metrics(diag: dict, mask) -> dict:
  """Token means over the completion of the loss kernel's per-token diagnostics, and
  `off_support_loss_share`: the share of the loss's per-token weight (|advantage| of a sampled
  estimator, the per-token loss of a dense one) on tokens the teacher puts off its support
  (probability < `metrics.floor_prob`).

  The sampled estimators also get the train/inference mismatch `abs_log_ratio_mean` / `_max`
  (|log q/π| of the sampled tokens: the sampler's numerics, e.g. bf16 rollouts, stale params,
  and its temperature / top-k / top-p) and the IcePop-masked share `icepop_masked`."""
  per_token = {
    k: v
    for k, v in diag.items()
    if getattr(v, "ndim", 0) == 2
    and k not in ("k1", "advantage", "ratio", "per_token_loss", "dense_term", "sampled_term")
  }
  per_token["k1_reverse_kl"] = diag["student_logp"] - diag["teacher_logp"]
  out = {k: losses.masked_mean(v, mask, "token") for k, v in per_token.items()}
  if "ratio" in diag:  # train/inference mismatch of the sampled estimators: |log q/π|
    abs_log_ratio = jnp.abs(jnp.log(diag["ratio"]))
    out["abs_log_ratio_mean"] = losses.masked_mean(abs_log_ratio, mask, "token")
    out["abs_log_ratio_max"] = jnp.max(jnp.where(mask > 0, abs_log_ratio, 0.0))
  if "clip_fraction" in diag:
    out["clip_fraction"] = diag["clip_fraction"]
  if "off_support" in diag:  # where the loss's weight sits: on tokens off the teacher's support
    weight = jnp.abs(diag["advantage"] if "advantage" in diag else diag["per_token_loss"]) * mask
    out["off_support_loss_share"] = jnp.sum(weight * diag["off_support"]) / jnp.maximum(
      jnp.sum(weight), 1e-12
    )
  out["tokens"] = jnp.sum(mask)
  return out


def distill_objective(
  params,
  student_graphdef,
  teacher_graphdefs,
  teacher_states,
  batch,
  specs: Sequence[TeacherSpec],
  groups: Sequence[tuple[int, ...]] | None = None,
  diagnostics=True,
  teacher_cache: dict | None = None,
  loss_window: int | None = None,
  expert_loads: bool = False,
):
  """Weighted sum over teachers of their loss on their rows → (loss, metrics), or with
  `expert_loads` (loss, (metrics, loads)): the student's `moe.forward_with_router_stats`
  loads, each DeepSeek-V3 MoE layer's tokens per expert over the batch's real tokens.

  `groups` lists teacher indices (into `specs`) that share one graphdef and a stacked
  state (see `group_hidden`); `teacher_graphdefs` / `teacher_states` are then per group.
  Default: every resident teacher on its own.

  `teacher_cache`: `{i: (hidden [S, L-1, D], unembed [D, V])}` of the streamed teachers
  (`jdistill.step.streaming`), whose forward ran before the step; they are in no group. A
  teacher of another tokenizer (`spec.spans`) has a dict there instead, `span_logp [S, L-1]`,
  `student_span [S, L-1]` and more for the dense loss (`cross_tokenizer.teacher_cache`).

  `loss_window` (static; the sampler's `max_new_tokens`): the loss kernels run only over
  each row's completion window (`completion_window`), not over the prompt positions too.

  A mixture-of-experts student adds its coefficient-weighted router losses (`moe.aux_losses`)
  to the total and reports them, unweighted, in every teacher's metrics.
  """
  cache = dict(teacher_cache or {})
  spans = {i: cache.pop(i) for i in list(cache) if specs[i].spans}
  if groups is None:
    groups = tuple((i,) for i in range(len(specs)) if i not in cache and i not in spans)
  x = shifted_inputs(batch)
  student = nnx.merge(student_graphdef, params)
  hidden, _, router, loads = moe.forward_with_router_stats(
    student, x["inputs"], x["positions"], x["kv_mask"]
  )
  unembed = student.unembedding()
  teacher_out = {i: (sg(h), sg(u)) for i, (h, u) in cache.items()}
  for members, graphdef, state in zip(groups, teacher_graphdefs, teacher_states):
    outs = group_hidden(graphdef, state, x, [specs[i].rows for i in members])
    teacher_out.update(zip(members, outs))
  total = moe.weighted_aux_loss(router, student.cfg)
  if loss_window is not None and loss_window < x["mask"].shape[1]:
    idx = completion_window(x, loss_window)
    hidden = take_positions(hidden, idx)
    x = {k: take_positions(x[k], idx) for k in ("targets", "mask", "behaviour_logp")}
    teacher_out = {
      i: (take_positions(h, take_rows(idx, specs[i].rows)), u) for i, (h, u) in teacher_out.items()
    }
    spans = {i: cross_tokenizer.window(e, take_rows(idx, specs[i].rows)) for i, e in spans.items()}
  metrics = {}
  for i, spec in enumerate(specs):
    rows = lambda a: take_rows(a, spec.rows)  # noqa: E731
    if spec.spans:
      loss, metrics[spec.name] = cross_tokenizer.span_loss(
        rows(hidden), unembed, rows(x["targets"]), rows(x["mask"]), rows(x["behaviour_logp"]),
        spans[i], spec.settings,
      )  # fmt: skip
      metrics[spec.name].update(router)
      total = total + spec.weight * loss
      continue
    t_hidden, t_unembed = teacher_out[i]
    loss, diag = losses.distill_loss(
      rows(hidden),
      unembed,
      t_hidden,
      t_unembed,
      rows(x["targets"]),
      rows(x["mask"]),
      # The sampler ran the current params (on-policy), so the importance ratio only matters
      # for PPO clipping; without it the plain k1 policy gradient is used.
      spec.settings,
      # log π of the distribution each token was sampled from: the sampled estimators'
      # importance weights q/π, so their expected gradient does not depend on the
      # sampling temperature, top-k or top-p (nor on sampler/trainer numerics).
      behaviour_logp=(rows(x["behaviour_logp"]) if spec.settings.loss in SAMPLED_LOSSES else None),
      diagnostics=diagnostics,
    )
    total = total + spec.weight * loss
    metrics[spec.name] = dict(teacher_metrics(diag, rows(x["mask"])), loss=loss, **router)
  return (total, (metrics, loads)) if expert_loads else (total, metrics)


def train_step(
  state: dict,
  teacher_states: tuple,
  batch: dict,
  *,
  student_graphdef,
  teacher_graphdefs: tuple,
  specs: tuple[TeacherSpec, ...],
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule,
  groups: tuple[tuple[int, ...], ...] | None = None,
  diagnostics=True,
  teacher_cache: dict | None = None,
  loss_window: int | None = None,
  score_bias_speed: float = 0.0,
):
  """One OPD update. Returns (new_state, metrics). A non-finite loss or gradient leaves
  params and optimizer state unchanged and reports `metrics["finite"] = 0`.

  `diagnostics` (a bool, traced or not): compute the support diagnostics (on logging steps);
  without them the per-teacher overlap metrics and `divergence` read 0.

  metrics: `loss` is the optimised objective (for sampled estimators a surrogate whose value
  is no divergence); `divergence` is the weighted mean over teachers of the full-vocab
  reverse KL on their rows, which reaches 0 when the student matches every teacher.

  `teacher_cache`: the streamed teachers' hidden states; `loss_window`: the completion
  window the loss runs over (both: see `distill_objective`). `score_bias_speed`: a DeepSeek-V3
  student's auxiliary-loss-free balancing (`common.apply_gradients`).
  """

  def objective(params):
    return distill_objective(
      params,
      student_graphdef,
      teacher_graphdefs,
      teacher_states,
      batch,
      specs,
      groups,
      diagnostics,
      teacher_cache,
      loss_window,
      expert_loads=True,
    )

  (loss, (per_teacher, loads)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
  new_state, update_metrics = apply_gradients(
    state, loss, grads, optimizer, schedule, loads, score_bias_speed
  )
  metrics = {
    **update_metrics,
    "divergence": sum(s.weight * per_teacher[s.name]["reverse_kl"] for s in specs)
    / max(sum(s.weight for s in specs), 1e-12),
    "tokens": jnp.sum(batch["lengths"]),  # prompt + completion tokens the step processed
    "teachers": per_teacher,
  }
  return new_state, metrics

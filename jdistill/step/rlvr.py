"""The RLVR step: GRPO's clipped policy gradient with group reward advantages, the teachers'
sampled-token advantage, a k3 penalty towards a reference and a dense reverse KL (the objective
is written out in `jdistill.stages.rlvr`). Pure functions of arrays; the batch is a rollout
batch (`jdistill.step.common`) plus `advantages [B]`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill import losses
from jdistill.step.common import (
  TeacherSpec,
  apply_gradients,
  group_hidden,
  shifted_inputs,
  take_rows,
)

sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class RLSettings:
  """Static settings of the RL objective (a jit static: hashable)."""

  chunk_size: int | None = 0  # 0: chosen from the shapes (losses.chunk_positions)
  normalize: str = "token"
  clip_eps: float | None = None
  icepop_c: float | None = None
  reward_weight: float = 1.0  # w_R
  kl_weight: float = 0.0  # λ: weight of the teacher's sampled-token advantage
  kl_coef: float = 0.0  # k3 penalty towards the reference
  dense_weight: float = 0.0  # full-vocab reverse KL to the row's teacher


def policy_loss(
  student_logp, behaviour_logp, reward_advantage, mask, settings: RLSettings, *,
  teacher_logp=None, reference_logp=None,
):  # fmt: skip
  """The per-token RL objective from log-probs of the sampled tokens → (loss, metrics).

  `student_logp [B, T]` (differentiable), `behaviour_logp [B, T]` (log π of the sampled
  tokens), `reward_advantage [B]`, `mask [B, T]`; `teacher_logp [B, T]` with λ > 0,
  `reference_logp [B, T]` with `kl_coef` > 0 (both treated as constants).
  """
  teacher = jnp.zeros_like(student_logp) if teacher_logp is None else sg(teacher_logp)
  kl_weight = 0.0 if teacher_logp is None else settings.kl_weight
  advantage = settings.reward_weight * reward_advantage[:, None].astype(jnp.float32)
  per_token, aux = losses.sampled_token_terms(
    student_logp, teacher, behaviour_logp, advantage, settings.clip_eps, settings.icepop_c,
    kl_weight=kl_weight,
  )  # fmt: skip
  loss = losses.masked_mean(per_token, mask, settings.normalize)
  abs_log_ratio = jnp.abs(jnp.log(aux["ratio"]))
  metrics = {
    "policy_loss": sg(loss),
    "clip_fraction": losses.masked_mean(aux["clipped"], mask),
    "abs_log_ratio_mean": losses.masked_mean(abs_log_ratio, mask),
    "abs_log_ratio_max": jnp.max(jnp.where(mask > 0, abs_log_ratio, 0.0)),
    "icepop_masked": losses.masked_mean(aux["icepop_masked"], mask),
    "response_length": jnp.mean(jnp.sum(mask, axis=-1)),
  }
  if teacher_logp is not None:  # sampled estimate of the reverse KL to the teachers
    metrics["teacher_k1"] = losses.masked_mean(sg(student_logp) - teacher, mask)
  if reference_logp is not None and settings.kl_coef:
    kl = losses.masked_mean(
      losses.k3_kl(student_logp, sg(reference_logp)), mask, settings.normalize
    )
    loss = loss + settings.kl_coef * kl
    metrics["k3_kl"] = sg(kl)
  return loss, metrics


def rl_objective(
  params,
  teacher_states: tuple,
  reference_state,
  batch: dict,
  *,
  student_graphdef,
  teacher_graphdefs: tuple,
  specs: tuple[TeacherSpec, ...],
  groups: tuple[tuple[int, ...], ...],
  reference_graphdef,
  settings: RLSettings,
):
  """Student (and teachers, reference) forwards on a rollout batch → (loss, metrics).

  `batch` as `train_step` (right-padded rollouts) plus `advantages [B]` (group reward
  advantages). Teachers run only when λ or `dense_weight` needs them."""
  x = shifted_inputs(batch)
  student = nnx.merge(student_graphdef, params)
  hidden, _ = student(x["inputs"], x["positions"], kv_mask=x["kv_mask"])
  unembed = student.unembedding()
  chunk = settings.chunk_size
  logp = losses.token_logprobs(hidden, unembed, x["targets"], chunk_size=chunk)
  teacher_logp, dense = None, jnp.zeros((), jnp.float32)
  if specs and (settings.kl_weight or settings.dense_weight):
    teacher_logp = jnp.zeros_like(logp)
    total_weight = max(sum(s.weight for s in specs), 1e-12)
    dense_settings = losses.LossSettings("reverse_kl", chunk, normalize=settings.normalize)
    for members, graphdef, state in zip(groups, teacher_graphdefs, teacher_states):
      outs = group_hidden(graphdef, state, x, [specs[i].rows for i in members])
      for i, (t_hidden, t_unembed) in zip(members, outs):
        rows = specs[i].rows
        targets = take_rows(x["targets"], rows)
        if settings.kl_weight:
          t_logp = losses.token_logprobs(t_hidden, t_unembed, targets, chunk_size=chunk)
          teacher_logp = teacher_logp.at[jnp.asarray(rows)].set(t_logp)
        if settings.dense_weight:
          value, _ = losses.distill_loss(
            take_rows(hidden, rows), unembed, t_hidden, t_unembed, targets,
            take_rows(x["mask"], rows), dense_settings, diagnostics=False,
          )  # fmt: skip
          dense = dense + specs[i].weight / total_weight * value
  reference_logp = None
  if settings.kl_coef:
    reference = nnx.merge(reference_graphdef, reference_state)
    r_hidden, _ = reference(x["inputs"], x["positions"], kv_mask=x["kv_mask"])
    reference_logp = losses.token_logprobs(
      sg(r_hidden), sg(reference.unembedding()), x["targets"], chunk_size=chunk
    )
  loss, metrics = policy_loss(
    logp, x["behaviour_logp"], batch["advantages"], x["mask"], settings,
    teacher_logp=teacher_logp, reference_logp=reference_logp,
  )  # fmt: skip
  if settings.dense_weight:
    loss = loss + settings.dense_weight * dense
    metrics["dense_reverse_kl"] = sg(dense)
  return loss, metrics


def rl_step(state, teacher_states, reference_state, batch, *, optimizer, schedule, **structure):
  """One RL update → (new state, metrics); non-finite updates are skipped (`finite` 0)."""
  objective = functools.partial(rl_objective, **structure)
  grad_fn = jax.value_and_grad(objective, has_aux=True)
  (loss, metrics), grads = grad_fn(state["params"], teacher_states, reference_state, batch)
  new_state, update = apply_gradients(state, loss, grads, optimizer, schedule)
  return new_state, {**update, **metrics, "tokens": jnp.sum(batch["lengths"])}

"""What every stage's step shares: the rollout batch, the teachers' rows and forwards, the
optax update. Pure functions of arrays and pytrees (the OPD step is `jdistill.step.opd`, SFT's
`jdistill.step.sft`, RLVR's `jdistill.step.rlvr`).

The train state is a dict `{"params", "opt_state", "step"}`; teacher states are passed as
arguments (never captured constants, never donated). Rollout batches are right-padded:

  tokens          int32 `[B, L]`   prompt then completion then pad
  completion_mask f32   `[B, L]`   1 on generated tokens (incl. the stop token)
  logprobs        f32   `[B, L]`   log-prob of each generated token under the raw (T=1) softmax
  sampling_logprobs f32 `[B, L]`   ... under the distribution it was sampled from (temperature,
                                   top-k, top-p): log π of the sampled estimators' q/π weights
  lengths         int32 `[B]`      prompt + completion length of each row
  model_mask      f32   `[B, L]`   optional (multi-turn episodes, `jdistill.sampling.episodes`):
                                   1 on the model's tokens, 0 on the environment's; the
                                   completion mask then also covers environment tokens

The loss mask of every stage's step is `completion_mask · model_mask` (`shifted_inputs`):
environment tokens are context for the student and every teacher, and a target for none (no
loss, advantage, ratio, share of the normalisation or weight in the overlap metrics).

Each teacher owns a static set of rows (`TeacherSpec.rows`): `[i*S, (i+1)*S)` in one
process; with several processes the global batch is process-major (see `teacher_rows`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jdistill import losses
from jdistill.models import moe

sg = jax.lax.stop_gradient

# --- batches ---------------------------------------------------------------------------


def take_rows(x, rows: tuple[int, ...]):
  if rows == tuple(range(rows[0], rows[0] + len(rows))):
    return x[rows[0] : rows[0] + len(rows)]
  return jnp.take(x, jnp.asarray(rows), axis=0)


def rollout_batch(out, batch_shardings: dict | None = None) -> dict:
  """The sampler's output (`sampler.SampleOutput`) → the step's batch, placed as
  `batch_shardings` (`{"tokens", "completion_mask", "logprobs", "lengths"}`) say (default:
  the default device)."""
  batch = {
    "tokens": out.tokens,
    "completion_mask": out.completion_mask,
    "logprobs": out.logprobs,
    "sampling_logprobs": out.sampling_logprobs,
    "lengths": jnp.asarray(out.prompt_lengths) + jnp.asarray(out.completion_lengths),
  }
  shardings = batch_shardings or {}
  return {k: jax.device_put(jnp.asarray(v), shardings.get(k)) for k, v in batch.items()}


def loss_mask(batch: dict) -> jax.Array:
  """`[B, L]` f32: 1 on the tokens that are a target, the completion's model tokens."""
  mask = batch["completion_mask"].astype(jnp.float32)
  if "model_mask" in batch:
    mask = mask * batch["model_mask"].astype(jnp.float32)
  return mask


def shifted_inputs(batch: dict) -> dict:
  """Model inputs and aligned targets: position t predicts token t+1. All `[B, L-1]`; `mask` is
  `loss_mask` shifted, so every input token (environment tokens too) stays context."""
  tokens = batch["tokens"]
  b, length = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(length - 1), (b, length - 1))
  return dict(
    inputs=tokens[:, :-1],
    targets=tokens[:, 1:],
    positions=positions,
    kv_mask=positions < batch["lengths"][:, None],
    mask=loss_mask(batch)[:, 1:],
    behaviour_logp=batch["sampling_logprobs"][:, 1:].astype(jnp.float32),
  )


def completion_window(x: dict, window: int) -> jax.Array:
  """Per row, the `window` positions from the one that predicts the first completion token:
  int `[B, window]` indices into the `L-1` positions of `shifted_inputs`.

  Rows are prompt, completion, pad; with `window` = the sampler's `max_new_tokens` (a
  multi-turn episode's `max_total_tokens`), every position with `mask` 1 is inside, so a loss
  over the window equals the loss over all positions (the others weigh 0) at `window / (L-1)`
  of the vocabulary work.
  """
  first = jnp.argmax(x["mask"] > 0, axis=1)  # the first completion target
  start = jnp.minimum(first, x["mask"].shape[1] - window)
  return start[:, None] + jnp.arange(window)[None, :]


def take_positions(a, idx):
  """`a [B, T, ...]` at `idx [B, W]` → `[B, W, ...]`."""
  idx = idx.reshape(*idx.shape, *([1] * (a.ndim - 2)))
  return jnp.take_along_axis(a, idx, axis=1)


# --- teachers --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
  """Static description of one teacher inside the step."""

  name: str
  settings: losses.LossSettings  # this teacher's loss kind and hyper-parameters
  weight: float
  rows: tuple[int, ...]  # rows of the global batch this teacher scores
  # another tokenizer: scored per aligned span from its `teacher_cache` entry
  # (`jdistill.step.cross_tokenizer`)
  spans: bool = False


def teacher_rows(n_teachers: int, slots: int, process_count: int = 1) -> list[tuple[int, ...]]:
  """Global row indices of each teacher.

  Each process holds its share (`slots / process_count` rows) of every teacher, teacher-major;
  the global array stacks processes one after another, so teacher i's rows are
  `p * n_teachers * local + i * local + j`.
  """
  local = slots // process_count
  return [
    tuple(
      p * n_teachers * local + i * local + j for p in range(process_count) for j in range(local)
    )
    for i in range(n_teachers)
  ]


def teacher_hidden(graphdef, state, x: dict, rows: tuple[int, ...]):
  """Frozen teacher's final hidden states `[S, L-1, D]` and unembedding on its rows."""
  teacher = nnx.merge(graphdef, state)
  hidden, _ = teacher(
    take_rows(x["inputs"], rows),
    take_rows(x["positions"], rows),
    kv_mask=take_rows(x["kv_mask"], rows),
  )
  return sg(hidden), sg(teacher.unembedding())


def group_hidden(graphdef, state, x: dict, rows: Sequence[tuple[int, ...]]):
  """Hidden states and unembeddings of a group of teachers that share one architecture.

  One teacher: `state` is its own state. Several: `state` has every leaf stacked on a
  leading teacher axis and the forward runs once under `jax.vmap` (forks of one base,
  DeepSeek-V4 style). Returns one `(hidden [S, L-1, D], unembed [D, V])` per teacher.
  """
  if len(rows) == 1:
    return [teacher_hidden(graphdef, state, x, rows[0])]

  def forward(st, inputs, positions, kv_mask):
    teacher = nnx.merge(graphdef, st)
    hidden, _ = teacher(inputs, positions, kv_mask=kv_mask)
    return hidden, teacher.unembedding()

  take = lambda a: jnp.stack([take_rows(a, r) for r in rows])  # noqa: E731
  hidden, unembed = jax.vmap(forward)(
    state, take(x["inputs"]), take(x["positions"]), take(x["kv_mask"])
  )
  return [(sg(hidden[j]), sg(unembed[j])) for j in range(len(rows))]


# --- the optimizer ---------------------------------------------------------------------


def make_optimizer(
  lr: float,
  *,
  steps: int,
  warmup_steps: int = 0,
  schedule: str = "cosine",
  end_lr_ratio: float = 0.1,
  weight_decay: float = 0.0,
  b1: float = 0.9,
  b2: float = 0.95,
  eps: float = 1e-8,
  max_grad_norm: float = 1.0,
  grad_accum: int = 1,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup then cosine/linear/constant decay, global-norm clipping,
  and gradient accumulation over `grad_accum` calls (optax.MultiSteps).

  `steps` and `warmup_steps` count train-step calls; with accumulation the schedule runs
  over the `steps // grad_accum` real updates. The returned schedule maps a call count to
  the learning rate in force (for logging).
  """
  steps, warmup_steps = max(steps // grad_accum, 1), warmup_steps // grad_accum
  decay_steps = max(steps - warmup_steps, 1)
  end = lr * end_lr_ratio
  if schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_lr_ratio)
  elif schedule == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  else:
    decay = optax.constant_schedule(lr)
  sched = (
    optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps])
    if warmup_steps
    else decay
  )
  chain = []
  if max_grad_norm > 0:
    chain.append(optax.clip_by_global_norm(max_grad_norm))
  chain.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  opt = optax.chain(*chain)
  if grad_accum > 1:
    opt = optax.MultiSteps(opt, every_k_schedule=grad_accum)
  return opt, lambda call: sched(call // grad_accum)


def apply_gradients(
  state: dict, loss, grads, optimizer, schedule, expert_loads=None, score_bias_speed: float = 0.0
):
  """The optax update of a train state `{"params", "opt_state", "step"}` → (new state,
  metrics). Every stage's step ends here: a non-finite loss or gradient leaves params and
  optimizer state unchanged and reports `finite = 0`; the step counter always advances.

  A DeepSeek-V3 model's score-correction biases are not the optimizer's: they stay as they
  were, or with `score_bias_speed > 0` move by the load rule (`moe.next_score_bias`) on the
  step's `expert_loads` (`moe.forward_with_router_stats`)."""
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(_):
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return moe.next_score_bias(params, state["params"], expert_loads, score_bias_speed), opt_state

  def keep(_):
    return state["params"], state["opt_state"]

  params, opt_state = jax.lax.cond(finite, update, keep, None)
  new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
  metrics = {
    "loss": loss,
    "grad_norm": grad_norm,
    "finite": finite.astype(jnp.float32),
    "lr": schedule(state["step"]),
  }
  return new_state, metrics

"""Teachers of another tokenizer in the OPD step: the host alignment, the teacher's span
log-probs, and the span sampled-token loss on the student's rows.

Per step, for each such teacher (`config.teachers.<name>.tokenizer`):

1. host (:func:`layouts`): its rows of the student's rollouts re-tokenised and laid out for the
   teacher by `data.alignment.teacher_rollouts`, at the static width
   :func:`teacher_width` (`ceil(length_ratio · L)`), so the scorer compiles once;
2. device (:func:`span_logp`, jitted on its own, the teacher's state an argument): the
   teacher's forward on its own tokens, its log-prob of each of its tokens, summed per span
   → `[S, L-1]` (span id → log p_T(span); a span id is < the completion length ≤ L-1);
3. in the compiled step (:func:`span_loss`): the student's log-probs of its sampled tokens
   and `losses.span.span_sampled_token_loss` with those per-span teacher sums (each span one
   "teacher token", so the kernel's own span sums on the teacher side are the identity).

The step sees the teacher only as `(span_logp [S, L-1], student_span [S, L-1])` in its
`teacher_cache`, like a streamed teacher's hidden states.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdistill import losses
from jdistill.data import alignment
from jdistill.losses.span import span_sampled_token_loss, span_sums
from jdistill.runtime import sharding as shd

sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class CrossTeacher:
  """A resident teacher with its own tokenizer: `index` into the step's specs, its `rows` of
  the batch, `graphdef`/`state`, the `student`/`teacher` alignment vocabularies and
  `length_ratio` (its width over the student's)."""

  index: int
  rows: tuple[int, ...]
  graphdef: object
  state: object
  student: alignment.Vocab
  teacher: alignment.Vocab
  length_ratio: float


def teacher_width(student_width: int, length_ratio: float) -> int:
  """The teacher's static sequence width for a student width `L`: `ceil(length_ratio · L)`."""
  return math.ceil(length_ratio * student_width)


def layouts(teacher: CrossTeacher, tokens, lengths, completion_mask, records, *, chat: bool):
  """The teacher's layout of its rows (host NumPy; `alignment.teacher_rollouts`'s dict).

  `tokens`, `completion_mask` `[B, L]` and `lengths [B]` are the whole batch (prompt, then
  completion, then pad); `records` the prompt record of each of the teacher's rows."""
  rows = np.asarray(teacher.rows)
  tokens, mask = np.asarray(tokens)[rows], np.asarray(completion_mask)[rows]
  completion = mask.sum(axis=1).astype(np.int32)
  prompt = np.asarray(lengths)[rows] - completion
  return alignment.teacher_rollouts(
    teacher.student, teacher.teacher, records, tokens, prompt, completion,
    teacher_width(tokens.shape[1], teacher.length_ratio), use_chat_template=chat,
  )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("graphdef", "width", "temperature", "chunk_size"))
def span_logp(
  graphdef, state, tokens, lengths, teacher_span, width: int, temperature=1.0, chunk_size=0
):
  """The teacher's log p_T of each span of its rows → `[S, width]` f32 (0 past the last span).

  `tokens [S, Lt]` its layout, `lengths [S]` prompt + completion, `teacher_span [S, Lt]` span
  ids (< width, -1 outside the completion), at the loss's `temperature`; logits built
  `chunk_size` positions at a time (`losses.token_logprobs`)."""
  teacher = nnx.merge(graphdef, state)
  s, length = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(length - 1), (s, length - 1))
  hidden, _ = teacher(tokens[:, :-1], positions, kv_mask=positions < lengths[:, None])
  unembed = teacher.unembedding() / temperature if temperature != 1.0 else teacher.unembedding()
  own = losses.token_logprobs(hidden, unembed, tokens[:, 1:], chunk_size=chunk_size)
  span = teacher_span[:, 1:]
  return span_sums(jnp.where(span >= 0, own, 0.0), span, width)


def cache_shardings(teachers, mesh) -> dict:
  """`{index: (sharding, sharding)}` of the teachers' `teacher_cache` pairs `[S, L-1]`: rows
  over the data axes where they divide, else replicated."""
  out = {}
  for t in teachers:
    if len(t.rows) % shd.data_parallel_size(mesh):
      sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    else:
      sharding = shd.batch_sharding(mesh, 2)
    out[t.index] = (sharding, sharding)
  return out


def teacher_cache(teacher: CrossTeacher, layout: dict, shardings, settings) -> tuple:
  """`(span_logp [S, L-1], student_span [S, L-1])` of one teacher for the step, placed by
  `shardings` (a pair), at `settings`' temperature and chunk size; `student_span` is shifted
  like the step's targets."""
  student_span = layout["student_span"][:, 1:]
  logp = span_logp(
    graphdef=teacher.graphdef,
    state=teacher.state,
    tokens=jnp.asarray(layout["tokens"]),
    lengths=jnp.asarray(layout["prompt_lengths"] + layout["completion_lengths"]),
    teacher_span=jnp.asarray(layout["teacher_span"]),
    width=student_span.shape[1],
    temperature=settings.temperature,
    chunk_size=settings.chunk_size,
  )
  return (
    jax.device_put(logp, shardings[0]),
    jax.device_put(jnp.asarray(student_span), shardings[1]),
  )


def span_loss(
  hidden, unembed, targets, mask, behaviour_logp, teacher_span_logp, student_span, settings
):
  """The span sampled-token loss on one teacher's rows → (loss, metrics).

  `hidden [S, T, D]` the student's, `unembed [D, V]`, `targets`, `mask`, `behaviour_logp`,
  `student_span [S, T]`; `teacher_span_logp [S, ≥T]` per span id (span ids < T).

  metrics: `loss`; `reverse_kl`, `student_logp`, `teacher_logp`: the sequence's log q, log p_T
  (its teacher tokens) and their difference (a k1 estimate of the sequence reverse KL) per
  student token with a span; `dropped_tokens` the share of completion tokens without one;
  `clip_fraction`, `tokens`."""
  t = targets.shape[1]
  if settings.temperature != 1.0:
    unembed = unembed / settings.temperature
  student_logp = losses.token_logprobs(hidden, unembed, targets, chunk_size=settings.chunk_size)
  per_span = sg(teacher_span_logp[:, :t])
  ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), per_span.shape)
  loss, aux = span_sampled_token_loss(
    student_logp, per_span, student_span, ids, mask,
    behaviour_logp=behaviour_logp, clip_eps=settings.clip_eps, normalize=settings.normalize,
    icepop_c=settings.icepop_c, kl_weight=settings.kl_weight,
  )  # fmt: skip
  has = mask * (student_span >= 0)
  n = jnp.maximum(jnp.sum(has), 1.0)
  s_sum = jnp.sum(jnp.where(has > 0, sg(student_logp), 0.0))
  first = jnp.where(has > 0, student_span, -1)
  # each span's teacher sum counted once: on the span's first student token
  starts = jnp.concatenate([first[:, :1] >= 0, first[:, 1:] != first[:, :-1]], axis=1)
  t_tok = jnp.take_along_axis(per_span, jnp.maximum(first, 0), axis=1)
  t_sum = jnp.sum(jnp.where((first >= 0) & starts, t_tok, 0.0))
  metrics = dict(
    loss=loss,
    reverse_kl=(s_sum - t_sum) / n,
    student_logp=s_sum / n,
    teacher_logp=t_sum / n,
    dropped_tokens=1.0 - jnp.sum(has) / jnp.maximum(jnp.sum(mask), 1.0),
    clip_fraction=aux["clip_fraction"],
    tokens=jnp.sum(mask),
  )
  return loss, metrics


def check_settings(settings: losses.LossSettings, name: str) -> None:
  """The span path implements the sampled-token loss only (the config's check, restated where
  the settings are built)."""
  if settings.loss != "sampled_token":
    raise ValueError(f"config.teachers.{name}.loss={settings.loss!r}: needs sampled_token")

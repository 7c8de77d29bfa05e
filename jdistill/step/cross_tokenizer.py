"""Teachers of another tokenizer in the OPD step: the host alignment, the teacher's span
log-probs, and the span losses on the student's rows.

Per step, for each such teacher (`config.teachers.<name>.tokenizer`):

1. host (:func:`layouts`): its rows of the student's rollouts re-tokenised and laid out for the
   teacher by `data.alignment.teacher_rollouts`, at the static width
   :func:`teacher_width` (`ceil(length_ratio · L)`), so the scorer compiles once;
2. device (:func:`span_logp` for sampled-token, :func:`dense_scores` for the dense reverse KL;
   jitted on their own, the teacher's state an argument): the teacher's forward on its own
   tokens, its log-prob of each of its tokens summed per span → `span_logp [S, L-1]` (span id
   → log p_T(span); a span id is < the completion length ≤ L-1); for the dense loss also the
   teacher's hidden state at each student token whose span is one equal token per side, with
   the teacher's log-normaliser there as one more column, and its unembedding gathered onto
   the student's vocabulary (`alignment.vocab_map`), so that their product is log p(m(v));
3. in the compiled step (:func:`span_loss`): `losses.span.span_sampled_token_loss` with the
   per-span teacher sums (each span one "teacher token", so the kernel's own span sums on the
   teacher side are the identity), or `losses.span.chunked_span_dense_loss`.

The step sees the teacher only as a dict in its `teacher_cache` (:func:`teacher_cache`), like
a streamed teacher's hidden states.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdistill import losses
from jdistill.data import alignment
from jdistill.losses.span import (
  LOG_NONE,
  chunked_span_dense_loss,
  span_sampled_token_loss,
  span_sums,
  teacher_matched,
)
from jdistill.runtime import sharding as shd
from jdistill.step.common import take_positions

sg = jax.lax.stop_gradient
# the losses a teacher of another tokenizer can take: the span sampled-token estimator, and
# the dense reverse KL on the matched vocabulary (the span term where a span is not one
# equal token per side); docs/design.md, "Dense across tokenizers"
LOSSES = ("sampled_token", "reverse_kl")
# the teacher_cache entries indexed by the student's positions (cut to the loss window)
PER_POSITION = ("student_span", "gate", "hidden", "tail_logp", "logp_at", "matched_at")
# the marginal reading's table of partials: at most this many int32 entries (256 MiB); its
# rows cached across steps per teacher, at most this many (then the cache starts again)
PARTIAL_TABLE_ENTRIES = 2**26
PARTIAL_ROWS_KEPT = 4096
_WARNED_FULL: set[int] = set()
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CrossTeacher:
  """A resident teacher with its own tokenizer: `index` into the step's specs, its `rows` of
  the batch, `graphdef`/`state`, the `student`/`teacher` alignment vocabularies,
  `length_ratio` (its width over the student's) and, for the dense loss, `vocab_map [Vs]`
  (`alignment.vocab_map`; None for sampled-token)."""

  index: int
  rows: tuple[int, ...]
  graphdef: object
  state: object
  student: alignment.Vocab
  teacher: alignment.Vocab
  length_ratio: float
  vocab_map: np.ndarray | None = None
  groups: np.ndarray | None = None  # `[Vt]` (`dense_match` "prefix" or "marginal")
  marginal: bool = False  # `dense_match = "marginal"`
  # partial bytes -> its `alignment.partial_groups` row, filled as rollouts bring new ones
  partial_rows: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  @property
  def dense(self) -> bool:
    return self.vocab_map is not None


def model_vocab_map(student: alignment.Vocab, teacher: alignment.Vocab, vocab: int) -> np.ndarray:
  """`alignment.vocab_map` over all `vocab` ids of the student *model* → `[vocab]` int32: a
  model's vocabulary may be padded past its tokenizer's (Qwen: 151,936 against 151,665), and
  those ids are unmatched (-1)."""
  own = alignment.vocab_map(student, teacher)[:vocab]
  out = np.full(vocab, -1, np.int32)
  out[: own.size] = own
  return out


def model_prefix_map(student: alignment.Vocab, teacher: alignment.Vocab, vocab: int) -> np.ndarray:
  """`alignment.prefix_map` over all `vocab` ids of the *teacher model* → `[vocab]` int32 (its
  ids past its tokenizer's: in no group, -1)."""
  own = alignment.prefix_map(student, teacher)[:vocab]
  out = np.full(vocab, -1, np.int32)
  out[: own.size] = own
  return out


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
  out = alignment.teacher_rollouts(
    teacher.student, teacher.teacher, records, tokens, prompt, completion,
    teacher_width(tokens.shape[1], teacher.length_ratio), use_chat_template=chat,
    partials=teacher.marginal,
  )  # fmt: skip
  if teacher.marginal:
    out["table"], out["partial_id"] = partial_table(teacher, out, len(teacher.vocab_map))
  return out


def _forward(graphdef, state, tokens, lengths, temperature):
  """The teacher's final hidden states `[S, Lt-1, Dt]` on its layout and its unembedding
  `[Dt, Vt]` at `temperature`."""
  teacher = nnx.merge(graphdef, state)
  s, length = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(length - 1), (s, length - 1))
  hidden, _ = teacher(tokens[:, :-1], positions, kv_mask=positions < lengths[:, None])
  unembed = teacher.unembedding() / temperature if temperature != 1.0 else teacher.unembedding()
  return hidden, unembed


def _span_sums_of(hidden, unembed, tokens, teacher_span, width, chunk_size):
  own = losses.token_logprobs(hidden, unembed, tokens[:, 1:], chunk_size=chunk_size)
  span = teacher_span[:, 1:]
  return span_sums(jnp.where(span >= 0, own, 0.0), span, width)


@functools.partial(jax.jit, static_argnames=("graphdef", "width", "temperature", "chunk_size"))
def span_logp(
  graphdef, state, tokens, lengths, teacher_span, width: int, temperature=1.0, chunk_size=0
):
  """The teacher's log p_T of each span of its rows → `[S, width]` f32 (0 past the last span).

  `tokens [S, Lt]` its layout, `lengths [S]` prompt + completion, `teacher_span [S, Lt]` span
  ids (< width, -1 outside the completion), at the loss's `temperature`; logits built
  `chunk_size` positions at a time (`losses.token_logprobs`)."""
  hidden, unembed = _forward(graphdef, state, tokens, lengths, temperature)
  return _span_sums_of(hidden, unembed, tokens, teacher_span, width, chunk_size)


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "chunk_size"))
def dense_scores(
  graphdef, state, tokens, lengths, teacher_span, student_span, single, vocab_map,
  temperature=1.0, chunk_size=0,
) -> dict:  # fmt: skip
  """The teacher's side of the dense loss across tokenizers → a dict of arrays.

  `tokens`, `lengths`, `teacher_span` as :func:`span_logp`; `student_span [S, W]` the span id
  of each student position (shifted as the step's targets, -1 for none), `single [S, W]` per
  span id (one equal token per side), `vocab_map [Vs]`. Returns `span_logp [S, W]`, `gate
  [S, W]` f32 (the position's span is single), `hidden [S, W, Dt+1]` (at a gated position the
  teacher's hidden state where it scores the span's token, then its log-normaliser; 0
  elsewhere) and `unembed [Dt+1, Vs]` (the teacher's columns of each student id's matched
  token, then a row of -1): `hidden @ unembed` is log p(m(v)) at every gated position;
  `tail_logp [S, W]` there log p̄, the teacher's mass on the ids no student id is matched to;
  and `matched [Vs]` (the student ids with a teacher token)."""
  hidden, unembed = _forward(graphdef, state, tokens, lengths, temperature)
  per_span, gate, h = _at_single_spans(
    hidden, unembed, tokens, teacher_span, student_span, single, chunk_size
  )
  log_z = _log_normaliser(h, unembed, None, chunk_size)
  unmatched = ~teacher_matched(vocab_map, unembed.shape[1])
  tail = _log_normaliser(h, unembed, jnp.where(unmatched, 0.0, LOG_NONE), chunk_size) - log_z
  tail = jnp.where(jnp.any(unmatched), tail, LOG_NONE)
  h_ext = jnp.concatenate([h.astype(jnp.float32), log_z[..., None]], axis=-1)
  u_at = jnp.take(unembed.astype(jnp.float32), jnp.maximum(vocab_map, 0), axis=1)
  return dict(
    span_logp=per_span,
    gate=gate.astype(jnp.float32),
    hidden=jnp.where(gate[..., None], h_ext, 0.0),
    unembed=jnp.concatenate([u_at, -jnp.ones((1, u_at.shape[1]), jnp.float32)], axis=0),
    matched=vocab_map >= 0,
    tail_logp=jnp.where(gate, tail, 0.0),
  )


def _at_single_spans(hidden, unembed, tokens, teacher_span, student_span, single, chunk_size):
  """The span sums `[S, W]`, the gate `[S, W]` bool (the student position's span is single)
  and the teacher's hidden state where it scores that span's one token `[S, W, Dt]` (position
  0's elsewhere)."""
  width = student_span.shape[1]
  per_span = _span_sums_of(hidden, unembed, tokens, teacher_span, width, chunk_size)
  span = teacher_span[:, 1:]
  index = jnp.broadcast_to(jnp.arange(span.shape[1], dtype=jnp.int32), span.shape)
  position_of_span = span_sums(index, span, width)  # on a single span, its one position
  sid = jnp.maximum(student_span, 0)
  gate = (student_span >= 0) & jnp.take_along_axis(single.astype(bool), sid, axis=1)
  at = jnp.where(gate, jnp.take_along_axis(position_of_span, sid, axis=1), 0)
  return per_span, gate, take_positions(hidden, at)


@functools.partial(jax.jit, static_argnames=("graphdef", "vocab", "temperature", "chunk_size"))
def prefix_scores(
  graphdef, state, tokens, lengths, teacher_span, student_span, single, groups, vocab: int,
  temperature=1.0, chunk_size=0,
) -> dict:  # fmt: skip
  """The teacher's side of the dense loss read by prefix (`teachers.<name>.dense_match =
  "prefix"`) → a dict of arrays, as :func:`dense_scores` but with the teacher's log-probs on
  the student's ids given directly: `logp_at [S, W, vocab]` at a gated position is the log of
  the teacher's mass on the tokens whose text begins with each student id's
  (`groups [Vt]`, `alignment.prefix_map` padded to the teacher model's vocabulary), 0 where
  none does (unmatched) and elsewhere; `tail_logp` the mass of the tokens in no group;
  `matched [vocab]` the ids with a group; `hidden [S, W, 1]` and `unembed [1, vocab]` zeros.
  The `[S, c, Vt]` log-softmax is built `c` positions at a time (`chunk_size`; 0: 64)."""
  hidden, unembed = _forward(graphdef, state, tokens, lengths, temperature)
  per_span, gate, h = _at_single_spans(
    hidden, unembed, tokens, teacher_span, student_span, single, chunk_size
  )
  segment = jnp.where(groups >= 0, groups, vocab)  # the tail is segment `vocab`

  def grouped(hc):  # [S, c, Dt] -> [S, c, vocab + 1] log of each group's mass
    logp = jax.nn.log_softmax(losses.project_logits(hc, unembed), axis=-1)
    return jnp.maximum(grouped_log_mass(logp, segment, vocab + 1), LOG_NONE)

  logp = _map_positions(grouped, h, chunk_size)
  s, w = gate.shape
  matched = jnp.zeros((vocab + 1,), bool).at[segment].set(True)[:vocab]
  on = gate[..., None] & matched
  return dict(
    span_logp=per_span,
    gate=gate.astype(jnp.float32),
    hidden=jnp.zeros((s, w, 1), jnp.float32),
    unembed=jnp.zeros((1, vocab), jnp.float32),
    logp_at=jnp.where(on, logp[..., :vocab], 0.0),
    matched=matched,
    tail_logp=jnp.where(gate & jnp.any(groups < 0), logp[..., vocab], LOG_NONE),
  )


def grouped_log_mass(logp, segment, n: int):
  """``log Σ_{t: segment[..., t] = g} exp(logp[..., t])`` for g < `n` -> ``[..., n]`` f32
  (-inf for an empty group; segments >= `n` are dropped). `logp`, `segment` ``[..., Vt]``."""
  lead, vt = logp.shape[:-1], logp.shape[-1]

  def one(lp, seg):  # [Vt], [Vt] -> [n]
    seg = jnp.where((seg >= 0) & (seg < n), seg, n)  # segment n: dropped
    top = jax.ops.segment_max(lp, seg, num_segments=n + 1)  # -inf where empty
    safe = jnp.where(jnp.isfinite(top), top, 0.0)
    mass = jax.ops.segment_sum(jnp.exp(lp - safe[seg]), seg, num_segments=n + 1)
    return jnp.where(jnp.isfinite(top), safe + jnp.log(jnp.maximum(mass, 1e-38)), -jnp.inf)[:n]

  logp = logp.reshape(-1, vt).astype(jnp.float32)
  if segment.ndim == 1:  # one grouping for every position
    return jax.vmap(one, in_axes=(0, None))(logp, segment).reshape(*lead, n)
  return jax.vmap(one)(logp, segment.reshape(-1, vt)).reshape(*lead, n)


def _map_positions(fn, x, chunk_size, *more):
  """`fn` on `c` positions at a time of `x [S, W, ...]` (and of each of `more`, same `[S, W]`
  leading axes) -> its `[S, c, ...]` results joined to `[S, W, ...]` (`c` = `chunk_size`, 0:
  64), so a `[S, c, Vt]` log-softmax is the largest array built."""
  c = chunk_size or 64
  s, w = x.shape[:2]
  n = -(-w // c)

  def split(a):
    a = jnp.pad(a, ((0, 0), (0, n * c - w)) + ((0, 0),) * (a.ndim - 2))
    return a.reshape(s, n, c, *a.shape[2:]).swapaxes(0, 1)

  out = jax.lax.map(lambda args: fn(*args), (split(x), *(split(m) for m in more)))
  return jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(s, n * c, *a.shape[3:])[:, :w], out)


@functools.partial(jax.jit, static_argnames=("graphdef", "vocab", "temperature", "chunk_size"))
def marginal_scores(
  graphdef, state, tokens, lengths, teacher_span, student_span, partial_from, partial_next,
  partial_id, table, groups, vocab: int, temperature=1.0, chunk_size=0,
) -> dict:  # fmt: skip
  """The teacher's side of the dense loss read as its next-token marginal at *every* student
  position (`teachers.<name>.dense_match = "marginal"`; docs/design.md, "The marginal
  reading") -> the dict of :func:`prefix_scores`, with `matched_at [S, W, vocab]` (the ids
  matched at each position) for `matched`.

  At student position w the teacher has spelt a partial token `x` (`alignment.row_partials`)
  since the hidden state `partial_from [S, W]`; with `p_b` its distribution there and `G`
  its tokens grouped by what they spell after `x` (`table[partial_id]`,
  `alignment.partial_groups`: `vocab` for no student id, `vocab + 1` for `x` itself, more for
  the tokens that do not begin with `x`), the next student token v has
  `p(v) = [p_b(G = v) + p_b(x) · p_n(v)] / p_b(begins with x)`, where at a teacher boundary
  `p_n(v)` is the prefix reading at `partial_next` (`groups [Vt]`) and inside a teacher token
  the `p_b(x)` term goes to the tail (a forward that ends a token there was never run).
  `logp_at` is that, `matched_at` where it is nonzero, `tail_logp` the rest; `gate` where the
  position has a span, a row of the table (`partial_id` >= 0) and a teacher token that begins
  with its partial."""
  hidden, unembed = _forward(graphdef, state, tokens, lengths, temperature)
  w = student_span.shape[1]
  per_span = _span_sums_of(hidden, unembed, tokens, teacher_span, w, chunk_size)
  segment = jnp.where(groups >= 0, groups, vocab)

  def read(at_from, at_next, boundary, pid):
    lp = lambda idx: jax.nn.log_softmax(  # noqa: E731
      losses.project_logits(take_positions(hidden, idx), unembed), axis=-1
    )
    a = grouped_log_mass(lp(at_from), table[pid], vocab + 2)  # groups, tail, x itself
    whole = jax.nn.logsumexp(a, axis=-1)  # p_b(begins with x)
    n = grouped_log_mass(lp(at_next), segment, vocab + 1)
    exact = a[..., vocab + 1 :]
    b = boundary[..., None]
    numer = jnp.where(b, jnp.logaddexp(a[..., :vocab], exact + n[..., :vocab]), a[..., :vocab])
    tail = jnp.where(
      boundary, jnp.logaddexp(a[..., vocab], exact[..., 0] + n[..., vocab]),
      jnp.logaddexp(a[..., vocab], exact[..., 0]),
    )  # fmt: skip
    return numer - whole[..., None], tail - whole, jnp.isfinite(whole)

  at_from, at_next = jnp.maximum(partial_from, 0), jnp.maximum(partial_next, 0)
  logp, tail, spelt = _map_positions(
    read, at_from, chunk_size, at_next, partial_next >= 0, jnp.maximum(partial_id, 0)
  )
  # spelt: some teacher token begins with the partial (not so after a special token's text)
  gate = (student_span >= 0) & (partial_id >= 0) & (partial_from >= 0) & spelt
  matched_at = gate[..., None] & jnp.isfinite(logp)
  s = student_span.shape[0]
  return dict(
    span_logp=per_span,
    gate=gate.astype(jnp.float32),
    hidden=jnp.zeros((s, w, 1), jnp.float32),
    unembed=jnp.zeros((1, vocab), jnp.float32),
    logp_at=jnp.where(matched_at, logp, 0.0),
    matched_at=matched_at,
    tail_logp=jnp.where(gate & jnp.isfinite(tail), tail, LOG_NONE),
  )


def partial_table(teacher: CrossTeacher, layout: dict, vocab: int):
  """The marginal reading's groups for a batch (host) -> (`table [P, Vt]` int32, `partial_id
  [S, L]` int32): row 0 the prefix groups (an empty partial; `teacher.groups`, the tail as
  `vocab`), then one row per distinct partial of the batch (`alignment.partial_groups`, ids
  past the teacher's tokenizer dropped). `P` is static (the batch's positions + 1, at most
  :data:`PARTIAL_TABLE_ENTRIES` / Vt); a position whose partial finds no row gets -1 (no
  dense term there)."""
  groups = np.asarray(teacher.groups)
  vt = groups.size
  text = layout["partial"]
  rows = min(text.size + 1, max(2, PARTIAL_TABLE_ENTRIES // vt))
  table = np.full((rows, vt), vocab + 2, np.int32)
  table[0] = np.where(groups >= 0, groups, vocab)
  ids = np.full(text.shape, -1, np.int32)
  index = {b"": 0}
  if len(teacher.partial_rows) > PARTIAL_ROWS_KEPT:
    teacher.partial_rows.clear()
  dropped = 0
  for pos in zip(*np.nonzero(layout["partial_from"] >= 0), strict=True):
    x = text[pos]
    if x not in index:
      if len(index) == rows:
        dropped += 1
        continue
      row = teacher.partial_rows.get(x)
      if row is None:
        row = alignment.partial_groups(teacher.student, teacher.teacher, x, vocab)
        teacher.partial_rows[x] = row
      table[len(index), : row.size] = row
      index[x] = len(index)
    ids[pos] = index[x]
  if dropped and teacher.index not in _WARNED_FULL:
    _WARNED_FULL.add(teacher.index)
    log.warning(
      "teacher %d (dense_match = marginal): a batch has more distinct partial tokens than its "
      "table's %d rows (%d int32 entries at %d teacher ids); %d positions get no dense term "
      "(dense_tokens in its metrics says how many are left). Warned once.",
      teacher.index, rows, PARTIAL_TABLE_ENTRIES, vt, dropped,
    )  # fmt: skip
  return table, ids


def _log_normaliser(hidden, unembed, bias, chunk_size):
  """log Σ_v exp(logit_v + bias_v) at each position of `hidden [S, W, D]` → `[S, W]` f32,
  chunked as the loss kernels are: a token's logit minus its log-prob (`token_logprobs`), for a
  token where the bias is highest (so it counts)."""
  token = 0 if bias is None else jnp.argmax(bias)
  logit = jnp.dot(hidden, unembed[:, token], preferred_element_type=jnp.float32)
  if bias is not None:
    logit = logit + bias[token]
  ids = jnp.full(hidden.shape[:2], token, jnp.int32)
  return logit - losses.token_logprobs(hidden, unembed, ids, chunk_size=chunk_size, bias=bias)


def cache_shardings(teachers, mesh) -> dict:
  """`{index: {key: sharding}}` of the teachers' `teacher_cache` entries (:func:`teacher_cache`):
  rows over the data axes where they divide, else replicated; the gathered unembedding
  replicated."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  out = {}
  for t in teachers:
    rows = lambda ndim: (  # noqa: E731
      replicated if len(t.rows) % shd.data_parallel_size(mesh) else shd.batch_sharding(mesh, ndim)
    )
    out[t.index] = dict(span_logp=rows(2), student_span=rows(2))
    if t.dense:
      out[t.index].update(gate=rows(2), hidden=rows(3), tail_logp=rows(2), unembed=replicated)
      if t.groups is not None:
        out[t.index]["logp_at"] = rows(3)
      if t.marginal:
        out[t.index]["matched_at"] = rows(3)
      else:
        out[t.index]["matched"] = replicated
  return out


def teacher_cache(teacher: CrossTeacher, layout: dict, shardings: dict, settings) -> dict:
  """One teacher's `teacher_cache` entry for the step, placed by `shardings`, at `settings`'
  temperature and chunk size: `span_logp [S, L-1]` and `student_span [S, L-1]` (shifted like
  the step's targets), and for the dense loss `gate`, `hidden`, `unembed`, `tail_logp` and
  `matched`
  (:func:`dense_scores`)."""
  student_span = jnp.asarray(layout["student_span"][:, 1:])
  forward = dict(
    graphdef=teacher.graphdef,
    state=teacher.state,
    tokens=jnp.asarray(layout["tokens"]),
    lengths=jnp.asarray(layout["prompt_lengths"] + layout["completion_lengths"]),
    teacher_span=jnp.asarray(layout["teacher_span"]),
    temperature=settings.temperature,
    chunk_size=settings.chunk_size,
  )
  if teacher.marginal:
    table, partial_id = layout["table"], layout["partial_id"]
    out = marginal_scores(
      **forward, student_span=student_span, partial_from=jnp.asarray(layout["partial_from"][:, 1:]),
      partial_next=jnp.asarray(layout["partial_next"][:, 1:]),
      partial_id=jnp.asarray(partial_id[:, 1:]), table=jnp.asarray(table),
      groups=jnp.asarray(teacher.groups), vocab=len(teacher.vocab_map),
    )  # fmt: skip
  elif teacher.dense and teacher.groups is not None:
    out = prefix_scores(
      **forward, student_span=student_span, single=jnp.asarray(layout["single"][:, :-1]),
      groups=jnp.asarray(teacher.groups), vocab=len(teacher.vocab_map),
    )  # fmt: skip
  elif teacher.dense:
    out = dense_scores(
      **forward, student_span=student_span, single=jnp.asarray(layout["single"][:, :-1]),
      vocab_map=jnp.asarray(teacher.vocab_map),
    )  # fmt: skip
  else:
    out = dict(span_logp=span_logp(**forward, width=student_span.shape[1]))
  out["student_span"] = student_span
  return {k: jax.device_put(v, shardings[k]) for k, v in out.items()}


def window(entry: dict, idx) -> dict:
  """`entry` (:func:`teacher_cache`) at the positions `idx [S, W]` (`common.completion_window`)."""
  return {k: take_positions(v, idx) if k in PER_POSITION else v for k, v in entry.items()}


def span_loss(hidden, unembed, targets, mask, behaviour_logp, entry: dict, settings):
  """The span loss on one teacher's rows → (loss, metrics): sampled-token
  (`losses.span.span_sampled_token_loss`) or, with `settings.loss` "reverse_kl", the dense
  loss (`losses.span.chunked_span_dense_loss`).

  `hidden [S, T, D]` the student's, `unembed [D, V]`, `targets`, `mask`, `behaviour_logp`
  `[S, T]`; `entry` this teacher's :func:`teacher_cache` entry at the same T positions
  (`span_logp [S, ≥T]` per span id, span ids < T).

  metrics: `loss`; `reverse_kl`, `student_logp`, `teacher_logp`: the sequence's log q, log p_T
  (its teacher tokens) and their difference (a k1 estimate of the sequence reverse KL) per
  student token with a span; `dropped_tokens` the share of completion tokens without one;
  `dense_tokens` the share of those with a span scored by the dense term (0 for
  sampled-token); `clip_fraction`, `tokens`."""
  t = targets.shape[1]
  if settings.temperature != 1.0:
    unembed = unembed / settings.temperature
  per_span = sg(entry["span_logp"][:, :t])
  student_span = entry["student_span"]
  rl = dict(clip_eps=settings.clip_eps, normalize=settings.normalize, icepop_c=settings.icepop_c)
  if "gate" in entry:
    loss, aux = chunked_span_dense_loss(
      hidden, unembed, entry["hidden"], entry["unembed"], targets, per_span,
      entry["tail_logp"], student_span, entry["gate"],
      entry["matched_at"] if "matched_at" in entry else entry["matched"], mask,
      behaviour_logp=behaviour_logp, chunk_size=settings.chunk_size,
      teacher_logp_at=entry.get("logp_at"), kl_weight=settings.kl_weight, **rl,
    )  # fmt: skip
    student_logp = aux["student_logp"]
  else:
    student_logp = losses.token_logprobs(hidden, unembed, targets, chunk_size=settings.chunk_size)
    ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), per_span.shape)
    loss, aux = span_sampled_token_loss(
      student_logp, per_span, student_span, ids, mask, behaviour_logp=behaviour_logp,
      kl_weight=settings.kl_weight, **rl,
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
    dense_tokens=jnp.sum(has * aux.get("dense", 0.0)) / n,
    clip_fraction=aux["clip_fraction"],
    tokens=jnp.sum(mask),
  )
  return loss, metrics


def check_settings(settings: losses.LossSettings, name: str) -> None:
  """The span path implements :data:`LOSSES` only (the config's check, restated where the
  settings are built)."""
  if settings.loss not in LOSSES:
    raise ValueError(f"config.teachers.{name}.loss={settings.loss!r}: needs one of {LOSSES}")

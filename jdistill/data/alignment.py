"""Alignment of a student's rollout with a teacher that speaks another tokenizer.

The student's completion ids are turned back into bytes (each token's own bytes, so a
multi-byte character split across tokens survives), the text is tokenised by the teacher's
tokenizer, and the two tokenisations are cut into *spans*: the stretches between consecutive
offsets where both sides have a token boundary and which fall on a character boundary (a
common cut inside a UTF-8 character is not a boundary). Every student token and every teacher
token of the completion then belongs to exactly one span, and the span's log-probability on
each side is the sum of its tokens' log-probabilities (`jdistill.losses.span`).

Special tokens are segments of their own: the student's EOS becomes the teacher's EOS, a
special token whose text the teacher also has as a special token becomes that token, and any
other is scored as its literal text (the teacher's plain tokens of it; a rollout never stops
the run). Text is never read as the teacher's special tokens (`split_special_tokens`). Bytes
that are not valid UTF-8 (a byte-level student can sample a lone continuation byte) become the
teacher's single-byte tokens.

A teacher whose vocabulary is the student's (same bytes per id) scores the student's own ids:
no re-tokenisation, one span per token, which is today's same-tokenizer path exactly.

Offsets are byte offsets into the completion's UTF-8; everything per row is a NumPy pass, and
:func:`align_batch` pads to static shapes (`[B, T]` student, `[B, Tt]` teacher) so the step
compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import numpy as np

from jdistill.data.prompts import encode_full_prompt


@functools.cache
def _byte_decoder() -> dict[str, int]:
  """GPT-2's byte-to-unicode table, inverted: the character a byte-level BPE prints for a
  byte -> the byte."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1))
  bs += list(range(0xAE, 0xFF + 1))
  cs = list(bs)
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _is_byte_level(tokenizer) -> bool:
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    return False
  decoder = json.loads(backend.to_str()).get("decoder") or {}
  return decoder.get("type") == "ByteLevel"


def _special_tokens(tokenizer) -> dict[int, str]:
  """id -> text of the tokenizer's special tokens (its named ones and the added specials)."""
  special = {i: tokenizer.convert_ids_to_tokens(i) for i in tokenizer.all_special_ids}
  for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
    if tok.special:
      special[tokenizer.convert_tokens_to_ids(tok.content)] = tok.content
  return special


def vocab_bytes(tokenizer) -> list[bytes]:
  """The UTF-8 bytes of every token id of `tokenizer` (`len(tokenizer)` entries): read off the
  byte-level alphabet for a byte-level BPE, a special token's own text, else `decode([id])`
  (right for tokenizers whose tokens decode alone to their text; a SentencePiece "▁" space is
  not, and its rows then fail the byte check of :func:`align_row`)."""
  n = len(tokenizer)
  special = _special_tokens(tokenizer)
  if _is_byte_level(tokenizer):
    table = _byte_decoder()
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    out = []
    for i, piece in enumerate(pieces):
      if i in special:
        out.append(special[i].encode())
      elif piece is not None and all(c in table for c in piece):
        out.append(bytes(table[c] for c in piece))
      else:  # an added, non-special token holds its text as is
        out.append((piece or "").encode())
    return out
  return [special[i].encode() if i in special else tokenizer.decode([i]).encode() for i in range(n)]


@dataclasses.dataclass(frozen=True)
class Vocab:
  """What the alignment needs of one tokenizer, computed once: `tokenizer`, `pieces` (bytes
  per id), `special` (id -> text of the special tokens), `eos` (id or None) and `byte_ids`
  (a single byte -> the id of the token that is exactly that byte)."""

  tokenizer: object
  pieces: tuple[bytes, ...]
  special: dict[int, str]
  eos: int | None
  byte_ids: dict[int, int]

  @classmethod
  def of(cls, tokenizer) -> Vocab:
    pieces = tuple(vocab_bytes(tokenizer))
    special = _special_tokens(tokenizer)
    byte_ids = {}
    for i, p in enumerate(pieces):
      if len(p) == 1 and i not in special:
        byte_ids.setdefault(p[0], i)
    return cls(tokenizer, pieces, special, tokenizer.eos_token_id, byte_ids)


@dataclasses.dataclass(frozen=True)
class RowAlignment:
  """One row's completion, unpadded: `teacher_ids [Nt]` (the teacher's tokens of the
  student's completion), `student_span [Ns]` and `teacher_span [Nt]` (each token's span id,
  0..n_spans-1 in order), `single [n_spans]` (the span is one token on both sides with equal
  bytes) and `student_offsets [Ns + 1]`, `teacher_offsets [Nt + 1]` (byte offsets of the token
  boundaries; a mapped special token spans its student bytes on the teacher side)."""

  teacher_ids: np.ndarray
  student_span: np.ndarray
  teacher_span: np.ndarray
  single: np.ndarray
  student_offsets: np.ndarray
  teacher_offsets: np.ndarray

  @property
  def n_spans(self) -> int:
    return len(self.single)


def _segments(student: Vocab, ids):
  """The completion cut into ("special", id) and ("bytes", [ids]) segments."""
  out, run = [], []
  for i in ids:
    i = int(i)
    if i in student.special:
      if run:
        out.append(("bytes", run))
        run = []
      out.append(("special", i))
    else:
      run.append(i)
  if run:
    out.append(("bytes", run))
  return out


def _map_special(student: Vocab, teacher: Vocab, i: int) -> int | None:
  """The teacher's special token for the student's special token `i`: by equal text, or
  EOS for EOS; None where it has none."""
  text = student.special[i]
  by_text = {t: j for j, t in teacher.special.items()}
  if text in by_text:
    return by_text[text]
  if i == student.eos and teacher.eos is not None:
    return teacher.eos
  return None


_ESCAPED = re.compile("([\udc80-\udcff])")  # an invalid byte under "surrogateescape"


def _teacher_bytes_ids(teacher: Vocab, data: bytes) -> list[int]:
  """The teacher's tokens of `data`: its own tokenisation of each valid UTF-8 stretch (one
  batched call), its single-byte tokens for the invalid bytes."""
  pieces = [p for p in _ESCAPED.split(data.decode("utf-8", "surrogateescape")) if p]
  texts = [p for p in pieces if not (len(p) == 1 and "\udc80" <= p <= "\udcff")]
  encoded = iter(
    teacher.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if texts
    else []
  )
  ids = []
  for piece in pieces:
    if len(piece) == 1 and "\udc80" <= piece <= "\udcff":
      b = ord(piece) - 0xDC00
      if b not in teacher.byte_ids:
        raise ValueError(f"byte 0x{b:02x} is not valid UTF-8 and the teacher has no token for it")
      ids.append(teacher.byte_ids[b])
    else:
      ids += next(encoded)
  return ids


def _char_starts(data: bytes) -> np.ndarray:
  """1 at every byte offset 0..len(data) where a character starts (an invalid byte is a
  character of its own); the end offset counts."""
  text = data.decode("utf-8", "surrogateescape")
  widths = np.fromiter(
    (len(c.encode("utf-8", "surrogateescape")) for c in text), np.int64, len(text)
  )
  starts = np.zeros(len(data) + 1, bool)
  starts[np.concatenate([[0], np.cumsum(widths)])] = True
  return starts


def align_row(
  student: Vocab, teacher: Vocab, completion_ids, same_vocab: bool | None = None
) -> RowAlignment:
  """Aligns one row's completion (student ids, no padding) with the teacher's tokenisation;
  `same_vocab` (whether both have the same bytes per id) is computed when None."""
  ids = np.asarray(completion_ids, np.int64).reshape(-1)
  s_len = np.fromiter((len(student.pieces[i]) for i in ids), np.int64, len(ids))
  if same_vocab is None:
    same_vocab = teacher.pieces == student.pieces
  if same_vocab:  # the same vocabulary scores the student's own ids
    n = len(ids)
    offsets = np.concatenate([[0], np.cumsum(s_len)])
    span = np.arange(n)
    return RowAlignment(ids, span, span.copy(), np.ones(n, bool), offsets, offsets.copy())
  t_ids, t_len, data = [], [], []
  for kind, seg in _segments(student, ids):
    mapped = _map_special(student, teacher, seg) if kind == "special" else None
    if mapped is not None:
      t_ids.append(mapped)
      t_len.append(len(student.pieces[seg]))  # the teacher's special covers the student's
      data.append(student.pieces[seg])
    else:  # text, or a special token the teacher lacks: its literal text
      chunk = b"".join(student.pieces[i] for i in ([seg] if kind == "special" else seg))
      seg_ids = _teacher_bytes_ids(teacher, chunk)
      lengths = [len(teacher.pieces[j]) for j in seg_ids]
      if sum(lengths) != len(chunk):
        raise ValueError(
          f"the teacher's tokens of {chunk[:40]!r}... cover {sum(lengths)} bytes, not "
          f"{len(chunk)}: its tokenizer changes the text (a normalizer?)"
        )
      t_ids += seg_ids
      t_len += lengths
      data.append(chunk)
  data = b"".join(data)
  s_off = np.concatenate([[0], np.cumsum(s_len)])
  t_off = np.concatenate([[0], np.cumsum(np.asarray(t_len, np.int64))])
  common = np.intersect1d(s_off[1:], t_off[1:])
  common = common[_char_starts(data)[common]]
  if len(common) and common[-1] != len(data):
    raise AssertionError("the completion's end must be a boundary on both sides")
  s_span = np.searchsorted(common, s_off[1:])
  t_span = np.searchsorted(common, t_off[1:])
  n = len(common)
  t_ids = np.asarray(t_ids, np.int64)
  s_count = np.bincount(s_span, minlength=n)
  t_count = np.bincount(t_span, minlength=n)
  single = (s_count == 1) & (t_count == 1)
  if single.any():  # equal bytes: the lone student and teacher token of the span
    s_first = np.searchsorted(s_span, np.arange(n))
    t_first = np.searchsorted(t_span, np.arange(n))
    for k in np.flatnonzero(single):
      si, ti = int(ids[s_first[k]]), int(t_ids[t_first[k]])
      single[k] = student.pieces[si] == teacher.pieces[ti]
  return RowAlignment(t_ids, s_span, t_span, single, s_off, t_off)


def teacher_prompt_ids(teacher: Vocab, record, *, use_chat_template: bool) -> list[int]:
  """The teacher's prompt for a prompt record: rendered with the *teacher's* chat template
  (when `use_chat_template` and it has one) and tokenised by the teacher, as
  `data.prompts.encode_full_prompt` does for the student."""
  chat = use_chat_template and bool(getattr(teacher.tokenizer, "chat_template", None))
  return encode_full_prompt(record, teacher.tokenizer, use_chat_template=chat)


def _fit(row: RowAlignment, room: int) -> tuple[int, int, int]:
  """The spans of `row` whose teacher tokens fit whole in `room` -> (spans, teacher tokens,
  student tokens) kept."""
  keep = row.n_spans
  if len(row.teacher_ids) > room:
    keep = int(row.teacher_span[room])
  return (
    keep,
    int(np.searchsorted(row.teacher_span, keep)),
    int(np.searchsorted(row.student_span, keep)),
  )


def align_batch(student: Vocab, teacher: Vocab, completions, mask, teacher_len: int) -> dict:
  """Aligns a batch of completions, padded to static shapes.

  Args:
    completions: `[B, T]` student ids of the completions (left-aligned).
    mask: `[B, T]` 1 on the completion's tokens (a prefix of each row).
    teacher_len: `Tt`, the teacher completion width (static).

  Returns NumPy arrays: `teacher_ids [B, Tt]` (0 past the end), `teacher_mask [B, Tt]`,
  `student_span [B, T]` and `teacher_span [B, Tt]` (span ids < T; -1 on padding and on the
  spans cut off because their teacher tokens run past `Tt`), `single [B, T]` (per span id, the
  one-token-equal-bytes mask), `dropped [B]` (student tokens left without a span by the cut).
  """
  completions, mask = np.asarray(completions), np.asarray(mask)
  b, t = completions.shape
  out = dict(
    teacher_ids=np.zeros((b, teacher_len), np.int32),
    teacher_mask=np.zeros((b, teacher_len), np.float32),
    student_span=np.full((b, t), -1, np.int32),
    teacher_span=np.full((b, teacher_len), -1, np.int32),
    single=np.zeros((b, t), bool),
    dropped=np.zeros((b,), np.int32),
  )
  same = teacher.pieces == student.pieces
  for r in range(b):
    n = int(mask[r].sum())
    row = align_row(student, teacher, completions[r, :n], same)
    keep_spans, nt, ns = _fit(row, teacher_len)
    out["teacher_ids"][r, :nt] = row.teacher_ids[:nt]
    out["teacher_mask"][r, :nt] = 1
    out["teacher_span"][r, :nt] = row.teacher_span[:nt]
    out["student_span"][r, :ns] = row.student_span[:ns]
    out["single"][r, :keep_spans] = row.single[:keep_spans]
    out["dropped"][r] = n - ns
  return out


def vocab_map(student: Vocab, teacher: Vocab) -> np.ndarray:
  """The teacher id of each student id whose token is the same string -> ``[Vs]`` int32, -1
  where the teacher has none, and for every student id after the first with the same bytes
  (the map is one-to-one, so the matched masses of both sides are distributions). Special
  tokens match by equal text, and the student's EOS is the teacher's EOS (as in
  :func:`align_row`). Built once per teacher."""
  by_bytes = {}
  for j, piece in enumerate(teacher.pieces):
    if j not in teacher.special:
      by_bytes.setdefault(piece, j)
  by_text = {text: j for j, text in teacher.special.items()}
  out = np.full(len(student.pieces), -1, np.int32)
  taken = set()
  for i, piece in enumerate(student.pieces):
    if i in student.special:
      j = by_text.get(student.special[i])
      if j is None and i == student.eos and teacher.eos is not None:
        j = teacher.eos
    else:
      j = by_bytes.get(piece)
    if j is not None and j not in taken:  # one-to-one: a second id of the same bytes is unmatched
      out[i] = j
      taken.add(j)
  return out


def teacher_rollouts(
  student: Vocab,
  teacher: Vocab,
  records,
  tokens,
  prompt_lengths,
  completion_lengths,
  teacher_len: int,
  *,
  use_chat_template: bool = True,
  partials: bool = False,
) -> dict:
  """The teacher's side of a batch of rollouts, in the trainer's right-padded layout.

  Args:
    records: the `B` prompt records (`prompt` or `messages`), rendered for the teacher by
      :func:`teacher_prompt_ids`.
    tokens: `[B, L]` the student's rollouts (prompt, completion, pad), `prompt_lengths` and
      `completion_lengths` `[B]`, as `sampling.layout.Rollouts` holds them.
    teacher_len: `Lt`, the teacher's sequence width (static).

  Returns NumPy arrays: `tokens [B, Lt]` (the teacher's prompt, its tokens of the
  completion, then the teacher's pad id, 0 if it has none), `prompt_lengths` and
  `completion_lengths [B]` (the teacher's), `completion_mask [B, Lt]`, `teacher_span [B, Lt]` and
  `student_span [B, L]` (span ids < L at the completion's positions, -1 elsewhere and on the
  spans that do not fit), `single [B, L]` (per span id) and `dropped [B]` (student tokens left
  without a span). A teacher prompt longer than `teacher_len` is a ValueError.

  With `partials` (the marginal reading, :func:`row_partials`), also at each student
  completion position `[B, L]`: `partial_from` the index into the teacher's hidden states
  (`[B, Lt-1]`, the forward on `tokens[:, :-1]`) where it scores the token the partial begins
  (-1 elsewhere), `partial_next` where it scores the token after a boundary (-1 if none) and
  `partial` (object) the partial's bytes.
  """
  tokens = np.asarray(tokens)
  b, width = tokens.shape
  pad = getattr(teacher.tokenizer, "pad_token_id", None) or 0
  out = dict(
    tokens=np.full((b, teacher_len), pad, np.int32),
    prompt_lengths=np.zeros((b,), np.int32),
    completion_lengths=np.zeros((b,), np.int32),
    completion_mask=np.zeros((b, teacher_len), np.float32),
    teacher_span=np.full((b, teacher_len), -1, np.int32),
    student_span=np.full((b, width), -1, np.int32),
    single=np.zeros((b, width), bool),
    dropped=np.zeros((b,), np.int32),
  )
  if partials:
    out.update(
      partial_from=np.full((b, width), -1, np.int32),
      partial_next=np.full((b, width), -1, np.int32),
      partial=np.full((b, width), b"", object),
    )
  same = teacher.pieces == student.pieces
  for r in range(b):
    p, n = int(prompt_lengths[r]), int(completion_lengths[r])
    prompt = teacher_prompt_ids(teacher, records[r], use_chat_template=use_chat_template)
    if len(prompt) >= teacher_len:
      raise ValueError(
        f"teacher_len={teacher_len}: row {r}'s teacher prompt alone is {len(prompt)} tokens"
      )
    row = align_row(student, teacher, tokens[r, p : p + n], same)
    keep, nt, ns = _fit(row, teacher_len - len(prompt))
    tp = len(prompt)
    out["tokens"][r, :tp] = prompt
    out["tokens"][r, tp : tp + nt] = row.teacher_ids[:nt]
    out["completion_mask"][r, tp : tp + nt] = 1
    out["prompt_lengths"][r], out["completion_lengths"][r] = tp, nt
    out["teacher_span"][r, tp : tp + nt] = row.teacher_span[:nt]
    out["student_span"][r, p : p + ns] = row.student_span[:ns]
    out["single"][r, :keep] = row.single[:keep]
    out["dropped"][r] = n - ns
    if partials:
      start, nxt, text = row_partials(student, tokens[r, p : p + ns], row)
      out["partial_from"][r, p : p + ns] = tp + start - 1
      out["partial_next"][r, p : p + ns] = np.where(nxt >= 0, tp + nxt - 1, -1)
      out["partial"][r, p : p + ns] = text
  return out


def row_partials(student: Vocab, completion_ids, row: RowAlignment):
  """Where the teacher stands at each student token of a row -> (`start [Ns]`, `next [Ns]`
  teacher token indices into `row.teacher_ids`, `partial [Ns]` bytes).

  For student token i at byte offset o: inside teacher token k (`offsets[k] < o`), the
  partial is the bytes of token k before o, `start` = k and `next` = -1; at a teacher
  boundary (o = offsets[k], k > 0) it is the whole previous token, `start` = k-1, `next` = k;
  at the completion's start it is empty, `start` = 0. The marginal reading
  (`step.cross_tokenizer.marginal_scores`) reads the teacher's next bytes from there."""
  ids = np.asarray(completion_ids).reshape(-1)
  data = b"".join(student.pieces[int(i)] for i in ids)
  s_off, t_off = row.student_offsets[: len(ids)], row.teacher_offsets
  k = np.searchsorted(t_off, s_off, side="right") - 1
  boundary = (t_off[k] == s_off) & (k > 0)
  start = np.where(boundary, k - 1, k)
  nxt = np.where(boundary, k, -1)
  text = np.empty(len(ids), object)
  for i, (b, o) in enumerate(zip(t_off[start], s_off, strict=True)):
    text[i] = data[b:o]
  return start.astype(np.int32), nxt.astype(np.int32), text


def _longest_student_prefix(student: Vocab):
  """bytes -> the student id whose (non-special) bytes are their longest prefix, or -1."""
  return _longest_prefix_of(student.pieces, frozenset(student.special))


@functools.lru_cache(maxsize=8)
def _longest_prefix_of(pieces: tuple[bytes, ...], special: frozenset):
  by_bytes = {}
  for i, piece in enumerate(pieces):
    if i not in special and piece:
      by_bytes.setdefault(piece, i)
  longest = max((len(p) for p in by_bytes), default=0)

  def find(data: bytes) -> int:
    for n in range(min(longest, len(data)), 0, -1):
      i = by_bytes.get(data[:n])
      if i is not None:
        return i
    return -1

  return find


def partial_groups(student: Vocab, teacher: Vocab, partial: bytes, vocab: int) -> np.ndarray:
  """The teacher's ids grouped by what they spell after `partial` (nonempty) -> ``[Vt]``
  int32: the student id whose bytes are the longest prefix of the rest of the token (0 <= g <
  `vocab`); `vocab` where the rest begins with no student token; `vocab + 1` for the token that
  is `partial` exactly; `vocab + 2` for the tokens that do not begin with `partial` (and the
  special tokens)."""
  find = _longest_student_prefix(student)
  out = np.full(len(teacher.pieces), vocab + 2, np.int32)
  n = len(partial)
  for j, piece in enumerate(teacher.pieces):
    if j in teacher.special or not piece.startswith(partial):
      continue
    g = find(piece[n:]) if len(piece) > n else vocab + 1
    out[j] = vocab if g < 0 else g
  return out


def prefix_map(student: Vocab, teacher: Vocab) -> np.ndarray:
  """The student id each teacher id's text begins with -> ``[Vt]`` int32: the student token
  whose bytes are the longest prefix of the teacher token's (for a byte-level student of one
  byte per token: its first byte), so the groups partition the teacher's vocabulary. Special
  tokens go to the student's special of equal text (EOS to EOS, as :func:`vocab_map`); -1
  where there is none. Built once per teacher."""
  find = _longest_student_prefix(student)
  by_text = {text: i for i, text in student.special.items()}
  out = np.full(len(teacher.pieces), -1, np.int32)
  for j, piece in enumerate(teacher.pieces):
    if j in teacher.special:
      i = by_text.get(teacher.special[j])
      if i is None and j == teacher.eos and student.eos is not None:
        i = student.eos
      out[j] = -1 if i is None else i
    else:
      out[j] = find(piece)
  return out

"""Prompt data: read prompt files, tokenise prompts, and batch them per teacher.

A prompt record is a dict with a ``domain`` (str) and either a ``prompt`` (non-empty
str) or ``messages`` (non-empty list of ``{"role": str, "content": str}``, chat
format). Each domain belongs to exactly one teacher.

``PromptBatcher`` turns records into an endless, deterministic, exactly resumable
stream of fixed-shape batches: every global batch holds ``slots_per_teacher`` prompts
of each teacher, ordered by teacher, so the train step can slice teacher ``i``'s rows
``[i*S:(i+1)*S]`` with static shapes. It is a ``grain.MapDataset`` indexed by step,
so the iterator state is just the next step index.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jdistill.data.user_text import encode_text, holds_special_text, special_texts

OVERLONG_MODES = ("truncate_left", "drop", "error")


# ----------------------------------------------------------------------------- reading


def _check_record(raw: Any, prompt_field: str, messages_field: str, domain_field: str) -> dict:
  """Validates one raw record; returns ``{"domain", "prompt"|"messages"}`` or raises
  ValueError saying what is wrong (without location; the caller adds it)."""
  if not isinstance(raw, Mapping):
    raise ValueError(f"record is a {type(raw).__name__}, not an object")
  domain = raw.get(domain_field)
  if domain is None:
    raise ValueError(f"missing {domain_field!r}")
  if not isinstance(domain, str) or not domain:
    raise ValueError(f"{domain_field!r} must be a non-empty string, got {domain!r}")
  prompt, messages = raw.get(prompt_field), raw.get(messages_field)
  if prompt is not None:
    return {"domain": domain, "prompt": check_prompt(prompt, prompt_field)}
  if messages is not None:
    return {"domain": domain, "messages": check_messages(messages, messages_field)}
  raise ValueError(f"has neither {prompt_field!r} nor {messages_field!r}")


def check_prompt(prompt: Any, field: str = "prompt") -> str:
  """A record's text prompt, or ValueError naming `field` (without location)."""
  if not isinstance(prompt, str):
    raise ValueError(f"{field!r} must be a string, got {type(prompt).__name__}")
  if not prompt.strip():
    raise ValueError(f"empty {field!r}")
  return prompt


def check_messages(messages: Any, field: str = "messages") -> list[dict]:
  """A record's chat as `[{"role", "content"}, ...]`, or ValueError naming `field`."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError(f"{field!r} must be a non-empty list")
  out = []
  for k, m in enumerate(messages):
    if (
      not isinstance(m, Mapping)
      or not isinstance(m.get("role"), str)
      or not isinstance(m.get("content"), str)
    ):
      raise ValueError(f"{field}[{k}] must have string 'role' and 'content'")
    out.append({"role": m["role"], "content": m["content"]})
  if not any(m["content"].strip() for m in out):
    raise ValueError(f"empty {field!r} (all contents blank)")
  return out


def check_answer(answer: Any) -> str:
  """A record's reference answer as text: a string, or a finite number written out; anything
  else (a bool, a list, NaN) would be a reference no completion can match."""
  number = isinstance(answer, (int, float)) and not isinstance(answer, bool)
  if isinstance(answer, str) or (number and math.isfinite(answer)):
    return str(answer)
  raise ValueError(f"'answer' must be a string or a finite number, got {answer!r:.60}")


def _raw_records(path: str):
  """Yields ``(location, raw_record_or_exception)`` for a .jsonl or .parquet file."""
  if path.endswith(".jsonl"):
    with open(path, "rb") as f:
      for line_no, data in enumerate(f, start=1):
        try:
          line = data.decode("utf-8")
        except UnicodeDecodeError as e:
          yield f"{path}:{line_no}", ValueError(f"not UTF-8 ({e})")
          continue
        if not line.strip():
          continue
        try:
          raw = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
          raw = ValueError(f"bad JSON: {e}")
        yield f"{path}:{line_no}", raw
  elif path.endswith(".parquet"):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
      for raw in batch.to_pylist():
        yield f"{path}:row {row}", raw
        row += 1
  else:
    raise ValueError(f"unsupported prompt file type (want .jsonl or .parquet): {path}")


def read_prompt_records(
  path: str,
  *,
  prompt_field: str = "prompt",
  messages_field: str = "messages",
  domain_field: str = "domain",
  on_error: str = "raise",
) -> tuple[list[dict], int]:
  """Reads prompt records from a ``.jsonl`` or ``.parquet`` file.

  Returns ``(records, n_skipped)``; each record is ``{"domain": str, "prompt": str}`` or
  ``{"domain": str, "messages": [{"role", "content"}, ...]}``. A malformed record (bad
  JSON, missing/ill-typed domain, neither prompt nor messages, blank prompt) raises
  ``ValueError("<path>:<line>: <what is wrong>")`` (``<path>:row <n>`` for Parquet,
  0-based) when ``on_error="raise"``, or is logged and counted when ``"skip"``.
  A record with both fields keeps ``prompt``. Blank JSONL lines are ignored.
  """
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"prompt file not found: {path}")
  records, n_skipped = [], 0
  for where, raw in _raw_records(path):
    try:
      if isinstance(raw, Exception):
        raise raw
      record = dict(_check_record(raw, prompt_field, messages_field, domain_field), where=where)
      if isinstance(raw, Mapping) and raw.get("answer") is not None:
        record["answer"] = check_answer(raw["answer"])  # the reference a verifier checks
      records.append(record)
    except ValueError as e:
      if on_error == "raise":
        raise ValueError(f"{where}: {e}") from None
      logging.warning("skipping malformed prompt record %s: %s", where, e)
      n_skipped += 1
  return records, n_skipped


# ---------------------------------------------------------------------------- encoding


def encode_full_prompt(record: Mapping[str, Any], tokenizer, *, use_chat_template: bool):
  """All token ids of a prompt record (see :func:`encode_prompt`), before any length rule.
  The text of the prompt or of a message that equals a special token (`<|im_end|>`) stays
  text: only the chat template's own markup becomes special tokens."""
  if use_chat_template:
    messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
    ids = encode_chat(tokenizer, messages, tools=record.get("tools"))
  else:
    if "prompt" not in record:
      raise ValueError("a 'messages' record needs use_chat_template=True")
    ids = encode_text(tokenizer, record["prompt"], add_special_tokens=True)
  ids = list(ids)
  if not ids:
    raise ValueError("prompt encodes to no tokens")
  return ids


def _render(tokenizer, messages, tools) -> str:
  # `tools` (JSON schemas) as the template renders them, e.g. Qwen3's <tools> system block
  return tokenizer.apply_chat_template(
    list(messages), tools=tools, tokenize=False, add_generation_prompt=True
  )


def encode_chat(tokenizer, messages: Sequence[Mapping[str, Any]], *, tools=None) -> list[int]:
  """Token ids of `messages` rendered with the tokenizer's chat template and its generation
  prompt. The template's markup is read as special tokens, the messages' contents as text
  (`encode_text`): a content holding `<|im_end|>` stays text and cannot close its turn.

  Contents that hold no special token's text take the plain path (render, then encode), so
  their ids are exactly those of `tokenizer.encode` on the rendering. Otherwise the template
  is rendered with a placeholder per content and the pieces are encoded apart; a template
  that alters contents (the rendering with the real contents is not the placeholders'
  rendering with each placeholder replaced) is a ValueError naming the special token.
  """
  text = _render(tokenizer, messages, tools)
  contents = [m.get("content") for m in messages]
  held = [c for c in contents if isinstance(c, str) and holds_special_text(tokenizer, c)]
  if not held:
    return list(tokenizer.encode(text, add_special_tokens=False))
  marks = [f"JDISTILL-CONTENT-{k}-{os.getpid()}" for k in range(len(messages))]
  probe = [{**m, "content": mark} for m, mark in zip(messages, marks)]
  pieces = re.split("(" + "|".join(map(re.escape, marks)) + ")", _render(tokenizer, probe, tools))
  content_of = dict(zip(marks, contents))
  parts = [(content_of[p], True) if p in content_of else (p, False) for p in pieces if p]
  if "".join(p for p, _ in parts) != text:
    special = next(t for t in special_texts(tokenizer) if any(t in c for c in held))
    raise ValueError(
      f"a message holds the special token text {special!r} and the chat template changes "
      "message contents, so it cannot be kept as text; remove it from the data"
    )
  ids = []
  for part, is_content in parts:
    ids += (
      encode_text(tokenizer, part)
      if is_content
      else tokenizer.encode(part, add_special_tokens=False)
    )
  return ids


def encode_prompt(
  record: Mapping[str, Any],
  tokenizer,
  *,
  use_chat_template: bool,
  max_prompt_len: int,
  overlong: str = "truncate_left",
) -> list[int] | None:
  """Tokenises one prompt record; returns its token ids, or None if dropped.

  With ``use_chat_template`` the record's ``messages`` (or ``[{"role": "user",
  "content": prompt}]``) are rendered with the tokenizer's chat template and
  ``add_generation_prompt=True``, then encoded without extra special tokens (the
  template owns them). Without it, ``prompt`` is encoded with the tokenizer's default
  special tokens; ``messages`` records then raise ValueError.

  Prompts longer than ``max_prompt_len`` tokens: ``"truncate_left"`` keeps the LAST
  ``max_prompt_len`` tokens (the end — the question and the generation prompt —
  matters most), ``"drop"`` returns None, ``"error"`` raises ValueError naming the
  length and the limit. A prompt that encodes to no tokens raises ValueError.
  """
  if overlong not in OVERLONG_MODES:
    raise ValueError(f"overlong must be one of {OVERLONG_MODES}, got {overlong!r}")
  ids = encode_full_prompt(record, tokenizer, use_chat_template=use_chat_template)
  return apply_length_rule(ids, max_prompt_len, overlong)


def apply_length_rule(ids: list[int], max_prompt_len: int, overlong: str) -> list[int] | None:
  """The ``overlong`` rule of :func:`encode_prompt` on a prompt's full token ids."""
  if len(ids) > max_prompt_len:
    if overlong == "drop":
      return None
    if overlong == "error":
      raise ValueError(f"prompt has {len(ids)} tokens, more than max_prompt_len={max_prompt_len}")
    ids = ids[-max_prompt_len:]
  return ids


# ---------------------------------------------------------------------------- batching


def _teacher_seed(seed: int, teacher: int) -> int:
  """Independent shuffle seed in [0, 2**32) for each teacher's stream."""
  return int(np.random.SeedSequence([seed, teacher]).generate_state(1)[0])


class PromptBatcher:
  """Endless, deterministic, resumable batches of prompts, grouped by teacher.

  Per teacher ``i`` (in ``teacher_domains`` order), its records form a grain stream
  ``MapDataset.source(indices).shuffle(seed_i).repeat()`` (each epoch reshuffled;
  ``seed_i`` derived from ``seed`` and ``i``). Global batch ``n`` takes stream elements
  ``n*S .. n*S+S-1`` of every teacher (``S = slots_per_teacher``); rows are ordered by
  teacher. Process ``p`` of ``P`` gets rows ``[p*S/P, (p+1)*S/P)`` of each teacher
  block, so interleaving the processes' per-teacher blocks gives the 1-process batch.

  Tokenisation is lazy (each prompt on access, never all up front). A prompt dropped
  by ``overlong="drop"`` is replaced, deterministically, by the next stream element that
  is not dropped (``k+1, k+2, ...``), so in that epoch its successor appears twice.
  ``drop`` is for rare outliers; data with many overlong prompts should be filtered
  offline. ``n_dropped`` counts the distinct records found dropped so far by this
  object (it grows as batches are produced, prefetch included).

  Each batch is a dict of numpy arrays (``R = rows_per_batch // process_count`` local
  rows, ``L = max_prompt_len``):
    ``prompt_tokens``  int32 ``[R, L]``, right-padded with ``pad_id``;
    ``prompt_lengths`` int32 ``[R]``, number of real tokens (>= 1);
    ``teacher_index``  int32 ``[R]``, index into ``teacher_names``;
    ``domain_index``   int32 ``[R]``, index into ``domains`` (sorted owned domains);
    ``record_index``   int32 ``[R]``, index into ``records`` (its answer, for verifiers).

  Attributes:
    teacher_names: teacher names, in batch order.
    domains: sorted list of every domain owned by some teacher.
    rows_per_batch: global rows, ``len(teacher_names) * slots_per_teacher``.
    local_rows: rows of this process's batch.
    n_skipped_malformed: as passed in (from ``read_prompt_records``), for reporting.
    n_dropped: distinct overlong records dropped so far.
  """

  def __init__(
    self,
    records: Sequence[Mapping[str, Any]],
    tokenizer,
    teacher_domains: Mapping[str, Sequence[str]],
    *,
    slots_per_teacher: int,
    max_prompt_len: int,
    pad_id: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    use_chat_template: bool = True,
    overlong: str = "truncate_left",
    n_skipped_malformed: int = 0,
  ):
    if not teacher_domains:
      raise ValueError("teacher_domains is empty")
    if slots_per_teacher < 1:
      raise ValueError(f"slots_per_teacher must be >= 1, got {slots_per_teacher}")
    if max_prompt_len < 1:
      raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"bad process_index={process_index} / process_count={process_count}")
    if slots_per_teacher % process_count:
      raise ValueError(
        f"slots_per_teacher={slots_per_teacher} is not divisible by process_count={process_count}"
      )
    if overlong not in OVERLONG_MODES:
      raise ValueError(f"overlong must be one of {OVERLONG_MODES}, got {overlong!r}")

    owner: dict[str, int] = {}
    for t, (name, doms) in enumerate(teacher_domains.items()):
      if isinstance(doms, str):
        raise ValueError(f"teacher {name!r}: domains must be a list, got the string {doms!r}")
      for d in doms:
        if d in owner:
          raise ValueError(f"domain {d!r} belongs to two teachers")
        owner[d] = t
    self.teacher_names = list(teacher_domains)
    self.domains = sorted(owner)
    domain_id = {d: k for k, d in enumerate(self.domains)}

    per_teacher: list[list[int]] = [[] for _ in self.teacher_names]
    unknown = set()
    for r, rec in enumerate(records):
      if rec["domain"] not in owner:
        unknown.add(rec["domain"])
      elif "messages" in rec and not use_chat_template:
        raise ValueError(f"record {r} has 'messages' but use_chat_template=False")
      else:
        per_teacher[owner[rec["domain"]]].append(r)
    if unknown:
      raise ValueError(f"domains owned by no teacher: {sorted(unknown)}")
    for name, idx in zip(self.teacher_names, per_teacher):
      if not idx:
        raise ValueError(f"teacher {name!r} has no prompts (domains {list(teacher_domains[name])})")

    self.records = self._records = records
    self._tokenizer = tokenizer
    self._domain_id = domain_id
    self._sizes = [len(idx) for idx in per_teacher]
    self._streams = [
      grain.MapDataset.source(idx).shuffle(seed=_teacher_seed(seed, t)).repeat()
      for t, idx in enumerate(per_teacher)
    ]
    self._encode_kw = dict(
      use_chat_template=use_chat_template, max_prompt_len=max_prompt_len, overlong=overlong
    )
    self._slots, self._max_len, self._pad_id = slots_per_teacher, max_prompt_len, pad_id
    local = slots_per_teacher // process_count
    self._local_slots = range(process_index * local, (process_index + 1) * local)
    self.rows_per_batch = len(self.teacher_names) * slots_per_teacher
    self.local_rows = len(self.teacher_names) * local
    self.n_skipped_malformed = n_skipped_malformed
    self._dropped: set[int] = set()
    self._encoded: dict[int, list[int] | None] = {}  # filled by check_prompts
    self._chat = use_chat_template
    self.dataset = grain.MapDataset.range(sys.maxsize).map(self.batch)

  @property
  def n_dropped(self) -> int:
    return len(self._dropped)

  def check_prompts(self, limit: int = -1) -> dict[str, int]:
    """Tokenises every prompt (or the first ``limit`` of each teacher) under the overlong
    rule, before anything is compiled; returns the counts (``checked``, ``truncated``,
    ``dropped``, ``malformed_skipped``).

    Raises ValueError naming ``file:line`` for a prompt that breaks ``overlong="error"`` or
    encodes to nothing, and naming the teacher when every one of its checked prompts is
    dropped. The checked prompts' token ids are kept for the batches.
    """
    counts = dict(checked=0, truncated=0, dropped=0, malformed_skipped=self.n_skipped_malformed)
    for t, name in enumerate(self.teacher_names):
      indices = [self._streams[t][j] for j in range(self._sizes[t])]
      kept = 0
      for r in sorted(indices)[: None if limit < 0 else limit]:
        record = self._records[r]
        where = record.get("where", f"record {r}")
        try:
          full = encode_full_prompt(record, self._tokenizer, use_chat_template=self._chat)
          ids = apply_length_rule(full, self._max_len, self._encode_kw["overlong"])
        except ValueError as e:
          raise ValueError(f"{where}: {e}") from None
        self._encoded[r] = ids
        counts["checked"] += 1
        if ids is None:
          counts["dropped"] += 1
          self._dropped.add(r)
        else:
          kept += 1
          counts["truncated"] += len(full) > len(ids)
      if kept == 0:
        raise ValueError(
          f"every checked prompt of teacher {name!r} is longer than max_prompt_len="
          f"{self._max_len} and data.overlong='drop' drops it"
        )
    return counts

  def _prompt(self, t: int, k: int) -> tuple[list[int], int]:
    """Token ids and record index of element ``k`` of teacher ``t``'s stream."""
    for j in range(k, k + self._sizes[t]):
      r = self._streams[t][j]
      if r in self._encoded:
        ids = self._encoded[r]
      else:
        ids = encode_prompt(self._records[r], self._tokenizer, **self._encode_kw)
      if ids is not None:
        return ids, r
      self._dropped.add(r)
    raise ValueError(
      f"every prompt of teacher {self.teacher_names[t]!r} is overlong (> {self._max_len} tokens)"
    )

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of global batch ``step`` (see the class docstring)."""
    n = self.local_rows
    out = {
      "prompt_tokens": np.full((n, self._max_len), self._pad_id, np.int32),
      "prompt_lengths": np.zeros((n,), np.int32),
      "teacher_index": np.zeros((n,), np.int32),
      "domain_index": np.zeros((n,), np.int32),
      "record_index": np.zeros((n,), np.int32),
    }
    row = 0
    for t in range(len(self.teacher_names)):
      for j in self._local_slots:
        ids, r = self._prompt(t, step * self._slots + j)
        out["prompt_tokens"][row, : len(ids)] = ids
        out["prompt_lengths"][row] = len(ids)
        out["teacher_index"][row] = t
        out["domain_index"][row] = self._domain_id[self._records[r]["domain"]]
        out["record_index"][row] = r
        row += 1
    return out

  def iterator(self, *, num_threads: int = 1, prefetch: int = 2) -> grain.DatasetIterator:
    """A fresh iterator from step 0. ``get_state()`` returns ``{"next_index": step}``
    (JSON-serialisable); ``set_state(state)`` on any iterator of an identically built
    batcher resumes with exactly the same batches. ``num_threads`` / ``prefetch``
    (batches) control background tokenisation; 0 / 0 computes on the caller's thread."""
    return iter(
      self.dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
      )
    )

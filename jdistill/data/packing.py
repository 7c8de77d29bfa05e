"""Supervised examples (prompt + completion) tokenised and packed into fixed-length rows.

A record is `{"prompt": str or "messages": [...], "completion": str, "domain": str?}` (the
prompt fields as in `jdistill.data.prompts`). Its tokens are the prompt rendered as the student
will see it at sampling time (chat template with the generation prompt) followed by the
completion and the end-of-sequence token; only the completion and that token carry loss.
The prompt's and the completion's text equal to a special token (`<|im_end|>`) stays text
(`jdistill.data.user_text.encode_text`).

A multi-turn record has `"turns": [{"origin": "model" or "environment", "text": str}, ...]`
in place of the completion (an episode, `jdistill.sampling.episodes`): each turn's text is
tokenised on its own and appended (special tokens written as text, e.g. a turn's closing
`<|im_end|>`, become those tokens), and only the model's turns carry loss (and the
end-of-sequence token after a last model turn that does not already end with it); the
environment's turns are context.

Packing puts several examples in one row of `max_len` tokens, first fit in file order:
each example gets its own segment id (1, 2, ...; 0 is padding) and positions restarting at
0, and the model attends only within a segment (`Transformer(segment_ids=...)`), so a packed
row computes exactly what the examples would alone.

A packed batch is `{"tokens", "positions", "segment_ids", "loss_mask"}`, each int32/f32
`[rows, max_len]`; `loss_mask[t] = 1` where `tokens[t]` is a completion token.
"""

from __future__ import annotations

import numpy as np

from jdistill.data import prompts as data_lib
from jdistill.data.user_text import encode_text

ORIGINS = ("model", "environment")


def encode_example(record: dict, tokenizer, *, use_chat_template: bool) -> tuple[list, list]:
  """(token ids, loss mask) of one example: the prompt (mask 0), the completion and EOS
  (mask 1); or, for a multi-turn record, its turns (mask 1 on the model's)."""
  prompt = data_lib.encode_full_prompt(record, tokenizer, use_chat_template=use_chat_template)
  if "turns" in record:
    return _encode_turns(prompt, record["turns"], tokenizer)
  completion = encode_text(tokenizer, record["completion"])
  if tokenizer.eos_token_id is not None:
    completion.append(tokenizer.eos_token_id)
  if not completion:
    raise ValueError("empty completion")
  return prompt + completion, [0] * len(prompt) + [1] * len(completion)


def _encode_turns(prompt: list, turns, tokenizer) -> tuple[list, list]:
  if not isinstance(turns, list) or not turns:
    raise ValueError("'turns' must be a non-empty list")
  ids, mask = list(prompt), [0] * len(prompt)
  for k, turn in enumerate(turns):
    if (
      not isinstance(turn, dict)
      or turn.get("origin") not in ORIGINS
      or not isinstance(turn.get("text"), str)
    ):
      raise ValueError(f"turns[{k}] must be {{'origin': one of {ORIGINS}, 'text': str}}")
    tokens = list(tokenizer.encode(turn["text"], add_special_tokens=False))
    ids += tokens
    mask += [int(turn["origin"] == "model")] * len(tokens)
  eos = tokenizer.eos_token_id
  if turns[-1]["origin"] == "model" and eos is not None and ids[-1] != eos:
    ids.append(eos)
    mask.append(1)
  if not any(mask):
    raise ValueError("no model tokens in 'turns'")
  return ids, mask


def read_examples(path: str, tokenizer, *, use_chat_template: bool, max_len: int) -> list:
  """Encoded examples `(ids, loss_mask, domain or None)` of a JSONL file; a bad or too-long
  example names `file:line`."""
  import json

  examples = []
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      where = f"{path}:{line_no}"
      try:
        text = raw.decode("utf-8")
        if not text.strip():
          continue
        try:
          record = json.loads(text)
        except RecursionError as e:  # nested deeper than the parser's stack
          raise ValueError(f"bad JSON: {e}") from None
        if not isinstance(record, dict) or (
          not isinstance(record.get("completion"), str) and "turns" not in record
        ):
          raise ValueError("needs a string 'completion' (or multi-turn 'turns')")
        if "turns" in record and "completion" in record:
          raise ValueError("has both 'completion' and 'turns'; a record has one")
        if record.get("prompt") is None and record.get("messages") is None:
          raise ValueError("has neither 'prompt' nor 'messages'")
        if record.get("prompt") is not None:
          data_lib.check_prompt(record["prompt"])
        if record.get("messages") is not None:
          data_lib.check_messages(record["messages"])
        if record.get("domain") is not None and not isinstance(record["domain"], str):
          raise ValueError(f"'domain' must be a string, got {type(record['domain']).__name__}")
        ids, mask = encode_example(record, tokenizer, use_chat_template=use_chat_template)
      except (UnicodeDecodeError, ValueError, KeyError) as e:
        raise ValueError(f"{where}: {e}") from None
      if len(ids) > max_len:
        raise ValueError(f"{where}: example has {len(ids)} tokens, more than max_len={max_len}")
      examples.append((ids, mask, record.get("domain")))
  if not examples:
    raise ValueError(f"{path}: no examples")
  return examples


def pack(examples: list, max_len: int, *, pack_rows: bool = True) -> dict[str, np.ndarray]:
  """Rows of `max_len` tokens holding the examples (one per row without `pack_rows`)."""
  rows: list[list[int]] = []  # example indices per row
  used: list[int] = []
  for i, (ids, *_) in enumerate(examples):
    for r, n in enumerate(used):
      if pack_rows and n + len(ids) <= max_len:
        rows[r].append(i)
        used[r] += len(ids)
        break
    else:
      rows.append([i])
      used.append(len(ids))
  out = {
    "tokens": np.zeros((len(rows), max_len), np.int32),
    "positions": np.zeros((len(rows), max_len), np.int32),
    "segment_ids": np.zeros((len(rows), max_len), np.int32),
    "loss_mask": np.zeros((len(rows), max_len), np.float32),
  }
  for r, members in enumerate(rows):
    start = 0
    for segment, i in enumerate(members, start=1):
      ids, mask = examples[i][:2]
      span = slice(start, start + len(ids))
      out["tokens"][r, span] = ids
      out["positions"][r, span] = np.arange(len(ids))
      out["segment_ids"][r, span] = segment
      out["loss_mask"][r, span] = mask
      start += len(ids)
  return out

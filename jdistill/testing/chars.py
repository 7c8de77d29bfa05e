"""A character tokenizer for the multi-turn tests: one token id per character of `CHARS`, so a
tiny model's 64-token vocabulary reads and writes text (prompts, tool calls, observations)."""

from __future__ import annotations

CHARS = "_$abcdefghijklmnopqrstuvwxyz0123456789 :[]<>=+-*/.,?!ABCDEFGHIJK"
PAD, EOS = 0, 1  # "_" pads, "$" ends a turn
VOCAB = len(CHARS)


class CharTokenizer:
  """`encode(text) -> ids` and `decode(ids) -> text`, one id per character of `CHARS`; a
  character outside it is a ValueError."""

  pad_token_id = PAD
  eos_token_id = EOS

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    bad = sorted({c for c in text if c not in CHARS})
    if bad:
      raise ValueError(f"text: characters {bad} are outside the tokenizer's {VOCAB} characters")
    return [CHARS.index(c) for c in text]

  def decode(self, ids) -> str:
    return "".join(CHARS[int(i)] for i in ids)

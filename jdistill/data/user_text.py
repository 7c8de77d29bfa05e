"""User text to token ids: text equal to a special token's stays text.

User text (a prompt, a message's content, an SFT completion) is encoded with `encode_text`: a
substring equal to a special token's text (`<|im_end|>`, `<eos>`) is split into ordinary
tokens, so a prompt cannot close its own turn or end the sequence. Only a chat template's own
markup becomes special tokens (`jdistill.data.prompts.encode_chat`). Works with any tokenizer
object with `encode`; one without `all_special_tokens` has no special texts.
"""

from __future__ import annotations


def special_texts(tokenizer) -> tuple[str, ...]:
  """The texts of `tokenizer`'s special tokens (none for a tokenizer that has no such list)."""
  return tuple(t for t in getattr(tokenizer, "all_special_tokens", ()) or () if t)


def holds_special_text(tokenizer, text: str) -> bool:
  """Whether `text` contains the text of one of `tokenizer`'s special tokens."""
  return any(t in text for t in special_texts(tokenizer))


def encode_text(tokenizer, text: str, *, add_special_tokens: bool = False) -> list[int]:
  """Token ids of user text, in which the text of a special token stays text (ordinary tokens).

  `add_special_tokens`: the tokenizer's own additions (e.g. a BOS its post-processor puts
  first), which are not read from the text. Text holding no special token's text is encoded
  exactly as `tokenizer.encode` does."""
  if not holds_special_text(tokenizer, text):
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
  return list(
    tokenizer.encode(text, add_special_tokens=add_special_tokens, split_special_tokens=True)
  )

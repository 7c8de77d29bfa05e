"""The tool role of a chat template: how an environment's observation enters an episode.

In a chat format the environment's answer to a tool call is a message of its own (role
"tool"), which the template wraps: Qwen3 renders it as a user turn holding
`<tool_response>...</tool_response>` and opens the next assistant turn after it. An episode
(`jdistill.sampling.episodes`) appends the observation's tokens after the model's turn, so it
needs that wrapper as text: `tool_role` reads it off the tokenizer's own template by
rendering a probe conversation (user, assistant, tool) and cutting at two marker strings, so
every template that accepts a "tool" message works, whatever it calls the role.
"""

from __future__ import annotations

import dataclasses

_TURN = "JDISTILL-ASSISTANT-TURN"
_OBSERVATION = "JDISTILL-OBSERVATION"


@dataclasses.dataclass(frozen=True)
class ToolRole:
  """The text around an observation in a chat format.

  end_of_turn: what closes a model turn in the template when the model's own stop token is
    that text (e.g. `<|im_end|>`); prepended when the turn ended another way (a stop string).
  before: between the closed model turn and the observation.
  after: between the observation and the next model turn (the template's generation prompt).
  """

  end_of_turn: str
  before: str
  after: str

  def render(self, observation: str, turn_closed: bool) -> str:
    """The text appended after a model turn: `turn_closed` when the turn ended with the
    model's stop token (whose text is `end_of_turn`)."""
    close = "" if turn_closed else self.end_of_turn
    return close + self.before + observation + self.after


def tool_role(tokenizer, stop_text: str | None = None) -> ToolRole | None:
  """The tool role of `tokenizer`'s chat template, or None where it has no template or the
  template refuses a "tool" message. `stop_text`: the text of the token that ends a model
  turn (default: the tokenizer's end-of-sequence token)."""
  if not getattr(tokenizer, "chat_template", None):
    return None
  probe = [
    {"role": "user", "content": "?"},
    {"role": "assistant", "content": _TURN},
    {"role": "tool", "content": _OBSERVATION},
  ]
  try:
    text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
  except Exception:  # noqa: BLE001  (a template that raises on the tool role has none)
    return None
  if text.count(_TURN) != 1 or text.count(_OBSERVATION) != 1:
    return None
  start, obs = text.index(_TURN) + len(_TURN), text.index(_OBSERVATION)
  if obs < start:
    return None
  between, after = text[start:obs], text[obs + len(_OBSERVATION) :]
  stop_text = tokenizer.eos_token if stop_text is None else stop_text
  end = stop_text if stop_text and between.startswith(stop_text) else ""
  return ToolRole(end_of_turn=end, before=between[len(end) :], after=after)

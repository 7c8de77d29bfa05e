"""The environment of a multi-turn episode: user code behind a small host-side interface.

An environment answers the model's turns. jdistill hands it the text of each finished model
turn and appends the observation it returns, tokenised, to the row; it never executes the
model's output itself (what a turn means, a tool call or an answer, is the environment's
business).

  reset(record) -> state
      a new episode for one prompt record (a dict, e.g. a line of the prompt file).
  step(state, turn_text) -> (observation_text or None, done, reward or None)
      the environment's answer to one model turn: the text appended as the next
      environment turn (None: nothing), whether the episode is over, and its reward once
      it is (None: 0).

A turn the environment cannot read (e.g. a malformed tool call) is reported by raising
`MalformedTurn`; any other exception is an environment error. Either ends only that
episode (reward 0, counted per reason), never the run.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable


class MalformedTurn(Exception):
  """Raised by `Environment.step` when the model's turn cannot be read (a malformed tool
  call): the episode ends with reason "malformed" and reward 0."""


@runtime_checkable
class Environment(Protocol):
  """What a multi-turn episode steps (see the module docstring)."""

  def reset(self, record: dict) -> Any: ...

  def step(self, state: Any, turn_text: str) -> tuple[str | None, bool, float | None]: ...


def load_environment(spec: str, field: str = "environment") -> Environment:
  """The environment named `spec`: `"module:Class"` or `"module:function"`.

  The named attribute is either an environment already (an object with `reset` and `step`)
  or a callable taking no arguments that returns one (a class, a factory function). Errors
  name `field`, the config field `spec` came from.
  """
  if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
    raise ValueError(f"{field}={spec!r}: expected 'module:Class' or 'module:function'")
  module_name, attr = spec.split(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"{field}={spec!r}: cannot import module {module_name!r} ({e})") from e
  if not hasattr(module, attr):
    raise ValueError(f"{field}={spec!r}: module {module_name!r} has no attribute {attr!r}")
  target = getattr(module, attr)
  env = target if _is_environment(target) else target() if callable(target) else None
  if not _is_environment(env):
    raise ValueError(
      f"{field}={spec!r}: {attr!r} is not an environment (an object with reset(record) and "
      f"step(state, turn_text)) nor a no-argument callable returning one; got "
      f"{type(env).__name__}"
    )
  return env


def _is_environment(x) -> bool:
  return (
    not isinstance(x, type)
    and callable(getattr(x, "reset", None))
    and callable(getattr(x, "step", None))
  )

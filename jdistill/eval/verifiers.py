"""Verifiable rewards: does a completion's final answer match the reference?

A verifier is `fn(completion: str, reference: str) -> float` in [0, 1]. Named ones:

  exact_match   the extracted answer equals the reference (whitespace-trimmed)
  numeric       both parse as numbers and agree within `tol` (relative or absolute, 1e-6)
  boxed         the last `\\boxed{...}` in the completion equals the reference
  regex:<pat>   the completion matches <pat> (re.search); the reference is not used
  pkg.mod:fn    a user function, imported by name (never code from the model's output)

The answer of exact_match / numeric is the last `\\boxed{...}` if any, else the text after a
final "answer:" / "=" marker, else the last line. `score` never raises: a verifier that
raises gives 0 and is counted, so one bad sample never stops a run.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable

Verifier = Callable[[str, str], float]


def extract_boxed(text: str) -> str | None:
  """The content of the last `\\boxed{...}`, braces balanced; None if there is none."""
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  depth, i = 1, start + len("\\boxed{")
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i:j].strip()
  return None  # unbalanced: malformed


def extract_answer(text: str) -> str:
  boxed = extract_boxed(text)
  if boxed is not None:
    return boxed
  lowered = text.lower()
  for marker in ("answer:", "="):
    k = lowered.rfind(marker)
    if k >= 0:
      rest = text[k + len(marker) :].strip()
      return rest.splitlines()[0].strip() if rest else ""
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  return lines[-1] if lines else ""


def _number(text: str) -> float | None:
  text = text.strip().rstrip(".").replace(",", "")
  try:
    value = float(text)
  except ValueError:
    return None
  return value if math.isfinite(value) else None


def exact_match(completion: str, reference: str) -> float:
  return float(extract_answer(completion) == reference.strip())


def numeric(completion: str, reference: str, tol: float = 1e-6) -> float:
  got, want = _number(extract_answer(completion)), _number(reference)
  if got is None or want is None:
    return 0.0
  return float(abs(got - want) <= tol * max(1.0, abs(want)))


def boxed(completion: str, reference: str) -> float:
  answer = extract_boxed(completion)
  return float(answer is not None and answer == reference.strip())


def get(name: str) -> Verifier:
  """The verifier called `name` (see the module docstring)."""
  if name == "exact_match":
    return exact_match
  if name == "numeric":
    return numeric
  if name == "boxed":
    return boxed
  if name.startswith("regex:"):
    pattern = re.compile(name[len("regex:") :])
    return lambda completion, reference: float(pattern.search(completion) is not None)
  if ":" in name:
    module, _, attr = name.partition(":")
    try:
      fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
      raise ValueError(f"verifier {name!r}: cannot import {attr!r} from {module!r} ({e})") from e
    if not callable(fn):
      raise ValueError(f"verifier {name!r} is not callable")
    return fn
  raise ValueError(
    f"verifier {name!r} is invalid; allowed: exact_match, numeric, boxed, regex:<pattern>, "
    "module:function"
  )


class Scorer:
  """Applies a verifier, turning its exceptions into reward 0 and counting them."""

  def __init__(self, verifier: Verifier):
    self.verifier = verifier
    self.errors = 0
    self.last_error: str | None = None

  def __call__(self, completion: str, reference: str) -> float:
    try:
      value = float(self.verifier(completion, reference))
    except Exception as e:  # a user verifier's bug must not stop the run
      self.errors += 1
      self.last_error = f"{type(e).__name__}: {e}"
      return 0.0
    if not math.isfinite(value):
      self.errors += 1
      self.last_error = f"non-finite score {value}"
      return 0.0
    return value

"""The config's small machinery: fields declared with their docs, and the shared checks.

A field is declared once, in its section's module, with its default, a one-line description
and what validation allows; `Section.config()` builds the section's `ml_collections`
ConfigDict from the defaults, and `jdistill/config/docs.py` renders docs/configs.md from the
same declarations. Every check raises one message format, which tests match:
`config.<field>=<value> is invalid; allowed: <allowed>`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NoReturn

import ml_collections as mlc

from jdistill.models.config import SCAN_MIN_LAYERS


@dataclasses.dataclass(frozen=True)
class Field:
  default: Any
  doc: str  # what the field does (docs/configs.md's "meaning" column)
  allowed: str  # what `validate` accepts, in words (the "allowed" column)
  field_type: type | None = None  # a None default's type: a typed placeholder, so that
  # `--config.student.scan_layers=True` can set it on the command line
  per: str = ""  # a map filled per run (`rl.verifiers.<domain>`): what its keys name

  def value(self) -> Any:
    if self.per:
      return mlc.ConfigDict()
    if self.default is None:
      return mlc.config_dict.placeholder(self.field_type)
    return self.default


def field(default: Any, doc: str, allowed: str, *, field_type: type | None = None, per: str = ""):
  if default is None and field_type is None and not per:
    raise TypeError(f"a None default needs its type ({doc!r})")
  return Field(default, doc, allowed, field_type, per)


def one_of(choices, note: str = "") -> str:
  """The "allowed" text of a choice field, from the tuple `validate` checks against."""
  return ", ".join(f"`{c}`" for c in choices) + note


@dataclasses.dataclass(frozen=True)
class Section:
  path: str  # "" (top level), "loss", "teachers.<name>"
  fields: dict[str, Field]

  @property
  def key(self) -> str:
    """The section's name in docs/configs.md.in's `{{fields: ...}}` lines."""
    return self.path.split(".")[0] or "top"

  def config(self, **values) -> mlc.ConfigDict:
    """The section's ConfigDict: the declared defaults, with `values` in place of some."""
    unknown = sorted(set(values) - set(self.fields))
    if unknown:
      raise TypeError(f"{self.path or 'config'} has no fields {unknown}")
    return mlc.ConfigDict({name: values.get(name, f.value()) for name, f in self.fields.items()})

  def rows(self) -> list[tuple[str, Field]]:
    """(dotted field name, declaration) per field, as docs/configs.md names them."""
    prefix = f"{self.path}." if self.path else ""
    return [
      (prefix + name + (f".<{f.per}>" if f.per else ""), f) for name, f in self.fields.items()
    ]


def section(path: str, /, **fields: Field) -> Section:
  return Section(path, fields)


# --------------------------------------------------------------------------- checks


def fail(field: str, value, allowed) -> NoReturn:
  raise ValueError(f"config.{field}={value!r} is invalid; allowed: {allowed}")


def get(config, field: str):
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def check_choice(config, field: str, allowed) -> None:
  node = get(config, field)
  if node not in allowed:
    fail(field, node, list(allowed))


def check_scan_layers(config, field: str) -> None:
  node = get(config, field)
  if not (node is None or isinstance(node, bool)):
    fail(field, node, f"None (auto: scanned from {SCAN_MIN_LAYERS} layers), True or False")


def check_positive(config, field: str, allow_zero: bool = False) -> None:
  node = get(config, field)
  ok = (
    isinstance(node, (int, float))
    and not isinstance(node, bool)
    and (node >= 0 if allow_zero else node > 0)
  )
  if not ok:
    fail(field, node, "a non-negative number" if allow_zero else "a positive number")


def check_integer(config, field: str) -> None:
  """After `check_positive`: the field is also an int (not a float, not a bool)."""
  node = get(config, field)
  if not isinstance(node, int) or isinstance(node, bool):
    fail(field, node, "an integer (in the range checked above)")


def check_finite(node, prefix: str = "") -> None:
  """Every float field anywhere in the config is finite (NaN/Inf would pass range checks
  written as comparisons and then silently skip every update)."""
  for key, value in node.items():
    field = f"{prefix}{key}"
    if isinstance(value, mlc.ConfigDict):
      check_finite(value, field + ".")
    elif isinstance(value, float) and not math.isfinite(value):
      fail(field, value, "a finite number")
    elif isinstance(value, (tuple, list)) and any(
      isinstance(v, float) and not math.isfinite(v) for v in value
    ):
      fail(field, value, "finite numbers")

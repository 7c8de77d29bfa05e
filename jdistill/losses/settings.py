"""`LossSettings`: the loss kind and hyper-parameters a kernel needs besides arrays, and the
argument checks every kernel shares.

Argument checks (names, ranges, shapes) run in Python at trace time and raise ``ValueError``
naming the argument and the allowed values. The kernel loss names (:data:`LOSS_NAMES`) come
from the registry (:mod:`jdistill.losses.registry`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from jdistill.losses import registry

LOSS_NAMES = registry.KERNEL_NAMES
NORMALIZE_MODES = ("token", "sequence", "constant")
TOPK_SUPPORTS = ("teacher", "student", "union")
TOPK_TAILS = ("renorm", "bucket")
KL_DIRECTIONS = ("reverse", "forward")
OVERLAP_CRITERIA = ("teacher_topk", "floor", "soft")


# --------------------------------------------------------------------------
# Argument validation (Python, trace time)
# --------------------------------------------------------------------------


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_temperature(temperature: float) -> None:
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _check_beta(beta: float) -> None:
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"beta must be in [0, 1], got {beta!r}")


def _check_k(k: int, vocab: int | None) -> None:
  """k must be a positive int, and at most ``vocab`` when that is known."""
  upper = "vocab" if vocab is None else f"vocab={vocab}"
  if not (isinstance(k, numbers.Integral) and 0 < k <= (k if vocab is None else vocab)):
    raise ValueError(f"k must be an int in [1, {upper}], got {k!r}")


def _check_same_shape(name_a: str, a, name_b: str, b) -> None:
  if a.shape != b.shape:
    raise ValueError(f"{name_a} shape {a.shape} != {name_b} shape {b.shape}")


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """Everything a loss kernel needs besides arrays: the loss kind and its hyper-parameters.

  One frozen (hashable) object travels from the config to the compiled step, so it can be a
  static argument of `jax.jit`. ``loss`` is one of :data:`LOSS_NAMES`; only the fields that
  loss uses matter (e.g. ``beta`` only for "jsd", ``k``/``topk_*`` only for "topk",
  ``overlap_*`` only for "overlap_aware", ``clip_eps`` only for "sampled_token"). The
  ``diag_*`` fields configure the per-token support diagnostics every loss returns.
  ``chunk_size``: positions per chunk along T; 0 chooses it from the shapes
  (:func:`chunk_positions`); None materialises full ``[B, T, V]`` logits (the test reference).
  """

  loss: str = "reverse_kl"
  chunk_size: int | None = 0
  temperature: float = 1.0
  normalize: str = "token"
  beta: float = 0.5
  k: int = 64
  topk_support: str = "teacher"
  topk_tail: str = "bucket"
  topk_direction: str = "reverse"
  clip_eps: float | None = None
  kl_weight: float = 1.0  # λ: weight of the sampled-token distillation advantage −k1
  icepop_c: float | None = None  # > 1: sampled terms with q/π outside [1/c, c] get no gradient
  # sampled_token: subtract the exact per-position KL(q || p_T) from −k1 (a control variate)
  kl_baseline: bool = False
  overlap_criterion: str = "teacher_topk"
  overlap_topk: int = 8
  overlap_floor_prob: float = 1e-3
  diag_topk: tuple[int, ...] = (1, 8)
  diag_floor_prob: float = 1e-4
  diag_top_p: float = 0.9

  def replace(self, **changes) -> LossSettings:
    return dataclasses.replace(self, **changes)

  def validate(self, vocab: int | None = None) -> None:
    """Raises ValueError naming the bad field. ``vocab`` bounds ``k`` when given
    (``overlap_topk`` and ``diag_topk`` may exceed it: the whole vocabulary is then inside)."""
    _check_choice("loss", self.loss, LOSS_NAMES)
    _check_choice("normalize", self.normalize, NORMALIZE_MODES)
    _check_temperature(self.temperature)
    if self.chunk_size is not None and not (
      isinstance(self.chunk_size, numbers.Integral) and self.chunk_size >= 0
    ):
      raise ValueError(
        f"chunk_size must be a positive int, 0 (auto) or None (unchunked), got {self.chunk_size!r}"
      )
    if self.loss == "jsd":
      _check_beta(self.beta)
    if self.loss == "topk":
      _check_k(self.k, vocab)
      _check_choice("topk_support", self.topk_support, TOPK_SUPPORTS)
      _check_choice("topk_tail", self.topk_tail, TOPK_TAILS)
      _check_choice("topk_direction", self.topk_direction, KL_DIRECTIONS)
    if self.loss == "overlap_aware":
      _check_choice("overlap_criterion", self.overlap_criterion, OVERLAP_CRITERIA)
      if not (
        isinstance(self.overlap_topk, numbers.Integral)
        and not isinstance(self.overlap_topk, bool)
        and self.overlap_topk > 0
      ):
        raise ValueError(f"overlap_topk must be a positive int, got {self.overlap_topk!r}")
      if not (
        isinstance(self.overlap_floor_prob, numbers.Real)
        and 0.0 <= self.overlap_floor_prob < math.inf
      ):
        raise ValueError(
          f"overlap_floor_prob must be a finite float >= 0 (> 1 puts every "
          f"token off support), got {self.overlap_floor_prob!r}"
        )
    if self.clip_eps is not None and not self.clip_eps > 0:
      raise ValueError(f"clip_eps must be > 0 or None, got {self.clip_eps!r}")
    if self.icepop_c is not None and not self.icepop_c > 1:
      raise ValueError(f"icepop_c must be > 1 or None, got {self.icepop_c!r}")
    for diag_k in self.diag_topk:
      if not (isinstance(diag_k, numbers.Integral) and diag_k > 0):
        raise ValueError(f"diag_topk entries must be positive ints, got {self.diag_topk!r}")
    if not 0.0 < self.diag_floor_prob <= 1.0:
      raise ValueError(f"diag_floor_prob must be in (0, 1], got {self.diag_floor_prob!r}")
    if not 0.0 < self.diag_top_p <= 1.0:
      raise ValueError(f"diag_top_p must be in (0, 1], got {self.diag_top_p!r}")


def settings_for(name: str, **fields) -> LossSettings:
  """The :class:`LossSettings` of the user-facing loss ``name`` (a
  ``config.teachers.<name>.loss``, see :data:`registry.REGISTRY`): its kernel loss and the
  settings the name fixes (e.g. ``topk_support``), plus ``fields``, the shared
  hyper-parameters (a field the name fixes may not be given)."""
  return LossSettings(**fields, **registry.lookup(name).settings_fields())

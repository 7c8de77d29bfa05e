"""How to sample: `SamplingParams` (static, hashable) and its traced values (`Knobs`).

Which fields are static switches of the compiled code and which are traced arrays (so
changing them never recompiles) is described in `jdistill.sampling.sampler`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import numpy as np

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
KEY_SCHEDULES = ("step", "prompt")


# --- configuration ---------------------------------------------------------------


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to sample. Hashable; lists given for the tuple fields are converted.

  max_new_tokens: tokens generated per row (at most; rows stop at a stop token).
  temperature: 0 → greedy (argmax); otherwise logits are divided by it.
  top_k: keep the k most likely tokens (0 = off).
  top_p: nucleus — keep the smallest set of most likely tokens whose probability
    sums to ≥ top_p, always at least one (1.0 = off). Applied after top_k.
  stop_token_ids: a row stops after emitting any of these (the stop token is kept).
  prompt_buckets: allowed padded prompt lengths (sorted on construction).
  pad_id: filler token of the output layout (and of prompt padding).
  key_schedule: which key draws generated token t of row b. "step": `fold_in(rng, t)`, one
    key shared by the batch (b's uniform is row b of it). "prompt":
    `fold_in(fold_in(rng, b), t)`, so a prompt's draws do not depend on which other prompts
    share its batch, nor when it is decoded (what continuous batching needs to be
    comparable with the static loop). Unused when greedy.
  """

  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  stop_token_ids: tuple[int, ...] = ()
  prompt_buckets: tuple[int, ...] = DEFAULT_BUCKETS
  pad_id: int = 0
  key_schedule: str = "step"

  def __post_init__(self):
    object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
    object.__setattr__(self, "prompt_buckets", tuple(sorted(set(self.prompt_buckets))))
    self.validate()

  def validate(self) -> None:
    def bad(field, value, allowed):
      raise ValueError(f"SamplingParams.{field}={value!r} is invalid; allowed: {allowed}")

    if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
      bad("max_new_tokens", self.max_new_tokens, "a positive integer")
    if (
      not isinstance(self.temperature, (int, float, np.floating))
      or isinstance(self.temperature, bool)
      or not math.isfinite(self.temperature)
      or self.temperature < 0
    ):
      bad("temperature", self.temperature, "a finite float >= 0 (0 = greedy)")
    if not _is_int(self.top_k) or self.top_k < 0:
      bad("top_k", self.top_k, "an integer >= 0 (0 = off)")
    if (
      not isinstance(self.top_p, (int, float, np.floating))
      or isinstance(self.top_p, bool)
      or not 0.0 < self.top_p <= 1.0
    ):
      bad("top_p", self.top_p, "a float in (0, 1] (1.0 = off)")
    if not all(_is_int(s) and s >= 0 for s in self.stop_token_ids):
      bad("stop_token_ids", self.stop_token_ids, "a tuple of token ids >= 0")
    if not self.prompt_buckets or not all(_is_int(b) and b > 0 for b in self.prompt_buckets):
      bad("prompt_buckets", self.prompt_buckets, "a non-empty tuple of positive integers")
    if not _is_int(self.pad_id) or self.pad_id < 0:
      bad("pad_id", self.pad_id, "a token id >= 0")
    if self.key_schedule not in KEY_SCHEDULES:
      bad("key_schedule", self.key_schedule, KEY_SCHEDULES)

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  @property
  def filtered(self) -> bool:
    """Whether top-k / top-p filtering is on (a static switch of the compiled code)."""
    return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


class Knobs(NamedTuple):
  """The traced (non-static) sampling values: changing them never recompiles."""

  temperature: jax.Array  # f32 []
  top_k: jax.Array  # i32 []
  top_p: jax.Array  # f32 []
  stop_ids: jax.Array  # i32 [n_stop]
  pad_id: jax.Array  # i32 []


def knobs_of(params: SamplingParams) -> Knobs:
  return Knobs(
    np.float32(params.temperature if params.temperature > 0 else 1.0),
    np.int32(params.top_k),
    np.float32(params.top_p),
    np.asarray(params.stop_token_ids, np.int32).reshape(-1),
    np.int32(params.pad_id),
  )

"""Host-side prompt handling: token-id lists → right-padded arrays, the prompt bucket, the
left-aligned cache layout's prompt block, and dummy rows for the data-parallel size.

`prompt_arrays` pads token-id lists for the sampler: callers pass the lists straight to
`Sampler.generate`, which calls it (the data pipeline's batches arrive already padded to its
fixed width, `(tokens, lengths)`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def prompt_arrays(prompts, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Normalises `prompts` to right-padded `(tokens [B, P0] int32, lengths [B] int32)`.

  `prompts` is a list of token-id lists, or `(tokens [B, P0], lengths [B])`.
  """
  if (
    isinstance(prompts, tuple)
    and len(prompts) == 2
    and np.ndim(prompts[0]) == 2
    and np.ndim(prompts[1]) == 1
  ):
    tokens = np.asarray(prompts[0])
    lengths = np.asarray(prompts[1])
    if tokens.ndim != 2 or tokens.shape[0] != lengths.shape[0]:
      raise ValueError(
        f"prompts: expected (tokens [B, P0], lengths [B]); got shapes "
        f"{tokens.shape} and {lengths.shape}"
      )
    if not (np.issubdtype(tokens.dtype, np.integer) and np.issubdtype(lengths.dtype, np.integer)):
      raise ValueError("prompts: tokens and lengths must be integer arrays")
    if tokens.shape[0] == 0:
      raise ValueError("prompts: the batch is empty")
    if np.any(lengths <= 0):
      raise ValueError(
        f"prompts: prompt {int(np.argmin(lengths))} is empty (length "
        f"{int(lengths.min())}); every prompt needs at least one token"
      )
    if np.any(lengths > tokens.shape[1]):
      raise ValueError(
        f"prompts: a length {int(lengths.max())} exceeds the token array width {tokens.shape[1]}"
      )
    return tokens.astype(np.int32), lengths.astype(np.int32)
  prompts = list(prompts)
  if not prompts:
    raise ValueError("prompts: the batch is empty")
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  if np.any(lengths == 0):
    raise ValueError(
      f"prompts: prompt {int(np.argmin(lengths))} is empty; every prompt needs at least one token"
    )
  tokens = np.full((len(prompts), int(lengths.max())), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = np.asarray(p, np.int64)
  return tokens, lengths


def choose_bucket(max_len: int, buckets: Sequence[int]) -> int:
  """Smallest bucket ≥ `max_len`."""
  for b in sorted(buckets):
    if b >= max_len:
      return b
  raise ValueError(
    f"prompt length {max_len} exceeds the largest prompt bucket {max(buckets)} "
    f"(SamplingParams.prompt_buckets={tuple(buckets)})"
  )


def left_align(tokens: np.ndarray, lengths: np.ndarray, bucket: int, pad_id: int) -> np.ndarray:
  """Right-padded `[B, P0]` → left-padded `[B, bucket]`.

  Row b's tokens land at `[bucket - len_b, bucket)`.
  """
  src = np.arange(bucket)[None, :] - (bucket - lengths[:, None])  # [B, bucket]
  gathered = np.take_along_axis(tokens, np.clip(src, 0, tokens.shape[1] - 1), axis=1)
  return np.where(src >= 0, gathered, pad_id).astype(np.int32)


def pad_rows(tokens: np.ndarray, lengths: np.ndarray, multiple: int, pad_id: int):
  """Appends dummy 1-token rows so the batch divides the data-parallel size."""
  extra = (-tokens.shape[0]) % multiple
  if not extra:
    return tokens, lengths
  return (
    np.concatenate([tokens, np.full((extra, tokens.shape[1]), pad_id, np.int32)]),
    np.concatenate([lengths, np.ones((extra,), np.int32)]),
  )

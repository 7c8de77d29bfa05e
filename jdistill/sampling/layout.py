"""The two sequence layouts of sampling and the one gather between them.

Cache layout (left-aligned prompts). A batch's prompts are padded on the LEFT to a
bucket length `P` (the smallest of `SamplingParams.prompt_buckets` that holds the
longest prompt, so new prompt lengths reuse compiled code). Row `b`'s prompt of
`len_b` tokens fills cache slots `[P - len_b, P)` with RoPE positions
`0 .. len_b - 1`; its pad slots are masked out of attention. Decode step `t` writes
slot `P + t` for every row at position `len_b + t`, so the cache holds
`cache_len = P + max_new_tokens` slots and every row's last prompt token sits at
slot `P - 1`.

Output layout: `Rollouts`, right-padded as the trainer reads them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rollouts:
  """Sampled sequences in the trainer's right-padded layout (`L = P + max_new_tokens`).

  tokens             int32 `[B, L]`  prompt, then completion, then pad_id
  prompt_lengths     int32 `[B]`
  completion_lengths int32 `[B]`     generated tokens, including the stop token
  completion_mask    f32   `[B, L]`  1 on generated tokens (incl. the stop token)
  logprobs           f32   `[B, L]`  log p(token) under the model's raw softmax (T = 1)
  sampling_logprobs  f32   `[B, L]`  log p(token) under the distribution sampled from
                                      (after temperature / top-k / top-p; 0 when greedy)
  Log-probs are 0 outside the completion mask.
  """

  tokens: jax.Array
  prompt_lengths: jax.Array
  completion_lengths: jax.Array
  completion_mask: jax.Array
  logprobs: jax.Array
  sampling_logprobs: jax.Array


def cache_layout(lengths: jax.Array, bucket: int, cache_len: int) -> tuple[jax.Array, jax.Array]:
  """Prompt positions `[B, bucket]` and the attention key mask `[B, cache_len]`.

  Prompt slot j of row b holds position `j - (bucket - len_b)` (clipped to 0 on pads);
  key slot j is valid if it holds a real prompt token or is a decode slot (j ≥ bucket;
  causality hides the decode slots not yet written).
  """
  start = (bucket - lengths)[:, None]  # first real slot
  slots = jnp.arange(cache_len)[None, :]
  positions = jnp.maximum(slots[:, :bucket] - start, 0).astype(jnp.int32)
  kv_mask = slots >= start
  return positions, kv_mask


def to_right_padded(
  prompt_left: jax.Array,
  generated: jax.Array,
  gen_logp: jax.Array,
  gen_slogp: jax.Array,
  lengths: jax.Array,
  completion_lengths: jax.Array,
  pad_id: jax.Array,
) -> Rollouts:
  """Left-aligned cache layout → right-padded rollouts, by one gather per array.

  prompt_left `[B, P]` (row b's prompt in `[P - len_b, P)`), generated / gen_logp /
  gen_slogp `[B, N]`. Output index i of row b reads left-layout index
  `i + P - len_b` of `concat(prompt_left, generated)`.
  """
  b, p = prompt_left.shape
  total = p + generated.shape[1]
  i = jnp.arange(total)[None, :]
  src = jnp.clip(i + (p - lengths)[:, None], 0, total - 1)
  end = (lengths + completion_lengths)[:, None]
  in_seq = i < end
  mask = (i >= lengths[:, None]) & in_seq
  zeros = jnp.zeros((b, p), jnp.float32)

  def gather(left, right, fill, where):
    full = jnp.concatenate([left, right], axis=1)
    return jnp.where(where, jnp.take_along_axis(full, src, axis=1), fill)

  return Rollouts(
    tokens=gather(prompt_left, generated, pad_id, in_seq).astype(jnp.int32),
    prompt_lengths=lengths.astype(jnp.int32),
    completion_lengths=completion_lengths.astype(jnp.int32),
    completion_mask=mask.astype(jnp.float32),
    logprobs=gather(zeros, gen_logp, 0.0, mask),
    sampling_logprobs=gather(zeros, gen_slogp, 0.0, mask),
  )

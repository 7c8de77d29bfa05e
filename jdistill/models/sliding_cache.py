"""The KV cache of a sliding-window layer (Gemma 3's local layers): a ring buffer.

A layer that attends to its last `sliding_window` keys never reads a key more than
`sliding_window - 1` slots back, so its cache holds only `R = min(sliding_window, cache_len)`
slots (`[B, R, kv_heads, head_dim]`, the full cache's layout with a shorter slot axis): slot
`s` lives at ring entry `s % R`. A ring rather than a masked full-length cache because the
local layers are most of the model (five of every six in Gemma 3) and their cache then stays
`R` slots long whatever the context; the cost is one gather of the key mask and a scatter of
the new entries per call.

Which slot an entry holds is not stored: every slot below `cache_index` was written by an
earlier call (the sampler's layouts write slots in order from 0), so before a call at
`cache_index = c` entry `j` holds the largest slot `s < c` with `s % R == j`, and none when
that is negative. A call attends over the ring's `R` old entries followed by its own `T`
new keys, then writes its last `min(T, R)` keys into the ring.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ring_len(sliding_window: int, cache_len: int) -> int:
  """Slots a sliding layer's cache holds for a `cache_len`-slot cache."""
  return min(sliding_window, cache_len)


def ring_attend(layer_cache: dict[str, jax.Array], k, v, kv_mask, cache_index):
  """Keys and values a call at `cache_index` attends to, and the ring with its keys written.

  Args:
    layer_cache: `{"k", "v"}`, each `[B, R, kv_heads, head_dim]`.
    k, v: the call's new keys and values `[B, T, kv_heads, head_dim]`.
    kv_mask: `[B, cache_len]` bool over the full cache's slots (which hold real tokens).
    cache_index: scalar, the slot of the call's first token.
  Returns:
    keys, values `[B, R + T, kv_heads, head_dim]` (the ring's old entries, then the new),
    key_slots `[R + T]` (negative: an entry never written), key_mask `[B, R + T]`, and the
    updated `{"k", "v"}` ring.
  """
  ring_k, ring_v = layer_cache["k"], layer_cache["v"]
  r, t = ring_k.shape[1], k.shape[1]
  index = jnp.asarray(cache_index, jnp.int32)
  held = index - 1 - jnp.mod(index - 1 - jnp.arange(r, dtype=jnp.int32), r)
  key_slots = jnp.concatenate([held, index + jnp.arange(t, dtype=jnp.int32)])
  written = jnp.take(kv_mask.astype(bool), jnp.maximum(key_slots, 0), axis=1, mode="clip")
  key_mask = (key_slots >= 0)[None] & written
  keys = jnp.concatenate([ring_k.astype(k.dtype), k], axis=1)
  values = jnp.concatenate([ring_v.astype(v.dtype), v], axis=1)
  m = min(t, r)  # earlier new keys fall out of the window before any later query reads them
  at = jnp.mod(index + t - m + jnp.arange(m, dtype=jnp.int32), r)
  new = {
    "k": ring_k.at[:, at].set(k[:, t - m :].astype(ring_k.dtype)),
    "v": ring_v.at[:, at].set(v[:, t - m :].astype(ring_v.dtype)),
  }
  return keys, values, key_slots, key_mask, new

"""Query-blocked attention (`ModelConfig.attention_chunk`) equals the one-block attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdistill.models import ModelConfig, Transformer

CFG = ModelConfig(
  model_type="qwen3",
  vocab_size=64,
  hidden_size=32,
  intermediate_size=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  qk_norm=True,
)


@pytest.mark.parametrize("packed", [False, True])
def test_blocked_attention_equals_one_block_in_values_and_gradients(packed):
  _, state = nnx.split(Transformer(CFG, nnx.Rngs(0)))
  tokens = jax.random.randint(jax.random.key(1), (3, 11), 0, CFG.vocab_size)
  kv_mask = jnp.arange(11)[None] < jnp.array([11, 7, 9])[:, None]
  kw = {}
  if packed:  # per-query masks: a row holding two examples
    kw["segment_ids"] = jnp.array([[0] * 5 + [1] * 6, [0] * 11, [0] * 3 + [1] * 8])

  def loss(state, cfg):
    graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))[0]
    hidden, _ = nnx.merge(graphdef, state)(tokens, kv_mask=kv_mask, **kw)
    hidden = jnp.where(kv_mask[..., None], hidden, 0.0)
    return jnp.sum(hidden * jnp.cos(jnp.arange(CFG.hidden_size))), hidden

  (ref, h_ref), g_ref = jax.value_and_grad(loss, has_aux=True)(state, CFG)
  # 4 does not divide 11: the last block is padded; 16 > 11 falls back to one block
  for chunk in (4, 5, 16):
    (val, h), g = jax.value_and_grad(loss, has_aux=True)(state, CFG.replace(attention_chunk=chunk))
    np.testing.assert_allclose(h, h_ref, atol=2e-6)
    np.testing.assert_allclose(val, ref, atol=1e-6 * float(jnp.sum(jnp.abs(h_ref))))
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g_ref))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6 * scale), g, g_ref)


def test_blocked_attention_keeps_one_block_of_scores_live():
  """XLA's temporary memory of a long forward+backward shrinks with the block size."""

  def temp_bytes(chunk):
    cfg = CFG.replace(num_layers=1, attention_chunk=chunk)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((2, 1024), jnp.int32)

    def loss(state, tokens):
      return jnp.sum(nnx.merge(graphdef, state)(tokens)[0])

    compiled = jax.jit(jax.grad(loss)).lower(state, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  one_block, blocked = temp_bytes(0), temp_bytes(128)
  scores = 2 * CFG.num_heads * 1024 * 1024 * 4  # one layer's f32 scores
  assert one_block > scores and blocked < one_block / 4, (one_block, blocked)
  with pytest.raises(ValueError, match="attention_chunk"):
    CFG.replace(attention_chunk=-1)

"""The sampler's own copy of the weights in a lower precision (`rollout.param_dtype`).

Production systems sample from bf16 weights while the training step keeps f32 master params:
the rollouts' log-probs (`Rollouts.sampling_logprobs`, the estimators' `behaviour_logp`) then
come from the bf16 model, and the importance ratio q/π of the sampled estimators carries the
difference (docs/design.md, "Rollouts in bf16").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jdistill.config.data import ROLLOUT_PARAM_DTYPES as PARAM_DTYPES


@functools.partial(jax.jit, static_argnums=1)
def _cast(params, dtype: str):
  """Every floating leaf of `params` → `dtype` (integer leaves unchanged); one compile per
  params structure and dtype, so a new step's params never recompile."""
  to = jnp.dtype(dtype)
  return jax.tree.map(
    lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
  )


def rollout_params(params, dtype: str):
  """The params the sampler runs: `params` themselves when `dtype` is `""`, else a copy with
  every floating leaf cast to `dtype` (e.g. `"bfloat16"`), made on the params' devices by one
  jitted cast (the copy keeps each leaf's sharding; `params` are not donated).

  The model's compute dtype (`ModelConfig.dtype`) is unchanged: a float32-compute model casts
  the bf16 weights back up where it uses them, so the rollouts differ from the f32 params' by
  the weights' rounding; a bf16-compute model casts its f32 weights to bf16 at every use
  anyway, so the copy gives the same numbers and only halves the weight bytes read.
  """
  if dtype not in PARAM_DTYPES:
    raise ValueError(f"rollout param dtype {dtype!r} is invalid; allowed: {PARAM_DTYPES}")
  if not dtype:
    return params
  return _cast(params, dtype)

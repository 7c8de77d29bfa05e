"""Jitted rollout sampling: prefill into a preallocated KV cache, then a decode loop.

params      SamplingParams (how to sample) and Knobs (its traced values)
prompts     host-side prompt handling: padding, the prompt bucket, left alignment
layout      the left-aligned cache layout, the right-padded Rollouts, the gather between
ops         top-k / top-p filtering, the two-level inverse-CDF draw, one sampling step
sampler     Sampler: prefill + a static while_loop decode over a donated KV cache
continuous  Sampler.generate_continuous: refilling decode slots (continuous batching)
precision   rollout_params: the sampler's own copy of the weights in bf16
environment the environment of a multi-turn episode: its interface and loader
episodes    run_episodes: multi-turn episodes over the sampler, every token's origin
"""

from jdistill.sampling.continuous import LoopStats
from jdistill.sampling.layout import Rollouts, cache_layout, to_right_padded
from jdistill.sampling.ops import draw, filter_logits, prompt_keys, sample_step
from jdistill.sampling.params import (
  DEFAULT_BUCKETS,
  KEY_SCHEDULES,
  Knobs,
  SamplingParams,
  knobs_of,
)
from jdistill.sampling.precision import PARAM_DTYPES, rollout_params
from jdistill.sampling.prompts import choose_bucket, left_align, pad_rows, prompt_arrays
from jdistill.sampling.sampler import Sampler, decode_step

__all__ = [
  "DEFAULT_BUCKETS",
  "KEY_SCHEDULES",
  "PARAM_DTYPES",
  "Knobs",
  "LoopStats",
  "Rollouts",
  "Sampler",
  "SamplingParams",
  "cache_layout",
  "choose_bucket",
  "decode_step",
  "draw",
  "filter_logits",
  "knobs_of",
  "left_align",
  "pad_rows",
  "prompt_arrays",
  "prompt_keys",
  "rollout_params",
  "sample_step",
  "to_right_padded",
]

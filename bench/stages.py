"""SFT and GRPO step cost, as shares of a matmul peak measured in the same run.

Shape (CPU): a student of 4 layers, width 256, 4 heads (2 KV), MLP 768, vocab 8,192, f32.
  SFT:  16 packed rows x 256 tokens (examples of 64 tokens, half of them completion).
  GRPO: 4 prompts x G = 8 samples, prompt 32 + 64 new tokens; rewards by a verifier on the
        host; the step of the pure-GRPO objective (PPO clip 0.2, k3 penalty to a reference).
FLOPs come from XLA's cost analysis of each compiled function.

  python bench/stages.py [--steps 5]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from common import flops_of, matmul_peak, timed
from flax import nnx

from jdistill import losses
from jdistill.data import packing
from jdistill.eval import verifiers
from jdistill.models import ModelConfig, Transformer
from jdistill.runtime import sharding as shd
from jdistill.sampling import Sampler, SamplingParams
from jdistill.step import common as step_common
from jdistill.step import rlvr as step_rlvr
from jdistill.step import sft as step_sft

CFG = ModelConfig(
  vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
  num_kv_heads=2, head_dim=64,
)  # fmt: skip
SFT_ROWS, SFT_LEN, EXAMPLE = 16, 256, 64
PROMPTS, GROUP, PROMPT, NEW = 4, 8, 32, 64


def train_state(params, optimizer):
  opt_state = jax.jit(optimizer.init)(params)
  return {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}


def sft_bench(graphdef, params, optimizer, schedule, steps: int):
  rng = np.random.RandomState(0)
  examples = [
    (list(rng.randint(5, CFG.vocab_size, EXAMPLE)), [0] * (EXAMPLE // 2) + [1] * (EXAMPLE // 2))
    for _ in range(SFT_ROWS * SFT_LEN // EXAMPLE)
  ]
  rows = packing.pack(examples, SFT_LEN)
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  step = jax.jit(
    functools.partial(
      step_sft.sft_step, graphdef=graphdef, optimizer=optimizer, schedule=schedule, chunk_size=64
    )
  )
  state = train_state(params, optimizer)
  flops = flops_of(step, state, batch)
  _, seconds = timed(step, state, batch, repeats=steps)
  return seconds, flops, SFT_ROWS * SFT_LEN


def grpo_bench(graphdef, params, optimizer, schedule, mesh, steps: int):
  rng = np.random.RandomState(1)
  rows = PROMPTS * GROUP
  prompts = np.repeat(rng.randint(5, CFG.vocab_size, (PROMPTS, PROMPT)), GROUP, axis=0)
  lengths = np.full((rows,), PROMPT, np.int32)
  sampler = Sampler(graphdef, mesh)
  sp = SamplingParams(max_new_tokens=NEW, temperature=1.0, prompt_buckets=(PROMPT,))
  prompt = (prompts.astype(np.int32), lengths)
  out, t_sample = timed(
    lambda: sampler.generate(params, prompt, jax.random.key(0), sp), repeats=steps
  )

  scorer = verifiers.Scorer(verifiers.get("numeric"))
  tokens = np.asarray(out.tokens)

  def score():
    rewards = np.asarray(
      [scorer(" ".join(map(str, tokens[i, PROMPT : PROMPT + 4])), "7") for i in range(rows)],
      np.float32,
    )
    rewards[::3] = 1.0  # a mix of rewards, so advantages are not all zero
    return losses.group_advantages(rewards, GROUP)

  advantages, t_score = timed(score, repeats=steps)
  batch = {**step_common.rollout_batch(out), "advantages": jnp.asarray(advantages)}
  settings = step_rlvr.RLSettings(chunk_size=32, clip_eps=0.2, kl_coef=0.05)
  step = jax.jit(
    functools.partial(
      step_rlvr.rl_step, optimizer=optimizer, schedule=schedule, student_graphdef=graphdef,
      teacher_graphdefs=(), specs=(), groups=(), reference_graphdef=graphdef, settings=settings,
    )
  )  # fmt: skip
  state = train_state(jax.tree.map(jnp.copy, params), optimizer)
  flops = flops_of(step, state, (), params, batch)
  _, t_step = timed(step, state, (), params, batch, repeats=steps)
  return t_sample, t_score, t_step, flops, rows * (tokens.shape[1] - 1)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  mesh = shd.make_mesh({"data": -1})
  graphdef, params = nnx.split(shd.create_sharded(lambda: Transformer(CFG, nnx.Rngs(0)), mesh))
  optimizer, schedule = step_common.make_optimizer(1e-4, steps=100, warmup_steps=0)

  t_sft, sft_flops, sft_tokens = sft_bench(graphdef, params, optimizer, schedule, args.steps)
  t_sample, t_score, t_rl, rl_flops, rl_tokens = grpo_bench(
    graphdef, params, optimizer, schedule, mesh, args.steps
  )
  peak = matmul_peak()
  print(
    f"backend {jax.default_backend()}, {jax.device_count()} device(s); student: 4 layers, "
    f"width 256, vocab {CFG.vocab_size}, f32"
  )
  print(f"matmul peak (f32 2048^3, same run): {peak / 1e9:8.1f} GFLOP/s")
  print(f"{'part':<34}{'ms':>9}{'tokens/s':>11}{'GFLOP/s':>9}{'of peak':>9}")
  print(
    f"{'SFT step (16 x 256 packed)':<34}{t_sft * 1e3:>9.1f}{sft_tokens / t_sft:>11,.0f}"
    f"{sft_flops / t_sft / 1e9:>9.1f}{sft_flops / t_sft / peak:>9.1%}"
  )
  print(
    f"{'GRPO rollouts (4 x G=8, 64 new)':<34}{t_sample * 1e3:>9.1f}{rows_new(t_sample):>11,.0f}"
  )
  print(f"{'GRPO rewards + advantages (host)':<34}{t_score * 1e3:>9.1f}")
  print(
    f"{'GRPO step (clip, k3 reference)':<34}{t_rl * 1e3:>9.1f}{rl_tokens / t_rl:>11,.0f}"
    f"{rl_flops / t_rl / 1e9:>9.1f}{rl_flops / t_rl / peak:>9.1%}"
  )
  total = t_sample + t_score + t_rl
  print(f"{'GRPO step in all':<34}{total * 1e3:>9.1f}{rl_tokens / total:>11,.0f}")


def rows_new(seconds: float) -> float:
  return PROMPTS * GROUP * NEW / seconds


if __name__ == "__main__":
  main()

"""Multi-turn against single-turn rollout throughput: the same student generates the same number
of model tokens per row, once as multi-turn episodes (`run_episodes`, an environment answering
each turn) and once as one single-turn completion per row (`Sampler.generate`).

Shape (CPU, float32): 4 layers, width 256, 4 heads (2 KV), MLP 512, vocab 64 (one character per
token, `jdistill.testing.chars`); 32 prompts of 12 tokens. Episodes: 4 model turns, each ending
at one of 4 stop ids (~16 tokens at T=1, at most 64), the environment answering each of the
first 3 with a 16-token observation; every episode is in flight at once (32 slots). The
single-turn baseline decodes, per row, exactly the (first) episode's model-token count (no stop ids,
`max_new_per_prompt`), in one batch of 32. Throughput counts model tokens per second of the
warm run; the episodes' extra cost is their waves (one `generate` call each, which prefills
every row's whole context again) and the host stepping the environments.

  python bench/episodes.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import numpy as np
from flax import nnx

from jdistill.models import ModelConfig, Transformer
from jdistill.runtime import sharding as shd
from jdistill.sampling import Sampler, SamplingParams
from jdistill.sampling.episodes import EpisodeParams, Episodes, run_episodes
from jdistill.testing.chars import EOS, PAD, VOCAB, CharTokenizer

LAYERS, WIDTH, HEADS, KV_HEADS, MLP = 4, 256, 4, 2, 512
ROWS, TURNS, TURN_LIMIT, OBSERVATION = 32, 4, 64, " tool says: 1234"
STOPS = (EOS, 50, 51, 52)  # 4 of 64 ids: turns of ~16 tokens


class FixedEnv:
  """Answers every turn with `OBSERVATION`; done after `TURNS` turns with reward 1."""

  def reset(self, record):
    return {"turns": 0}

  def step(self, state, turn_text):
    state["turns"] += 1
    return (None, True, 1.0) if state["turns"] == TURNS else (OBSERVATION, False, None)


def best_of(fn, repeats: int):
  out = fn()  # trace + compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    if not isinstance(out, Episodes):  # episodes are host arrays already
      out = jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  return min(times), times, out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  cfg = ModelConfig(
    vocab_size=VOCAB,
    hidden_size=WIDTH,
    intermediate_size=MLP,
    num_layers=LAYERS,
    num_heads=HEADS,
    num_kv_heads=KV_HEADS,
    head_dim=WIDTH // HEADS,
  )
  graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(0)))
  sampler = Sampler(graphdef, shd.make_mesh({"data": 1}, jax.devices()[:1]))
  tok = CharTokenizer()
  prompts = [tok.encode(f"task {i:04d}: ") for i in range(ROWS)]
  sampling = SamplingParams(stop_token_ids=STOPS, prompt_buckets=(16, 64, 128, 256, 512),
                            pad_id=PAD)  # fmt: skip
  key = jax.random.key(0)
  results = {}
  for wave_tokens in (TURN_LIMIT, 16):
    limits = EpisodeParams(max_turns=TURNS, max_turn_tokens=TURN_LIMIT, max_total_tokens=448,
                           wave_tokens=wave_tokens)  # fmt: skip

    def episodes(limits=limits):
      return run_episodes(sampler, state, FixedEnv(), [{}] * ROWS, prompts, key, sampling,
                          limits, tok)  # fmt: skip

    results[wave_tokens] = best_of(episodes, args.repeats)
  out = results[TURN_LIMIT][2]
  model_tokens = out.model_mask.sum(axis=1).astype(np.int32)
  single = dataclasses.replace(sampling, stop_token_ids=(), max_new_tokens=int(model_tokens.max()))

  def single_turn():
    return sampler.generate(state, prompts, key, single, max_new_per_prompt=model_tokens)

  t_single, all_single, _ = best_of(single_turn, args.repeats)
  generated = int(model_tokens.sum())
  print(
    f"jax {jax.__version__} ({jax.default_backend()}); {os.cpu_count()} CPU cores, shared with "
    "other jobs (timings are noisy)"
  )
  print(
    f"model: {LAYERS} layers, width {WIDTH}, {HEADS} heads ({KV_HEADS} KV), MLP {MLP}, vocab "
    f"{VOCAB}, float32; {ROWS} rows; episodes of {TURNS} turns, observations of "
    f"{len(OBSERVATION)} tokens; ended {out.reason_counts()}"
  )
  print(
    f"model tokens: {generated} in all, {model_tokens.mean():.1f} per row (median turn "
    f"{np.median(model_tokens / np.maximum(out.turns, 1)):.1f})"
  )
  print(f"{'':<40}{'best s':>9}{'waves':>7}{'model tok/s':>13}")
  print(f"{'single-turn, one batch':<40}{t_single:>9.3f}{1:>7}{generated / t_single:>13,.0f}")
  for wave_tokens, (t, _, ep) in results.items():
    name = f"multi-turn, waves of <= {wave_tokens} tokens"
    print(f"{name:<40}{t:>9.3f}{ep.waves:>7}{ep.model_mask.sum() / t:>13,.0f}")
  print(
    f"all runs (s): single {[round(t, 3) for t in all_single]}, "
    + ", ".join(f"waves {w} {[round(t, 3) for t in r[1]]}" for w, r in results.items())
  )


if __name__ == "__main__":
  main()

"""Rollout throughput: jdistill's jitted sampler vs transformers' PyTorch `generate`.

Shape (CPU, float32): 4 layers, width 256, 4 heads (2 KV), MLP 512, vocab 32,000; batch 16,
prompt 64, 128 new tokens, greedy and at T=1, no stop token (every row decodes all 128).
Both run the same random weights (transformers model → save_pretrained → `from_hf`) in the
same process and share the machine's cores (torch is limited to 2 threads). Warm runs are
timed; jdistill's first call (trace + compile) is reported separately, and the compile
counter is checked across repeats. Last, the per-step draw alone: `jax.random.categorical`
(Gumbel-max, V uniforms per row) against jdistill's inverse-CDF `sampler.draw` (one per
row), log-softmax included in both, at [16, 32,000] and [16, 151,936].

  python bench/sampler.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
import torch
from flax import nnx

from jdistill.models import hf
from jdistill.runtime import sharding as shd
from jdistill.sampling import Sampler, SamplingParams, draw
from jdistill.testing.tiny_hf import tiny_hf_model

LAYERS, WIDTH, HEADS, KV_HEADS, MLP, VOCAB = 4, 256, 4, 2, 512, 32_000
BATCH, PROMPT, NEW = 16, 64, 128


def time_runs(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def draw_costs(repeats: int = 20) -> None:
  def gumbel(key, logits):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jax.random.categorical(key, logits, axis=-1), logp

  def inverse_cdf(key, logits):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return draw(key, logp), logp

  print(f"{'one draw, [rows, vocab]':<26}{'categorical ms':>15}{'inverse CDF ms':>15}{'ratio':>7}")
  for vocab in (32_000, 151_936):
    logits = 3.0 * jax.random.normal(jax.random.key(0), (BATCH, vocab))
    ms = []
    for fn in (jax.jit(gumbel), jax.jit(inverse_cdf)):
      jax.block_until_ready(fn(jax.random.key(1), logits))
      times = time_runs(lambda: jax.block_until_ready(fn(jax.random.key(2), logits)), repeats)
      ms.append(1e3 * float(np.median(times)))
    print(f"{f'[{BATCH}, {vocab:,}]':<26}{ms[0]:>15.2f}{ms[1]:>15.2f}{ms[0] / ms[1]:>6.1f}x")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  torch.set_num_threads(2)

  torch_model = tiny_hf_model(
    "llama",
    vocab_size=VOCAB,
    hidden_size=WIDTH,
    layers=LAYERS,
    heads=HEADS,
    kv_heads=KV_HEADS,
    intermediate_size=MLP,
  )
  torch_model.generation_config.eos_token_id = None  # run all NEW tokens
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  with tempfile.TemporaryDirectory() as path:
    torch_model.save_pretrained(path)
    graphdef, state = nnx.split(hf.from_hf(path, mesh))

  prompts = np.random.RandomState(0).randint(3, VOCAB, (BATCH, PROMPT)).astype(np.int32)
  lengths = np.full((BATCH,), PROMPT, np.int32)
  sampler = Sampler(graphdef, mesh)
  sp = SamplingParams(max_new_tokens=NEW, temperature=0.0, prompt_buckets=(PROMPT,))

  def run_jax():
    out = sampler.generate(state, (prompts, lengths), jax.random.key(0), sp)
    jax.block_until_ready(out.tokens)
    return out

  def run_torch(sample: bool = False):
    with torch.no_grad():
      return torch_model.generate(
        torch.tensor(prompts, dtype=torch.long),
        attention_mask=torch.ones(BATCH, PROMPT, dtype=torch.long),
        max_new_tokens=NEW,
        do_sample=sample,
        temperature=1.0 if sample else None,
        top_k=0 if sample else None,
        top_p=1.0 if sample else None,
        use_cache=True,
        pad_token_id=0,
      )

  sp_t1 = SamplingParams(max_new_tokens=NEW, temperature=1.0, prompt_buckets=(PROMPT,))

  def run_jax_t1():
    jax.block_until_ready(sampler.generate(state, (prompts, lengths), jax.random.key(0), sp_t1))

  t0 = time.perf_counter()
  out = run_jax()
  first = time.perf_counter() - t0
  compiles_after_first = sampler.num_compiles
  jax_times = time_runs(run_jax, args.repeats)
  compiles_after_repeats = sampler.num_compiles
  ref = run_torch()  # warm-up
  torch_times = time_runs(run_torch, args.repeats)
  run_jax_t1()
  jax_t1 = min(time_runs(run_jax_t1, args.repeats))
  run_torch(True)
  torch_t1 = min(time_runs(lambda: run_torch(True), args.repeats))

  new_tokens = BATCH * NEW
  t_jax, t_torch = min(jax_times), min(torch_times)
  ours = np.asarray(out.tokens)[:, PROMPT:]
  theirs = ref[:, PROMPT:].numpy()
  print(
    f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device), "
    f"torch {torch.__version__} ({torch.get_num_threads()} threads); "
    f"{os.cpu_count()} CPU cores shared by both"
  )
  print(
    f"model: {LAYERS} layers, width {WIDTH}, {HEADS} heads ({KV_HEADS} KV), MLP {MLP}, "
    f"vocab {VOCAB:,}, float32; batch {BATCH}, prompt {PROMPT}, {NEW} new tokens, greedy"
  )
  print(
    f"jdistill first call (trace + compile + run): {first:8.2f} s; compile ≈ {first - t_jax:.2f} s"
  )
  print(f"{'':<26}{'best s':>9}{'mean s':>9}{'tokens/s':>11}")
  print(
    f"{'jdistill sampler':<26}{t_jax:>9.3f}{np.mean(jax_times):>9.3f}{new_tokens / t_jax:>11,.0f}"
  )
  print(
    f"{'transformers generate':<26}{t_torch:>9.3f}{np.mean(torch_times):>9.3f}"
    f"{new_tokens / t_torch:>11,.0f}"
  )
  print(
    f"all runs (s): jdistill {[round(t, 3) for t in jax_times]}, "
    f"transformers {[round(t, 3) for t in torch_times]}"
  )
  print(f"speed ratio jdistill / transformers, greedy: {t_torch / t_jax:.2f}x")
  print(
    f"at T=1: jdistill {new_tokens / jax_t1:,.0f} tok/s, transformers "
    f"{new_tokens / torch_t1:,.0f} tok/s, ratio {torch_t1 / jax_t1:.2f}x"
  )
  print(
    f"compilations: {compiles_after_first} after the first call, {compiles_after_repeats} "
    f"after {args.repeats} more (must not grow)"
  )
  print(
    f"greedy tokens identical to transformers: {(ours == theirs).mean():.1%} of "
    f"{ours.size} (rows fully equal: {(ours == theirs).all(1).sum()}/{BATCH})"
  )
  assert compiles_after_repeats == compiles_after_first
  draw_costs()


if __name__ == "__main__":
  main()

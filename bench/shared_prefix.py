"""Shared prefixes: G samples of each prompt, prefilled G times (the prompts repeated on the
host) against once (`Sampler.generate(..., group_size=G)`, the cache rows repeated on device).

Shape (CPU, float32): 4 layers, width 256, 4 heads (2 KV), MLP 512, vocab 8,000; 8 prompts x
G = 8 (64 rows) at T = 1, 64 new tokens, no stop token (every row decodes all 64); prompts of
256 and of 64 tokens. Both variants run in the same process on the same weights, alternating
within each repeat; medians of the warm repeats are quoted, with the load average. Tokens are
checked equal between the two, and the compile counter across repeats.

  python bench/shared_prefix.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from jdistill.models import hf
from jdistill.runtime import sharding as shd
from jdistill.sampling import Sampler, SamplingParams
from jdistill.testing.tiny_hf import tiny_hf_model

LAYERS, WIDTH, HEADS, KV_HEADS, MLP, VOCAB = 4, 256, 4, 2, 512, 8_000
PROMPTS, GROUP, NEW = 8, 8, 64


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--prompt_lengths", type=int, nargs="+", default=[256, 64])
  args = parser.parse_args()
  torch_model = tiny_hf_model(
    "llama",
    vocab_size=VOCAB,
    hidden_size=WIDTH,
    layers=LAYERS,
    heads=HEADS,
    kv_heads=KV_HEADS,
    intermediate_size=MLP,
  )
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  with tempfile.TemporaryDirectory() as path:
    torch_model.save_pretrained(path)
    graphdef, state = nnx.split(hf.from_hf(path, mesh))
  sampler = Sampler(graphdef, mesh)
  print(
    f"jax {jax.__version__} ({jax.default_backend()}, 1 device), {os.cpu_count()} CPU cores; "
    f"load average before: {os.getloadavg()[0]:.1f}"
  )
  print(
    f"model: {LAYERS} layers, width {WIDTH}, {HEADS} heads ({KV_HEADS} KV), MLP {MLP}, vocab "
    f"{VOCAB:,}, float32; {PROMPTS} prompts x G = {GROUP}, {NEW} new tokens at T = 1"
  )
  header = f"{'prompt':>7}{'repeated s':>12}{'shared s':>10}{'speed-up':>10}"
  print(header + "  runs (repeated | shared)")
  for length in args.prompt_lengths:
    rng = np.random.RandomState(length)
    tokens = rng.randint(3, VOCAB, (PROMPTS, length)).astype(np.int32)
    lengths = np.full((PROMPTS,), length, np.int32)
    sp = SamplingParams(max_new_tokens=NEW, temperature=1.0, prompt_buckets=(length,))
    key = jax.random.key(0)

    def repeated():
      rows = (np.repeat(tokens, GROUP, 0), np.repeat(lengths, GROUP, 0))
      return jax.block_until_ready(sampler.generate(state, rows, key, sp))

    def shared():
      return jax.block_until_ready(
        sampler.generate(state, (tokens, lengths), key, sp, group_size=GROUP)
      )

    a, b = repeated(), shared()  # compile both
    same = float((np.asarray(a.tokens) == np.asarray(b.tokens)).mean())
    compiles = sampler.num_compiles
    times = {"repeated": [], "shared": []}
    for _ in range(args.repeats):
      for name, fn in (("repeated", repeated), ("shared", shared)):
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)
    assert sampler.num_compiles == compiles, "a warm call recompiled"
    t_rep, t_sh = (float(np.median(times[k])) for k in ("repeated", "shared"))
    runs = " ".join(f"{t:.2f}" for t in times["repeated"]) + " | "
    runs += " ".join(f"{t:.2f}" for t in times["shared"])
    print(f"{length:>7}{t_rep:>12.3f}{t_sh:>10.3f}{t_rep / t_sh:>9.2f}x  {runs}")
    print(f"{'':>7}tokens equal: {same:.1%}; compilations so far {compiles}, none in the repeats")
  print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()

"""Rollouts from a bf16 copy of the f32 student (`rollout.param_dtype`): speed and mismatch.

Shape (bench/compare.py's): a tiny Qwen3 — 4 layers, width 256, 4 heads (2 KV, head_dim 64),
MLP 768, tied embeddings — batch 16, prompt 64, 128 new tokens, T=1, no stop token (every row
decodes all 128), vocab 32,000 (`--vocab`). Two compute dtypes of the same f32 weights:

  model.dtype float32   the compare shape: the bf16 copy is cast back up where it is used,
                        so the rollouts differ from the f32 params' by the weights' rounding
  model.dtype bfloat16  f32 master, bf16 compute (bench/gpu_opd.py's student): the f32
                        params are cast to bf16 at every use anyway; the copy reads half the
                        weight bytes and should give the same numbers

For each: the sampler on the f32 params against the same sampler on
`sampling.rollout_params(params, "bfloat16")`, alternated in one process, medians of
`--repeats` (≥ 3) warm calls, and the cast's own time (once per step in the stages). Then the
train/inference mismatch over one real rollout batch (2,048 completion tokens): the sampler's
log π of its tokens against log q of the f32 params' full forward (the train step's
recompute) — |log q/π| mean and max, and the share IcePop would mask at c = 1.01, 1.1 and 2
(`loss.icepop_c`); the f32 rollouts' own |log q/π| (cached decode vs full forward) is the
noise floor. The machine's load (`uptime`) is printed before and after.

  python bench/bf16_rollouts.py [--vocab 32000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdistill.models import hf
from jdistill.runtime import sharding as shd
from jdistill.sampling import Sampler, SamplingParams, rollout_params
from jdistill.testing.tiny_hf import tiny_hf_model

LAYERS, WIDTH, HEADS, KV_HEADS, MLP = 4, 256, 4, 2, 768
BATCH, PROMPT, NEW = 16, 64, 128
ICEPOP_C = (1.01, 1.1, 2.0)


def uptime() -> str:
  return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


@jax.jit
def _token_logp(graphdef, state, tokens, real):
  """log q of each token under a full forward, `[B, T]` (index i scores token i; 0 at i = 0)."""
  logits = nnx.merge(graphdef, state).forward_logits(tokens, None, real)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
  return jnp.concatenate([jnp.zeros_like(picked[:, :1]), picked], axis=1)


def mismatch(graphdef, trained, out) -> dict:
  """|log q/π| of the completion tokens of `out` (π: the sampler's log-probs, q: the `trained`
  params' full forward) and the IcePop-masked shares."""
  tokens = jnp.asarray(out.tokens)
  total = np.asarray(out.prompt_lengths + out.completion_lengths)
  width = tokens.shape[1]
  real = jnp.asarray(np.arange(width)[None] < total[:, None])
  log_q = np.asarray(_token_logp(graphdef, trained, tokens, real))
  log_pi = np.asarray(out.sampling_logprobs)
  mask = np.asarray(out.completion_mask) > 0
  log_ratio = (log_q - log_pi)[mask]
  shares = {c: float(np.mean(np.abs(log_ratio) > np.log(c))) for c in ICEPOP_C}
  return dict(
    tokens=int(mask.sum()),
    mean=float(np.abs(log_ratio).mean()),
    max=float(np.abs(log_ratio).max()),
    icepop=shares,
  )


def median_of(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def run_dtype(path: str, compute: str, repeats: int, prompts, lengths) -> dict:
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  graphdef, f32 = nnx.split(hf.from_hf(path, mesh, dtype=compute))
  cast = lambda: rollout_params(f32, "bfloat16")  # noqa: E731
  bf16 = cast()
  sampler = Sampler(graphdef, mesh)
  sp = SamplingParams(max_new_tokens=NEW, temperature=1.0, prompt_buckets=(PROMPT,))
  keys = iter(range(10**6))

  def sample(params):
    return sampler.generate(params, (prompts, lengths), jax.random.key(next(keys)), sp)

  t0 = time.perf_counter()
  jax.block_until_ready(sample(f32).tokens)
  first_f32 = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(sample(bf16).tokens)
  first_bf16 = time.perf_counter() - t0
  times = {"f32": [], "bf16": []}
  for _ in range(repeats):  # alternated, so a change of load hits both
    times["f32"].append(median_of(lambda: sample(f32).tokens, 1))
    times["bf16"].append(median_of(lambda: sample(bf16).tokens, 1))
  cast_s = median_of(cast, max(repeats, 5))
  out_bf16 = sample(bf16)
  out_f32 = sample(f32)
  return dict(
    compute=compute,
    f32_s=float(np.median(times["f32"])),
    bf16_s=float(np.median(times["bf16"])),
    runs=times,
    first_f32_s=first_f32,
    first_bf16_s=first_bf16,
    cast_ms=1e3 * cast_s,
    mismatch_bf16=mismatch(graphdef, f32, out_bf16),
    mismatch_f32=mismatch(graphdef, f32, out_f32),
  )


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--vocab", type=int, default=32_000)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  if args.repeats < 3:
    parser.error("--repeats: at least 3 (medians)")
  print(f"load before: {uptime()}")
  print(
    f"jax {jax.__version__} ({jax.default_backend()}: {jax.devices()[0].device_kind}), "
    f"{os.cpu_count()} CPU cores"
  )
  print(
    f"model: Qwen3, {LAYERS} layers, width {WIDTH}, {HEADS} heads ({KV_HEADS} KV), MLP {MLP}, "
    f"tied, vocab {args.vocab:,}; batch {BATCH}, prompt {PROMPT}, {NEW} new tokens, T=1"
  )
  model = tiny_hf_model(
    "qwen3", vocab_size=args.vocab, hidden_size=WIDTH, layers=LAYERS, heads=HEADS,
    kv_heads=KV_HEADS, intermediate_size=MLP, head_dim=WIDTH // HEADS, tie=True, seed=0,
  )  # fmt: skip
  prompts = np.random.RandomState(0).randint(3, args.vocab, (BATCH, PROMPT)).astype(np.int32)
  lengths = np.full((BATCH,), PROMPT, np.int32)
  tokens = BATCH * NEW
  with tempfile.TemporaryDirectory() as path:
    model.save_pretrained(path)
    results = [run_dtype(path, c, args.repeats, prompts, lengths) for c in ("float32", "bfloat16")]
  print(
    f"{'model.dtype':<13}{'f32 params s':>13}{'bf16 copy s':>13}{'bf16/f32':>10}"
    f"{'f32 tok/s':>11}{'bf16 tok/s':>11}{'cast ms':>9}"
  )
  for r in results:
    print(
      f"{r['compute']:<13}{r['f32_s']:>13.3f}{r['bf16_s']:>13.3f}{r['bf16_s'] / r['f32_s']:>9.2f}x"
      f"{tokens / r['f32_s']:>11,.0f}{tokens / r['bf16_s']:>11,.0f}{r['cast_ms']:>9.2f}"
    )
  for r in results:
    runs = {k: [round(t, 3) for t in v] for k, v in r["runs"].items()}
    print(
      f"  {r['compute']}: runs (s) {runs}; first calls (compile) f32 {r['first_f32_s']:.1f} s, "
      f"bf16 {r['first_bf16_s']:.1f} s"
    )
  print(
    "mismatch |log q/π| over the completion tokens (q: the f32 params' full forward through "
    "the same model.dtype, the train step's recompute)"
  )
  for r in results:
    for name in ("bf16", "f32"):
      m = r[f"mismatch_{name}"]
      shares = ", ".join(f"c={c}: {s:.2%}" for c, s in m["icepop"].items())
      print(
        f"  model.dtype {r['compute']}, {name} rollouts: mean {m['mean']:.2e}, max "
        f"{m['max']:.2e} over {m['tokens']} tokens; IcePop masks {shares}"
      )
  print(f"load after: {uptime()}")


if __name__ == "__main__":
  main()

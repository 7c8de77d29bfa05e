"""The sampler's decode loop against its memory-bandwidth bound, at the compare shape (CPU).

Shape (`bench/compare.py`'s): a tiny Qwen3 — 4 layers, width 256, 4 heads (2 KV, head_dim
64), MLP 768, tied embeddings, float32 — batch B = 16, prompt P = 64, N = 128 new tokens, T=1,
no stop token, at vocab V = 32,000 and 151,936 (random weights: the bound counts bytes).

A decode step reads, at the least (f32 = 4 bytes; L layers, KV heads H_kv, head_dim D_h):

  bytes(t) = W + K(t) + S
  W    = every parameter once at its dtype (tied: the [V, d] table once, as the unembedding;
         the embedding lookup reads only B of its rows)
  K(t) = L · 2 (k, v) · B · (P + t) · H_kv · D_h · 4   the cache up to the step's slot
  S    = 3 · B · V · 4   the logits written once by the unembedding, then read twice by
         sampling (the log-softmax's max and sum-exp, the draw's block masses: the floor
         of a two-pass softmax-and-draw; the draw's one chosen block, the gathers and the
         new slot's write are O(B·√V) and left out)

The decode call (after prefill, which samples token 0 from the prompt's last logits) runs
N - 1 forward steps, t = 1 .. N-1 (step t writes slot P + t - 1 and attends over P + t
slots), and N samplings:

  bytes(decode) = Σ_{t=1}^{N-1} (W + K(t)) + N · S
  bound         = bytes(decode) / bandwidth          share = bound / measured decode time

`bandwidth` is the best stream bandwidth measured in the same process: jitted sum of a 512
MiB f32 array (read), a jitted x + 1 (read + write), and NumPy's equivalents, each the best
of several repeats (the medians are printed too). `measured` times the compiled `decode`
call alone (prefill runs before it, untimed), median of `--repeats`.

As implemented, decode attention reads all P + N cache slots each step (masked), not P + t:
the "as run" column counts that, the bound does not.

Before/after (`--before FILE`, an earlier `jdistill/sampling/ops.py`, e.g. from `git show
REV:jdistill/sampling/ops.py`): the decode call with that file's `sample_step` is compiled
too, and the two are timed alternately in the same process.

Breakdown (`--breakdown`): the pieces of one step as separate jitted calls at the mid
position (the blocks without the unembedding, the unembedding matmul, `sample_step`), each
the median of many calls; their sum exceeds the fused loop's step by dispatch overhead.

  python bench/sampler_bound.py [--vocab 32000,151936] [--repeats 5] [--breakdown]
      [--before old_ops.py] [--json o.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jdistill.sampling.sampler as sampler_module
from jdistill.models.config import ModelConfig
from jdistill.models.transformer import Transformer
from jdistill.runtime import sharding as shd
from jdistill.sampling import Sampler, SamplingParams
from jdistill.sampling.ops import sample_step
from jdistill.sampling.params import knobs_of
from jdistill.sampling.sampler import _Key, decode_step

SHAPE = dict(layers=4, width=256, heads=4, kv_heads=2, head_dim=64, mlp=768)
BATCH, PROMPT, NEW = 16, 64, 128
LOGIT_PASSES = 3  # S: the logits written once, read twice
STREAM_MIB = 512


def load() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _best_median(fn, repeats: int) -> tuple[float, float]:
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times), float(np.median(times))


def stream_bandwidth(repeats: int = 8) -> dict:
  """Bytes/s of large-array reads and copies: jitted (XLA:CPU) and NumPy, best and median.

  The jitted x + 1 is donated (updated in place), so it is not timing the page faults of a
  fresh 512 MiB output; NumPy's sum runs once on one thread and once as two halves on two.
  """
  n = STREAM_MIB * 2**20 // 4
  box = {"x": jax.random.uniform(jax.random.key(0), (n,), jnp.float32)}
  host = np.asarray(box["x"]).copy()
  out = np.empty_like(host)
  halves = np.split(host, 2)
  pool = ThreadPoolExecutor(2)
  jsum = jax.jit(jnp.sum)
  jinc = jax.jit(lambda a: a + 1.0, donate_argnums=0)

  def inc():
    box["x"] = jax.block_until_ready(jinc(box["x"]))

  rows = {
    "jax sum (read)": (lambda: jax.block_until_ready(jsum(box["x"])), 4 * n),
    "jax x + 1 in place (read + write)": (inc, 8 * n),
    "numpy sum, 1 thread (read)": (host.sum, 4 * n),
    "numpy sum, 2 threads (read)": (lambda: list(pool.map(np.sum, halves)), 4 * n),
    "numpy copyto (read + write)": (lambda: np.copyto(out, host), 8 * n),
  }
  res = {}
  for name, (fn, moved) in rows.items():
    best, med = _best_median(fn, repeats)
    res[name] = dict(best_GBps=moved / best / 1e9, median_GBps=moved / med / 1e9)
  pool.shutdown()
  return res


def model_config(vocab: int) -> ModelConfig:
  s = SHAPE
  return ModelConfig(
    model_type="qwen3",
    vocab_size=vocab,
    hidden_size=s["width"],
    intermediate_size=s["mlp"],
    num_layers=s["layers"],
    num_heads=s["heads"],
    num_kv_heads=s["kv_heads"],
    head_dim=s["head_dim"],
    qk_norm=True,
    tie_word_embeddings=True,
    rope_theta=1_000_000.0,
  )


def decode_bytes(cfg: ModelConfig, param_bytes: int, batch: int, prompt: int, new: int) -> dict:
  """The formula of the module docstring: bytes the decode call must read, and as run."""
  kv_slot = cfg.num_layers * 2 * batch * cfg.num_kv_heads * cfg.head_dim * 4  # one slot
  logits = LOGIT_PASSES * batch * cfg.vocab_size * 4
  steps = range(1, new)
  kv_bound = sum(kv_slot * (prompt + t) for t in steps)
  kv_as_run = len(steps) * kv_slot * (prompt + new)
  weights = len(steps) * param_bytes
  return dict(
    params=param_bytes,
    kv_mean_per_step=kv_bound / len(steps),
    logits_per_step=logits,
    total=weights + kv_bound + new * logits,
    total_as_run=weights + kv_as_run + new * logits,
  )


def bench_vocab(vocab: int, repeats: int, bandwidth: float, breakdown: bool, before=None) -> dict:
  cfg = model_config(vocab)
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(0)))
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  sp = SamplingParams(max_new_tokens=NEW, temperature=1.0, prompt_buckets=(PROMPT,))
  key = _Key(BATCH, PROMPT, NEW, sp.greedy, sp.filtered, 0, sp.key_schedule)
  prompts = np.random.RandomState(0).randint(3, vocab, (BATCH, PROMPT)).astype(np.int32)
  lengths = jnp.full((BATCH,), PROMPT, jnp.int32)
  limits = jnp.full((BATCH,), NEW, jnp.int32)
  knobs = knobs_of(sp)
  seeds = iter(range(10**6))

  def run_decode(pieces):
    """Times one decode call (its prefill untimed) → seconds."""
    alloc, prefill, decode = pieces
    cache, logits = jax.block_until_ready(prefill(state, alloc(), prompts, lengths))
    t0 = time.perf_counter()
    _, out = decode(
      state, cache, logits, prompts, lengths, limits, jax.random.key(next(seeds)), knobs
    )
    jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    assert int(np.asarray(out.completion_lengths).sum()) == BATCH * NEW
    return dt

  # this tree's sample_step, and (--before) an earlier ops.py's: each traced under its own
  # (the decode closure looks `sample_step` up when first called), then timed alternately
  variants = {"now": sampler_module.sample_step}
  if before is not None:
    variants = {"before": before.sample_step, **variants}
  compiled, first_s = {}, {}
  for name, step in variants.items():
    sampler_module.sample_step = step
    compiled[name] = Sampler(graphdef, mesh)._compiled(key, cfg)
    t0 = time.perf_counter()
    run_decode(compiled[name])
    first_s[name] = time.perf_counter() - t0
  sampler_module.sample_step = variants["now"]
  times = {name: [] for name in variants}
  for _ in range(repeats):
    for name in variants:
      times[name].append(run_decode(compiled[name]))
  alloc, prefill, _ = compiled["now"]
  prefill_best, _ = _best_median(
    lambda: jax.block_until_ready(prefill(state, alloc(), prompts, lengths)), repeats
  )

  b = decode_bytes(cfg, param_bytes, BATCH, PROMPT, NEW)
  bound = b["total"] / bandwidth
  res = dict(vocab=vocab, load_before=None, bytes=b, bound_s=bound, prefill_best_s=prefill_best)
  res["bound_as_run_s"] = b["total_as_run"] / bandwidth
  for name, ts in times.items():
    measured = float(np.median(ts))
    res[name] = dict(
      decode_runs_s=[round(t, 4) for t in ts],
      decode_median_s=measured,
      decode_step_ms=1e3 * measured / (NEW - 1),
      first_call_s=first_s[name],
      share=bound / measured,
      share_as_run=res["bound_as_run_s"] / measured,
    )
  if breakdown:
    res["breakdown_ms"] = step_breakdown(graphdef, state, cfg, knobs, bandwidth)
  return res


def step_breakdown(graphdef, state, cfg, knobs, bandwidth: float) -> dict:
  """Median ms of one step's pieces as separate jitted calls (cache half full)."""
  cache_len = PROMPT + NEW
  from jdistill.models.transformer import init_cache
  from jdistill.sampling.layout import cache_layout

  cache = init_cache(cfg, BATCH, cache_len)
  lengths = jnp.full((BATCH,), PROMPT, jnp.int32)
  _, kv_mask = cache_layout(lengths, PROMPT, cache_len)
  tokens = jnp.arange(BATCH, dtype=jnp.int32)
  slot = jnp.int32(PROMPT + NEW // 2)

  @jax.jit
  def blocks(state, cache):
    model = nnx.merge(graphdef, state)
    hidden, cache = model(
      tokens[:, None], (slot + 0 * tokens)[:, None], kv_mask=kv_mask, cache=cache, cache_index=slot
    )
    return hidden, cache

  @jax.jit
  def unembed(state, hidden):
    return nnx.merge(graphdef, state).logits(hidden)[:, 0]

  @jax.jit
  def full_step(state, cache):
    model = nnx.merge(graphdef, state)
    return decode_step(model, cache, kv_mask, tokens, slot + 0 * tokens, slot)

  @jax.jit
  def sample(logits, key):
    return sample_step(logits, key, knobs, greedy=False, filtered=False)

  hidden, _ = blocks(state, cache)
  logits = unembed(state, hidden)
  key = jax.random.key(0)
  n = 30
  out = {}
  for name, fn in (
    ("blocks (no unembedding)", lambda: jax.block_until_ready(blocks(state, cache))),
    ("unembedding [B, d] @ [d, V]", lambda: jax.block_until_ready(unembed(state, hidden))),
    ("sample_step", lambda: jax.block_until_ready(sample(logits, key))),
    ("forward + unembedding", lambda: jax.block_until_ready(full_step(state, cache))),
  ):
    _, med = _best_median(fn, n)
    out[name] = 1e3 * med
  table = cfg.vocab_size * cfg.hidden_size * 4
  out["unembedding table alone at the bandwidth"] = 1e3 * table / bandwidth
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--vocab", default="32000,151936")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--breakdown", action="store_true")
  parser.add_argument("--json", default="")
  parser.add_argument(
    "--before",
    default="",
    help="an earlier jdistill/sampling/ops.py (git show REV:jdistill/sampling/ops.py > f.py): "
    "its sample_step's decode is timed too, alternating with this tree's",
  )
  args = parser.parse_args()
  t_start = time.perf_counter()
  load_start = load()

  streams = stream_bandwidth()
  bandwidth = 1e9 * max(r["best_GBps"] for r in streams.values())
  print(
    f"jax {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} CPU cores, "
    f"load average {load_start} at the start"
  )
  print(f"\nstream bandwidth ({STREAM_MIB} MiB f32):  {'best GB/s':>10}{'median GB/s':>13}")
  for name, r in streams.items():
    print(f"  {name:<36}{r['best_GBps']:>10.2f}{r['median_GBps']:>13.2f}")
  print(f"  bandwidth used for the bound: {bandwidth / 1e9:.2f} GB/s (the best)")

  before = None
  if args.before:
    spec = importlib.util.spec_from_file_location("ops_before", args.before)
    before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(before)
  rows = []
  for vocab in (int(v) for v in args.vocab.split(",")):
    load_row = load()
    r = bench_vocab(vocab, args.repeats, bandwidth, args.breakdown, before)
    r["load_before"] = load_row
    rows.append(r)

  print(
    f"\ndecode call: B={BATCH}, P={PROMPT}, N={NEW} (N-1 forward steps, N draws), T=1; "
    f"median of {args.repeats}"
  )
  head = (
    f"{'vocab':>8}{'sampler':>8}{'params MB':>11}{'KV MB/step':>12}{'logits MB':>11}"
    f"{'bytes GB':>10}{'bound s':>9}{'decode s':>10}{'ms/step':>9}{'share':>7}{'as run':>8}"
    f"{'load before':>19}"
  )
  print(head)
  for r in rows:
    b = r["bytes"]
    for name in [n for n in ("before", "now") if n in r]:
      m = r[name]
      print(
        f"{r['vocab']:>8,}{name:>8}{b['params'] / 1e6:>11.1f}{b['kv_mean_per_step'] / 1e6:>12.2f}"
        f"{b['logits_per_step'] / 1e6:>11.2f}{b['total'] / 1e9:>10.2f}{r['bound_s']:>9.3f}"
        f"{m['decode_median_s']:>10.3f}{m['decode_step_ms']:>9.2f}{m['share']:>7.0%}"
        f"{m['share_as_run']:>8.0%}{r['load_before']:>19}"
      )
    if "before" in r:
      speedup = r["before"]["decode_median_s"] / r["now"]["decode_median_s"]
      print(f"{'':>8}before / now: {speedup:.2f}x (medians, alternated in this process)")
  print(
    "  share = bound / decode s; 'as run' counts the whole P + N cache the attention reads each "
    "step. Prefill (untimed in decode s): "
    + ", ".join(f"{r['prefill_best_s'] * 1e3:.0f} ms" for r in rows)
  )
  for r in rows:
    if "breakdown_ms" in r:
      print(f"\none step's pieces at vocab {r['vocab']:,} (ms, separate jitted calls):")
      for name, ms in r["breakdown_ms"].items():
        print(f"  {name:<42}{ms:>8.2f}")
  elapsed = time.perf_counter() - t_start
  print(f"\nload average at the end: {load()}; {elapsed:.0f} s in all")
  if args.json:
    env = dict(
      python=platform.python_version(),
      jax=jax.__version__,
      backend=jax.default_backend(),
      cpu_count=os.cpu_count(),
      cpu=platform.processor() or platform.machine(),
    )
    shape = dict(SHAPE, batch=BATCH, prompt=PROMPT, new=NEW, logit_passes=LOGIT_PASSES)
    with open(args.json, "w") as f:
      json.dump(
        dict(
          env=env,
          shape=shape,
          load_start=load_start,
          load_end=load(),
          stream=streams,
          bandwidth_Bps=bandwidth,
          rows=rows,
          elapsed_s=elapsed,
        ),
        f,
        indent=1,
      )


if __name__ == "__main__":
  main()

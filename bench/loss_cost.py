"""Time and FLOPs of the chunked loss kernel (fwd + bwd): what the two savings buy.

1. Support diagnostics (top-k, nucleus, full-vocab KLs, TV) only on logging steps, through
   one compiled step with a traced flag: "diag on" vs "diag off".
2. The fused kernel (gradients taken chunk by chunk in the forward pass: each vocabulary
   projection once) vs the remat kernel (`jax.checkpoint` per chunk: for full-vocab losses
   the teacher's and the student's projections are recomputed in the backward pass).

Ratios are against the remat kernel with diagnostics on (what every step did before), run in
the same process. FLOPs are XLA's cost analysis of a compile with the flag fixed.

    python bench/loss_cost.py [--vocab 32000] [--seq 512] [--width 256] [--batch 4]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jdistill import losses


def inputs(batch, seq, width, vocab, seed=0):
  keys = jax.random.split(jax.random.key(seed), 6)
  normal = lambda key, shape, scale: scale * jax.random.normal(key, shape)
  return (
    normal(keys[0], (batch, seq, width), 1.0),
    normal(keys[1], (width, vocab), width**-0.5),
    normal(keys[2], (batch, seq, width), 1.0),
    normal(keys[3], (width, vocab), width**-0.5),
    jax.random.randint(keys[4], (batch, seq), 0, vocab, dtype=jnp.int32),
    jnp.ones((batch, seq), jnp.float32),
    normal(keys[5], (batch, seq), 0.1) - 8.0,  # behaviour log-probs
  )


def kernel(settings, fixed=None, fused=True):
  """The jitted fwd+bwd; `fixed`: a Python bool baked in, else the flag is a traced argument."""

  def loss(sh, su, th, tu, targets, mask, behaviour, diagnostics=fixed):
    value, diag = losses.distill_loss(
      sh,
      su,
      th,
      tu,
      targets,
      mask,
      settings,
      behaviour_logp=behaviour if settings.loss == "sampled_token" else None,
      diagnostics=diagnostics,
      fused=fused,
    )
    return value, diag

  grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  return jax.jit(grad)


def timed(fn, args, runs):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vocab", type=int, default=32_000)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--chunk", type=int, default=128)
  parser.add_argument("--runs", type=int, default=5)
  args = parser.parse_args()
  data = inputs(args.batch, args.seq, args.width, args.vocab)
  proj = 2 * args.batch * args.chunk * args.width * args.vocab
  print(
    f"jax {jax.__version__} on {jax.devices()[0].platform}; B={args.batch} T={args.seq} "
    f"D={args.width} V={args.vocab} chunk={args.chunk}; XLA counts a loop body once, so "
    f"GFLOP are per chunk: one vocabulary projection of a chunk = {proj / 1e9:.2f} GFLOP"
  )
  print(f"{'loss':<15}{'kernel':>8}{'diag':>6}{'ms':>9}{'GFLOP/chunk':>13}{'time ratio':>12}")
  for loss in ("reverse_kl", "sampled_token"):
    settings = losses.LossSettings(loss=loss, chunk_size=args.chunk, diag_topk=(1, 8, 32))
    rows = {}
    for fused in (False, True):
      fn = kernel(settings, fused=fused)
      for flag in (True, False):
        # time: the real path, one compile with a traced flag; FLOPs: a compile with the
        # flag fixed (a traced cond counts both branches)
        static = kernel(settings, fixed=flag, fused=fused).lower(*data).compile()
        flops = static.cost_analysis().get("flops", float("nan"))
        rows[fused, flag] = (timed(fn, (*data, jnp.asarray(flag)), args.runs), flops)
    base = rows[False, True][0]
    for (fused, flag), (t, flops) in rows.items():
      print(
        f"{loss:<15}{'fused' if fused else 'remat':>8}{'on' if flag else 'off':>6}"
        f"{t * 1e3:>9.1f}{flops / 1e9:>13.2f}{t / base:>12.2f}"
      )


if __name__ == "__main__":
  main()

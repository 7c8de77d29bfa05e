"""Peak memory and time of full-vocab reverse KL forward+backward: chunked vs naive.

Loss: ``distill_loss`` with ``LossSettings(loss="reverse_kl")``, chunked: the fused kernel
(gradients taken in the forward pass) and the remat kernel (``jax.checkpoint`` per chunk,
``fused=False``), vs ``unchunked_distill_loss`` (full ``[B, T, V]`` logits), gradient w.r.t.
the student
hidden states and unembedding, float32 inputs, float32 softmax, on the CPU.

Peak memory is the compiled executable's ``memory_analysis()``
(argument + output + temp bytes): deterministic and obtained by compiling against
``jax.ShapeDtypeStruct`` inputs, so nothing is allocated. Timing executes a
variant only if its analysed peak fits under ``--max-exec-gib``; by default
timing uses a shorter sequence (``--time-seq``) because one full-scale step
takes ~2-3 minutes on 2 CPU cores (~90 GFLOP/s on these matmul shapes).

    python bench/loss_memory.py [--seq 8192] [--time-seq 1024] [--runs 2]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jdistill import losses

GIB = 1024**3


def make_step(variant: str, chunk_size: int):
  if variant == "naive":
    loss_fn = losses.unchunked_distill_loss
  else:
    loss_fn = functools.partial(losses.distill_loss, fused=variant == "fused")

  def objective(student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets, mask):
    value, _ = loss_fn(
      student_hidden,
      student_unembed,
      teacher_hidden,
      teacher_unembed,
      targets,
      mask,
      losses.LossSettings(loss="reverse_kl", chunk_size=chunk_size),
    )
    return value

  return jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))


def input_specs(batch: int, seq: int, width: int, vocab: int, dtype):
  f = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
  return (
    f(batch, seq, width),
    f(width, vocab),
    f(batch, seq, width),
    f(width, vocab),
    jax.ShapeDtypeStruct((batch, seq), jnp.int32),
    jax.ShapeDtypeStruct((batch, seq), jnp.float32),
  )


def make_inputs(batch: int, seq: int, width: int, vocab: int, dtype, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 5)
  normal = lambda key, shape, scale: (scale * jax.random.normal(key, shape)).astype(dtype)
  return (
    normal(keys[0], (batch, seq, width), 1.0),
    normal(keys[1], (width, vocab), width**-0.5),
    normal(keys[2], (batch, seq, width), 1.0),
    normal(keys[3], (width, vocab), width**-0.5),
    jax.random.randint(keys[4], (batch, seq), 0, vocab, dtype=jnp.int32),
    jnp.ones((batch, seq), jnp.float32),
  )


def peak_bytes(compiled) -> tuple[int, dict]:
  ma = compiled.memory_analysis()
  parts = {
    "argument": ma.argument_size_in_bytes,
    "output": ma.output_size_in_bytes,
    "temp": ma.temp_size_in_bytes,
    "alias": ma.alias_size_in_bytes,
  }
  return parts["argument"] + parts["output"] + parts["temp"] - parts["alias"], parts


def time_runs(compiled, inputs, runs: int):
  """Wall times of ``runs`` executions of an already compiled step, and its output."""
  times, out = [], None
  for _ in range(max(runs, 1)):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*inputs))
    times.append(time.perf_counter() - t0)
  return times, out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vocab", type=int, default=151_936)
  parser.add_argument("--seq", type=int, default=8192)
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--chunks", type=int, nargs="+", default=[512, 1024])
  parser.add_argument(
    "--time-seq", type=int, default=1024, help="sequence length for the timed runs (0: skip timing)"
  )
  parser.add_argument("--runs", type=int, default=2)
  parser.add_argument(
    "--max-exec-gib",
    type=float,
    default=16.0,
    help="execute a variant only if its analysed peak is below this",
  )
  args = parser.parse_args()
  dtype = jnp.float32
  variants = [("naive", 0)] + [(kind, c) for c in args.chunks for kind in ("remat", "fused")]

  print(
    f"jax {jax.__version__} on {jax.devices()[0].platform}; reverse KL fwd+bwd "
    f"(grad wrt student hidden & unembed), f32 inputs, f32 softmax"
  )
  print(
    f"memory: B={args.batch} T={args.seq} D={args.width} V={args.vocab}; "
    f"one f32 logits tensor = {args.batch * args.seq * args.vocab * 4 / GIB:.2f} GiB"
  )
  print(f"{'variant':<14}{'peak GiB':>10}{'temp GiB':>10}{'arg GiB':>9}{'out GiB':>9}")
  peaks = {}
  for variant, chunk in variants:
    step = make_step(variant, chunk)
    compiled = step.lower(
      *input_specs(args.batch, args.seq, args.width, args.vocab, dtype)
    ).compile()
    peak, parts = peak_bytes(compiled)
    name = variant if variant == "naive" else f"{variant} {chunk}"
    peaks[name] = peak
    print(
      f"{name:<14}{peak / GIB:>10.2f}{parts['temp'] / GIB:>10.2f}"
      f"{parts['argument'] / GIB:>9.2f}{parts['output'] / GIB:>9.2f}"
    )
  for name, peak in peaks.items():
    if name != "naive":
      print(f"peak ratio {name} / naive = {peak / peaks['naive']:.3f}")

  if args.time_seq <= 0:
    return
  print(
    f"\ntime: B={args.batch} T={args.time_seq} D={args.width} V={args.vocab}, "
    f"{args.runs} timed runs of the compiled step (the first includes page-faulting"
    f" fresh buffers)"
  )
  print(f"{'variant':<14}{'peak GiB':>10}{'run times s':>20}")
  inputs = make_inputs(args.batch, args.time_seq, args.width, args.vocab, dtype)
  results = {}
  for variant, chunk in variants:
    step = make_step(variant, chunk)
    compiled = step.lower(*inputs).compile()
    peak, _ = peak_bytes(compiled)
    name = variant if variant == "naive" else f"{variant} {chunk}"
    if peak / GIB > args.max_exec_gib:
      print(f"{name:<14}{peak / GIB:>10.2f}   not executed (peak > {args.max_exec_gib} GiB)")
      continue
    times, results[name] = time_runs(compiled, inputs, args.runs)
    print(f"{name:<14}{peak / GIB:>10.2f}{' '.join(f'{t:.1f}' for t in times):>20}")
  if "naive" in results:
    ref_loss, ref_grads = results.pop("naive")
    for name, (value, grads) in results.items():
      err = max(
        float(jnp.max(jnp.abs(g - r)) / (jnp.max(jnp.abs(r)) + 1e-30))
        for g, r in zip(grads, ref_grads)
      )
      print(
        f"{name} vs naive: |loss diff| = {abs(float(value - ref_loss)):.2e}, "
        f"max rel grad diff = {err:.2e}"
      )


if __name__ == "__main__":
  np.set_printoptions(precision=4)
  main()

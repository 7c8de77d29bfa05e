"""Disaggregated rollouts: sampler time S(n) on n devices, train-step time T(N − n) on the
rest, and the throughput each split would give.

Model (per step, `rows` rollouts): colocated, the sampler and the step share all N devices
one after the other: rows / (S(N) + T(N)). Disaggregated with `rollout.staleness` ≥ 1 the
two meshes work at once: rows / max(S(n), T(N − n)) (the params copy to the sampler is
left out). Every split is measured in this one process, on N simulated CPU devices that
share the machine's cores: the times say how the split changes the work per device, NOT
what a real accelerator split would give (two meshes of one CPU do not run in parallel).
For that reason the last column, the k = 1 loop's measured time per step, is a sanity
check only. "dispatch" is the host time until the sampler's call returns: far below S
means the sampling runs behind the host's back (JAX async dispatch), as the overlap needs.

Shape: the toy world (`jdistill.testing.toy`) with a wider student and teachers (width 128, 4
layers, vocab 384), 2 teachers x 12 rows, prompt bucket 32 + 64 new tokens.

  python bench/disaggregated.py [--devices=8] [--repeats=5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

if __name__ == "__main__":
  n = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "8")
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
  ).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax
import numpy as np

from jdistill.stages import opd as train
from jdistill.testing.toy import make_toy_world, tiny_config

SLOTS = 12  # 24 rows: both meshes split them evenly for n = 2, 4, 6 of 8 devices


def config(world, out: str, *, devices: int):
  c = tiny_config(world)
  c.output_dir = out
  c.data.slots_per_teacher = SLOTS
  c.sampling.max_new_tokens = 64
  c.train.steps = 1000
  c.train.eval_every = 0
  c.rollout.devices = devices
  c.rollout.staleness = 1
  return c


def median_time(fn, repeats: int) -> tuple[float, float]:
  """Median seconds of `fn()` to its results, and to its return (the host's dispatch)."""
  jax.block_until_ready(fn())  # compile
  total, dispatch = [], []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    dispatch.append(time.perf_counter() - t0)
    jax.block_until_ready(out)
    total.append(time.perf_counter() - t0)
  return float(np.median(total)), float(np.median(dispatch))


def measure(world, out: str, devices: int, repeats: int) -> dict:
  """S (sampler on its mesh), T (train step on the training mesh), the host time the
  sampler's call takes before it returns (dispatch), and the k = 1 loop per step."""
  trainer = train.OPDTrainer(config(world, out, devices=devices))
  prompts, key = next(trainer.data_iter), trainer.rollout_key(0)
  batch = trainer.rollouts(prompts, key)
  sample, dispatch = median_time(lambda: trainer.rollouts(prompts, key), repeats)
  on = jax.numpy.asarray(False)

  def step():
    teachers = trainer.teachers.states
    trainer.state, metrics = trainer.train_step(trainer.state, teachers, {}, batch, on)
    return metrics["loss"]

  step_time, _ = median_time(step, repeats)
  trainer.train_one(diagnostics=False)  # the pipeline's first fill
  loop, _ = median_time(lambda: trainer.train_one(diagnostics=False)["loss"], repeats)
  return dict(
    rows=trainer.batcher.rows_per_batch,
    train_devices=trainer.mesh.devices.size,
    S=sample,
    T=step_time,
    dispatch=dispatch,
    loop=loop,
  )


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  N = jax.device_count()
  with tempfile.TemporaryDirectory() as root:
    world = make_toy_world(os.path.join(root, "world"), hidden=128, layers=4, n_train=64)
    rows = 2 * SLOTS
    splits = [n for n in range(N) if rows % (N - n) == 0 and (n == 0 or rows % n == 0)]
    results = {n: measure(world, os.path.join(root, f"run{n}"), n, args.repeats) for n in splits}
  colo = results[0]
  colocated = rows / (colo["S"] + colo["T"])
  print(
    f"{N} simulated CPU devices ({os.cpu_count()} cores shared by all of them): the split "
    "changes the work per device; the times are no accelerator split\n"
  )
  print(
    f"{'sampler n':>9} {'train N-n':>9} {'S(n) ms':>9} {'T(N-n) ms':>10} {'dispatch ms':>11} "
    f"{'model rows/s':>12} {'vs colocated':>12} {'k=1 loop ms':>11}"
  )
  modelled = {n: rows / max(r["S"], r["T"]) if n else colocated for n, r in results.items()}
  for n, r in results.items():
    print(
      f"{n if n else 'shared':>9} {r['train_devices']:>9} {1e3 * r['S']:>9.1f} "
      f"{1e3 * r['T']:>10.1f} {1e3 * r['dispatch']:>11.1f} {modelled[n]:>12.1f} "
      f"{modelled[n] / colocated:>11.2f}x {1e3 * r['loop']:>11.1f}"
    )
  best = max((n for n in results if n), key=modelled.get, default=None)
  if best:
    print(
      f"\nbest split: sampler {best} + training {N - best} devices, modelled "
      f"{modelled[best]:.1f} rows/s vs colocated {colocated:.1f} rows/s "
      f"(S(N) + T(N) = {1e3 * (colo['S'] + colo['T']):.0f} ms per step)"
    )


if __name__ == "__main__":
  main()

"""Continuous batching in the OPD step on the task world's real rollouts, against the static loop.

The committed task world (jdistill/experiments/assets/task_world: character tokenizer, the weak
base as the student, one lineage teacher per domain) with the recipes' settings
(`task_world.recipe_config`: 3 teachers x 16 rows, prompts of <= 24 tokens, 48 new tokens)
and `sampling.stop_at_eos = True`, so each completion ends at the model's own EOS. One
`OPDTrainer`, one process: the same prompt batches are rolled out with the static loop
(`sampling.continuous_slots = 0`: one batch of 48 rows until its longest row stops) and with
continuous batching at each slot count (`generate_continuous`: slots per teacher refill from
the teacher's queue); then the train step runs on that batch (its shape does not depend on
the rollout path). Timings are warm (a first batch compiles), median over the batches.

Reported: the completion-length distribution (does it vary enough for refills to pay?), the
decode loop steps each path needs, rollout tokens/s (generated tokens, stop token included)
and whole-step tokens/s (rollouts + train step), and continuous over static.

  python bench/continuous_opd.py [--slots 4,8,16] [--batches 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from jdistill.experiments import task_world as tw
from jdistill.stages import opd


def trainer(out_dir: str, batches: int) -> opd.OPDTrainer:
  c = tw.recipe_config("lineage", "reverse_kl")
  c.output_dir = out_dir
  c.sampling.stop_at_eos = True
  c.train.steps = 100
  c.optimizer.warmup_steps = 0
  c.train.sample_rows = 0
  c.train.eval_every = 0
  c.checkpoint.every = 10**6  # the bench calls the step directly; nothing is saved
  return opd.OPDTrainer(c)


def timed_step(t: opd.OPDTrainer, prompts: dict, rng, slots: int) -> dict:
  """One OPD step (rollouts, resident teachers' forwards and update inside the train step)
  with `slots` continuous slots per teacher (0: static) → times and the batch's lengths."""
  t.config.sampling.continuous_slots = slots
  t0 = time.perf_counter()
  batch, _ = t.sample(prompts, rng)
  jax.block_until_ready(batch["tokens"])
  t1 = time.perf_counter()
  cache = t.teacher_cache(batch)
  t.state, metrics = t.train_step(t.state, t.teachers.states, cache, batch, np.asarray(False))
  jax.block_until_ready(metrics["loss"])
  t2 = time.perf_counter()
  lengths = np.asarray(batch["completion_mask"]).sum(1).astype(int)
  return {"rollout_s": t1 - t0, "train_s": t2 - t1, "lengths": lengths}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--slots", default="4,8,16", help="continuous slots per teacher to try")
  parser.add_argument("--batches", type=int, default=4, help="timed prompt batches per path")
  args = parser.parse_args()
  slot_counts = [int(s) for s in args.slots.split(",")]

  with tempfile.TemporaryDirectory() as out_dir:
    t = trainer(out_dir, args.batches)
    rows_per_teacher = t.config.data.slots_per_teacher
    n_teachers = len(t.teachers.specs)
    new = t.config.sampling.max_new_tokens
    prompts = [next(t.data_iter) for _ in range(args.batches + 1)]
    rngs = [jax.random.key(100 + i) for i in range(len(prompts))]
    paths = [0, *slot_counts]
    loop_stats = []  # LoopStats of each generate_continuous call the stage makes
    generate_continuous = t.sampler.generate_continuous

    def recorded(*a, **k):
      out = generate_continuous(*a, **k)
      loop_stats.append(out[1])
      return out

    t.sampler.generate_continuous = recorded
    for s in paths:  # batch 0 compiles each path
      timed_step(t, prompts[0], rngs[0], s)
    runs = {s: [] for s in paths}
    for i in range(1, len(prompts)):  # the paths take turns, so the machine's load hits all
      for s in paths:
        del loop_stats[:]
        r = timed_step(t, prompts[i], rngs[i], s)
        r["decode_steps"] = int(loop_stats[0].decode_steps) if s else int(r["lengths"].max())
        runs[s].append(r)

  print(
    f"jax {jax.__version__} ({jax.default_backend()}); {os.cpu_count()} CPU cores, shared with "
    "other jobs (timings are noisy)"
  )
  cfg = t.model_cfg
  print(
    f"task world: student {cfg.num_layers} layers, width {cfg.hidden_size}, vocab "
    f"{cfg.vocab_size}; {n_teachers} teachers x {rows_per_teacher} rows, prompt bucket "
    f"{t.config.sampling.prompt_buckets[0]}, max {new} new tokens, stop at EOS"
  )
  for s in paths:
    lengths = np.concatenate([r["lengths"] for r in runs[s]])
    print(
      f"completion lengths ({'static' if s == 0 else f'{s} slots'}, {len(lengths)} rows): "
      f"min {lengths.min()}, median {int(np.median(lengths))}, mean {lengths.mean():.1f}, "
      f"p90 {int(np.percentile(lengths, 90))}, max {lengths.max()}, at the limit "
      f"{int((lengths >= new).sum())}; mean/max per batch "
      f"{np.mean([r['lengths'].mean() / r['lengths'].max() for r in runs[s]]):.2f}"
    )
  print("rollout and step times: median over the batches (best in brackets)")
  print(
    f"{'path':<22}{'loop steps':>11}{'ms/step':>8}{'rollout s':>17}{'rollout tok/s':>15}"
    f"{'train s':>9}{'step s':>8}{'step tok/s':>12}"
  )
  base = None
  for s in paths:
    rollouts = [r["rollout_s"] for r in runs[s]]
    steps_s = [r["rollout_s"] + r["train_s"] for r in runs[s]]
    rollout, best = float(np.median(rollouts)), min(rollouts)
    train = float(np.median([r["train_s"] for r in runs[s]]))
    whole = float(np.median(steps_s))
    generated = float(np.mean([r["lengths"].sum() for r in runs[s]]))
    # Decode loop iterations: the static loop runs to the batch's longest row; continuous
    # batching until every teacher's queue is done (LoopStats.decode_steps).
    steps = np.mean([r["decode_steps"] for r in runs[s]])
    name = "static" if s == 0 else f"continuous, {s}/teacher"
    print(
      f"{name:<22}{steps:>11.1f}{rollout / steps * 1e3:>8.2f}{rollout:>9.3f} ({best:.3f})"
      f"{generated / rollout:>15,.0f}{train:>9.3f}{whole:>8.3f}{generated / whole:>12,.0f}"
    )
    if s == 0:
      base = (rollout, best, whole)
    else:
      print(
        f"{'':<22}continuous / static (tokens/s): rollouts {base[0] / rollout:.2f}x (best "
        f"{base[1] / best:.2f}x), whole step {base[2] / whole:.2f}x"
      )


if __name__ == "__main__":
  main()

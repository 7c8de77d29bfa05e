"""What exact resume under `rollout.staleness` costs a checkpoint: size and save time of a step
with the batches sampled ahead (the `pending` item) and without.

A k = 1 disaggregated OPD run of the toy world (8 simulated CPU devices: 4 train, 4 sample)
trains 2 steps; then the same state is saved `--repeats` times each way (distinct steps,
synchronous: save + wait) and the step folders measured.

    python bench/stale_checkpoint.py [--repeats 3] [--staleness 1] [--out runs/stale_ckpt]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402


def folder_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--staleness", type=int, default=1)
  ap.add_argument("--out", default="runs/stale_ckpt")
  args = ap.parse_args()
  import jax

  from jdistill.runtime import checkpoint as ckpt
  from jdistill.stages import opd
  from jdistill.testing.toy import make_toy_world, short_run_config

  out = os.path.abspath(args.out)
  shutil.rmtree(out, ignore_errors=True)
  world = make_toy_world(os.path.join(out, "world"), n_train=32, n_eval=8)
  c = short_run_config(world, os.path.join(out, "run"), steps=2 + args.staleness, eval_every=0)
  c.rollout.devices, c.rollout.staleness = 4, args.staleness
  c.checkpoint.dir, c.checkpoint.every = os.path.join(out, "ckpt"), 10**6
  trainer = opd.OPDTrainer(c)
  trainer.run(steps=2)
  pending = trainer.pending_state()
  assert pending is not None and len(pending[1]["batches"]) == args.staleness
  rows = {}
  step = 100
  for name, saved in (("without", None), ("with", pending)) * args.repeats:
    step += 1
    t0 = time.perf_counter()
    ckpt.save_train_state(
      trainer.checkpointer, step, trainer.state, rng=trainer.rng,
      data_state=trainer.data_state(), identity=trainer.identity, pending=saved, force=True,
    )  # fmt: skip
    trainer.checkpointer.wait()
    seconds = time.perf_counter() - t0
    folder = os.path.join(c.checkpoint.dir, str(step))
    row = rows.setdefault(name, dict(seconds=[], bytes=folder_bytes(folder)))
    row["seconds"].append(seconds)
    if name == "with":
      row["pending_item_bytes"] = folder_bytes(os.path.join(folder, "pending"))
  arrays = pending[0]["0"]
  result = dict(
    staleness=args.staleness,
    batch={k: [list(v.shape), v.dtype.name] for k, v in arrays.items()},
    batch_bytes=sum(v.nbytes for v in arrays.values()),
    params_bytes=sum(x.nbytes for x in jax.tree.leaves(trainer.params)),
    **{
      name: dict(
        step_bytes=row["bytes"],
        save_s_median=round(statistics.median(row["seconds"]), 3),
        save_s=[round(s, 3) for s in row["seconds"]],
        **(
          {"pending_item_bytes": row["pending_item_bytes"]} if "pending_item_bytes" in row else {}
        ),
      )
      for name, row in rows.items()
    },
    device=jax.devices()[0].device_kind,
  )
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()

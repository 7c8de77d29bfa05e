"""A chaos run: a tiny OPD run killed at random moments ends where an uninterrupted one does.

The real command line (`python -m jdistill opd --config=configs/opd_tiny.py`) trains
`--steps` steps of the toy world (`jdistill.testing.toy`, one CPU device, a checkpoint every
`--every` steps), once straight through and once killed `--kills` times at random moments, each
kill followed by the same command again until the run finishes. The kills mix:

  sigkill      kill -9 right after a random step's progress line (plus 0-200 ms)
  save-kill    kill -9 right after the line of a checkpoint step: the step's save was just
               dispatched and orbax is writing it in the background
  sigterm      SIGTERM after a random step's line: the run saves that step and exits 143
  start-kill   kill -9 0.5-8 s after the command starts (startup, restore or compile)

Then the two runs are compared: the final checkpoint's params and the exported safetensors
(max abs diff) and every step's record in `metrics.jsonl` (all fields but the timings).

    python bench/chaos.py [--steps 300] [--kills 20] [--every 7] [--seed 0] [--out runs/chaos]

Prints the result as JSON and writes it to `<out>/chaos.json` (committed:
`bench/results_chaos.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMINGS = ("generated_tokens_per_s", "tokens_per_s", "elapsed_s")


def command(out: str, steps: int, every: int) -> list[str]:
  return [
    sys.executable, "-m", "jdistill", "opd", "--config=configs/opd_tiny.py",
    f"--config.output_dir={out}", f"--config.checkpoint.dir={out}/ckpt",
    f"--config.export_dir={out}/hf", f"--config.checkpoint.every={every}",
    f"--config.train.steps={steps}", "--config.train.log_every=1",
    "--config.train.eval_every=0", "--config.data.slots_per_teacher=2",
    "--config.sampling.max_new_tokens=6", "--config.optimizer.warmup_steps=1",
  ]  # fmt: skip


def environment(world: str, cache: str) -> dict:
  env = dict(os.environ, JDISTILL_TOY_WORLD=world, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  env["JAX_COMPILATION_CACHE_DIR"] = cache
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return env


def step_of(line: str) -> int | None:
  """The step of a progress line `step 12/300 | ...` (not the `compiling…` line)."""
  if not line.startswith("step ") or "compiling" in line:
    return None
  return int(line.split()[1].split("/")[0])


def session(args, env, out, kill=None) -> dict:
  """One run of the command; `kill` = (kind, target step or delay): how to stop it."""
  proc = subprocess.Popen(
    command(out, args.steps, args.every), cwd=ROOT, env=env, stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT, text=True,
  )  # fmt: skip
  t0, lines, first, last, sent = time.time(), [], None, None, None
  timer = None
  if kill and kill[0] == "start-kill":
    timer = threading.Timer(
      kill[1], lambda: proc.poll() is None and proc.send_signal(signal.SIGKILL)
    )
    timer.start()
    sent = "SIGKILL"
  for line in proc.stdout:
    lines.append(line)
    step = step_of(line)
    if step is None:
      continue
    first = step if first is None else first
    last = step
    if kill is None or sent:
      continue
    kind, target = kill
    if kind == "save-kill" and step >= target and step % args.every == 0:
      proc.send_signal(signal.SIGKILL)
      sent = "SIGKILL"
    elif kind == "sigkill" and step >= target:
      time.sleep(random.uniform(0, 0.2))
      proc.send_signal(signal.SIGKILL)
      sent = "SIGKILL"
    elif kind == "sigterm" and step >= target:
      proc.send_signal(signal.SIGTERM)
      sent = "SIGTERM"
  proc.wait()
  if timer is not None:
    timer.cancel()
  text = "".join(lines)
  resumed = [re.search(r"resuming at step (\d+)", ln) for ln in lines]
  resumed = [int(m.group(1)) for m in resumed if m]
  return dict(
    kind=kill[0] if kill else "run", target=kill[1] if kill else None, signal=sent,
    rc=proc.returncode, first_step=first, last_step=last,
    resumed_at=resumed[0] if resumed else None,
    seconds=round(time.time() - t0, 1), tail=text[-600:] if proc.returncode not in (0, 143, -9)
    else "",
  )  # fmt: skip


def metrics(out: str) -> dict[int, dict]:
  records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
  steps = [r["step"] for r in records if "eval" not in r]
  if len(steps) != len(set(steps)):
    raise AssertionError(f"{out}/metrics.jsonl: a step recorded twice")
  return {r["step"]: {k: v for k, v in r.items() if k not in TIMINGS} for r in records}


def checkpoint_params(out: str, step: int) -> dict:
  import orbax.checkpoint as ocp

  manager = ocp.CheckpointManager(os.path.join(out, "ckpt"))
  restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
  manager.close()
  import jax

  flat = jax.tree_util.tree_leaves_with_path(restored["params"])
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def exported(out: str) -> dict:
  from safetensors.numpy import load_file

  tensors = {}
  for name in sorted(os.listdir(os.path.join(out, "hf"))):
    if name.endswith(".safetensors"):
      tensors.update(load_file(os.path.join(out, "hf", name)))
  return tensors


def max_abs_diff(a: dict, b: dict) -> float:
  if set(a) != set(b):
    raise AssertionError(f"other arrays: {sorted(set(a) ^ set(b))[:5]}")
  return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--kills", type=int, default=20)
  ap.add_argument("--every", type=int, default=7)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="runs/chaos")
  ap.add_argument(
    "--keep_straight", action="store_true", help="reuse <out>/straight of an earlier call"
  )
  args = ap.parse_args()
  random.seed(args.seed)
  out = os.path.abspath(args.out)
  world = os.path.join(out, "world")
  env = environment(world, os.path.join(out, "jax_cache"))
  straight_s = None
  if args.keep_straight and os.path.exists(os.path.join(out, "straight", "hf")):
    shutil.rmtree(os.path.join(out, "chaos"), ignore_errors=True)
  else:
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    from jdistill.testing.toy import make_toy_world

    make_toy_world(world, hidden=32, layers=1, n_train=8, n_eval=4)
    t0 = time.time()
    straight = session(args, env, os.path.join(out, "straight"))
    assert straight["rc"] == 0, straight
    straight_s = round(time.time() - t0, 1)

  kinds = ["sigkill", "save-kill", "sigterm", "start-kill"]
  targets = sorted(random.sample(range(1, args.steps), args.kills))
  plan = []
  last_save = (args.steps - 1) // args.every * args.every  # the last save before the end
  for target in targets:
    kind = random.choice(kinds)
    if kind == "save-kill":
      target = min(target, last_save)
    plan.append((kind, round(random.uniform(0.5, 8.0), 2) if kind == "start-kill" else target))
  chaos, sessions = os.path.join(out, "chaos"), []
  t0 = time.time()
  for kill in plan:
    s = session(args, env, chaos, kill)
    sessions.append(s)
    print(json.dumps({k: v for k, v in s.items() if k != "tail"}), flush=True)
    if s["rc"] == 0:  # finished before the kill landed: nothing left to interrupt
      break
  while sessions[-1]["rc"] != 0:  # then the same command until it finishes
    s = session(args, env, chaos)
    sessions.append(s)
    print(json.dumps({k: v for k, v in s.items() if k != "tail"}), flush=True)
    if s["rc"] == 0:
      break
    if len(sessions) > args.kills + 5:
      raise SystemExit(f"the run does not finish: {s}")
  chaos_s = time.time() - t0

  m_straight, m_chaos = metrics(os.path.join(out, "straight")), metrics(chaos)
  differ = [s for s in m_straight if m_straight[s] != m_chaos.get(s)]
  result = dict(
    steps=args.steps, every=args.every, seed=args.seed,
    kills=sum(1 for s in sessions if s["signal"]),
    kills_by_kind={k: sum(1 for s in sessions if s["kind"] == k and s["signal"]) for k in kinds},
    sessions=len(sessions),
    unexpected_exits=[s for s in sessions if s["rc"] not in (0, 143, -9)],
    params_max_abs_diff_checkpoint=max_abs_diff(
      checkpoint_params(os.path.join(out, "straight"), args.steps),
      checkpoint_params(chaos, args.steps),
    ),
    params_max_abs_diff_export=max_abs_diff(
      exported(os.path.join(out, "straight")), exported(chaos)
    ),
    metrics_steps=len(m_straight),
    metrics_steps_chaos=len(m_chaos),
    metrics_steps_differ=differ[:10],
    metrics_equal=not differ and set(m_straight) == set(m_chaos),
    straight_s=straight_s,
    chaos_s=round(chaos_s, 1),
    log=[{k: v for k, v in s.items() if k != "tail"} for s in sessions],
  )  # fmt: skip
  with open(os.path.join(out, "chaos.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps({k: v for k, v in result.items() if k != "log"}, indent=1))


if __name__ == "__main__":
  main()

"""The whole OPD step with a teacher of another tokenizer against the same-tokenizer step.

Toy world (`jdistill.testing.toy`, student width 64, 2 layers, vocab 384); one sampled-token
teacher (width 64, 2 layers) owns every prompt. Three trainers in one process, at the same
rollout shape (rows x (prompt bucket + new tokens)):

  same:  today's path, the world's teacher with the student's tokenizer;
  spans: the same teacher sent through the span path (`tokenizer` = the student's: the host
         alignment takes its same-vocabulary shortcut, the rest is the new path);
  other: a teacher of another byte-level BPE (trained on the same prompts to `--other-vocab`
         tokens, so its merges differ), scored per aligned span.

With `--loss reverse_kl` every trainer runs the dense loss and `other` is timed once per
reading of `--matches` (`token`, `prefix`, `marginal`; `teachers.<name>.dense_match`).

Per trainer: the median `train_one` (sampling, host alignment, the teacher's span scoring,
the compiled step) over `--steps` steps after two warm-up steps, and the host alignment's share
(`cross_tokenizer.layouts`, timed inside the same steps).

  python bench/cross_tokenizer_step.py [--rows 8] [--new-tokens 32] [--steps 10]
      [--loss reverse_kl --matches token,prefix,marginal]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import numpy as np

from jdistill.data.tokenizer import train_tiny_tokenizer
from jdistill.models import ModelConfig
from jdistill.stages import opd as train
from jdistill.step import cross_tokenizer
from jdistill.testing.toy import make_toy_world, random_model_dir, short_run_config

host_seconds = []
_layouts = cross_tokenizer.layouts


def _timed_layouts(*args, **kwargs):
  t0 = time.perf_counter()
  out = _layouts(*args, **kwargs)
  host_seconds.append(time.perf_counter() - t0)
  return out


cross_tokenizer.layouts = _timed_layouts


def other_teacher(world, root, vocab):
  texts = [json.loads(line)["prompt"] for line in open(world["train"])]
  tokenizer = train_tiny_tokenizer(f"{root}/other_tok", texts * 4, vocab_size=vocab)
  cfg = ModelConfig(
    model_type="qwen3", qk_norm=True, vocab_size=len(tokenizer), hidden_size=64,
    intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
  )  # fmt: skip
  path = random_model_dir(f"{root}/other", cfg, 5, tokenizer, unembed_scale=15.0)
  return path, f"{root}/other_tok", len(tokenizer)


def time_trainer(world, root, name, args, teacher=None, tokenizer=None, match="token"):
  c = short_run_config(world, f"{root}/{name}", max_new_tokens=args.new_tokens, steps=1000)
  c.train.eval_every = 0
  c.data.slots_per_teacher = args.rows
  del c.teachers["math"]
  c.teachers.code.domains = "math,code"
  if teacher:
    c.teachers.code.path = teacher
  c.teachers.code.tokenizer = tokenizer
  c.teachers.code.loss = args.loss
  if tokenizer:
    c.teachers.code.dense_match = match
  trainer = train.OPDTrainer(c)
  for _ in range(2):
    jax.block_until_ready(trainer.train_one(diagnostics=False))
  host_seconds.clear()
  times, dropped = [], []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    metrics = jax.block_until_ready(trainer.train_one(diagnostics=False))
    times.append(time.perf_counter() - t0)
    dropped.append(float(metrics["teachers"]["code"].get("dropped_tokens", 0.0)))
  host = 1e3 * sum(host_seconds) / args.steps
  return 1e3 * float(np.median(times)), host, float(np.mean(dropped))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rows", type=int, default=8)
  p.add_argument("--new-tokens", type=int, default=32)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--other-vocab", type=int, default=360)
  p.add_argument("--loss", default="sampled_token", choices=("sampled_token", "reverse_kl"))
  p.add_argument("--matches", default="token", help="dense readings of `other` (reverse_kl)")
  args = p.parse_args()
  root = tempfile.mkdtemp()
  world = make_toy_world(f"{root}/world", n_train=32, n_eval=8)
  path, tok, vocab = other_teacher(world, root, args.other_vocab)
  runs = {
    "same": time_trainer(world, root, "same", args),
    "spans": time_trainer(world, root, "spans", args, tokenizer=world["tokenizer"]),
  }
  for match in args.matches.split(",") if args.loss == "reverse_kl" else ["token"]:
    name = "other" if args.loss == "sampled_token" else f"other_{match}"
    runs[name] = time_trainer(world, root, name, args, teacher=path, tokenizer=tok, match=match)
  base = runs["same"][0]
  print(
    f"{args.rows} rows x (32 prompt + {args.new_tokens} new), {args.loss}; other teacher "
    f"vocab {vocab}"
  )
  for name, (ms, host, dropped) in runs.items():
    print(
      f"{name:>14}: step {ms:8.1f} ms ({ms / base:.2f}x same), host alignment {host:6.1f} ms"
      f"/step, dropped tokens {dropped:.3f}"
    )


if __name__ == "__main__":
  main()

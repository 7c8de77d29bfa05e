"""Embedded CPU config: two tiny random teachers (Llama, Qwen3) distilled into a tiny student.

The toy world (tokenizer, prompts, teachers, student) is written on first use, so
this runs on a fresh machine with no downloads:

  python -m jdistill.train --config=configs/opd_tiny.py --config.train.steps=20
"""

import os

from jdistill.toy import make_toy_world, tiny_config

WORLD = os.environ.get("JDISTILL_TOY_WORLD", "runs/toy_world")


def get_config():
  paths = (
    make_toy_world(WORLD)
    if not os.path.exists(os.path.join(WORLD, "eval.jsonl"))
    else {
      "tokenizer": f"{WORLD}/tokenizer",
      "student": f"{WORLD}/student",
      "teacher_math": f"{WORLD}/teacher_math",
      "teacher_code": f"{WORLD}/teacher_code",
      "train": f"{WORLD}/train.jsonl",
      "eval": f"{WORLD}/eval.jsonl",
    }
  )
  config = tiny_config(paths)
  config.checkpoint.dir = os.path.abspath("runs/opd_tiny/ckpt")
  return config

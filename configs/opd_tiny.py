"""Embedded CPU config: two tiny random teachers (Llama, Qwen3) distilled into a tiny student.

The toy world (tokenizer, prompts, teachers, student) is written on first use, so
this runs on a fresh machine with no downloads:

  python -m jdistill opd --config=configs/opd_tiny.py --config.train.steps=20
"""

import os

from jdistill.testing.toy import load_or_make_world, tiny_config

WORLD = os.environ.get("JDISTILL_TOY_WORLD", "runs/toy_world")


def get_config():
  config = tiny_config(load_or_make_world(WORLD))
  config.checkpoint.dir = os.path.abspath("runs/opd_tiny/ckpt")
  return config

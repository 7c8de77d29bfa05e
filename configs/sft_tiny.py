"""Embedded CPU config for warmup SFT: the toy student learns completions before OPD.

Writes a small prompt + completion file from the toy world's training prompts on first use
(the completion here is the math answer; a real run uses a teacher's completions):

  python -m jdistill sft --config=configs/sft_tiny.py --config.train.steps=50
"""

import json
import os

from jdistill.testing.toy import load_or_make_world, tiny_config

WORLD = os.environ.get("JDISTILL_TOY_WORLD", "runs/toy_world")


def get_config():
  paths = load_or_make_world(WORLD)
  examples = f"{WORLD}/sft.jsonl"
  if not os.path.exists(examples):
    with open(examples, "w") as f:
      for a in range(12):
        for b in range(12):
          line = {"domain": "math", "prompt": f"what is {a} plus {b}?", "completion": str(a + b)}
          f.write(json.dumps(line) + "\n")
  config = tiny_config(paths)
  config.stage = "sft"
  config.output_dir = "runs/sft_tiny"
  config.sft.train_files = examples
  config.sft.max_len = 64
  config.sft.rows_per_step = 8
  config.train.steps = 100
  config.train.log_every = 10
  config.train.eval_every = 0
  return config

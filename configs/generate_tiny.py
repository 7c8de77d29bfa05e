"""Embedded CPU config for teacher-data generation: the toy math teacher answers its prompts.

Each math prompt of the toy world carries its reference answer, so the `numeric` verifier
scores every completion; `--config.generate.keep=verified` keeps only the correct ones:

  python -m jdistill generate --config=configs/generate_tiny.py
"""

import os

from jdistill.testing.toy import load_or_make_world, tiny_config

WORLD = os.environ.get("JDISTILL_TOY_WORLD", "runs/toy_world")


def get_config():
  paths = load_or_make_world(WORLD)
  config = tiny_config(paths)
  config.stage = "generate"
  config.generate.model = paths["teacher_math"]
  config.generate.model_name = "math"
  config.generate.out_dir = "runs/generated/math"
  config.generate.samples_per_prompt = 4
  config.generate.verifier = "numeric"
  return config

"""Embedded CPU pipeline: teacher data → overlap-triggered warmup SFT → multi-teacher OPD.

  1-generate  each toy teacher samples completions for its own domain's prompts
  2-sft       the student learns those completions until each teacher's calibrated overlap
              with the student's own rollouts reaches sft.until_overlap (logged; at most
              pipeline.steps[1] steps)
  3-opd       on-policy distillation from both teachers, from the SFT stage's final model

Each stage writes into its own folder under output_dir; a killed run resumes at the stage
and step it reached when the same command is run again:

  python -m jdistill pipeline --config=configs/pipeline_tiny.py
"""

import os

from jdistill.testing.toy import load_or_make_world, tiny_config

WORLD = os.environ.get("JDISTILL_TOY_WORLD", "runs/toy_world")


def get_config():
  config = tiny_config(load_or_make_world(WORLD))
  config.output_dir = "runs/pipeline_tiny"
  config.pipeline.stages = ("generate", "sft", "opd")
  config.pipeline.steps = (0, 60, 40)
  config.generate.model = "teachers"
  config.generate.samples_per_prompt = 2
  config.generate.prompts_per_batch = 16
  config.sft.max_len = 64
  config.sft.rows_per_step = 8
  config.sft.until_overlap = 0.5
  config.sft.overlap_every = 10
  config.sft.overlap_rows = 8
  config.optimizer.warmup_steps = 2
  config.train.log_every = 10
  config.train.eval_every = 0
  config.checkpoint.every = 10
  return config

"""The stages by name: what `python -m jdistill <stage>` and a pipeline's steps run.

Each stage module has `run(config) -> summary`; the training stages (a `base.TrainingStage`
each) run through `base.run_training`.
"""

from __future__ import annotations

import importlib

STAGES = {
  "opd": "jdistill.stages.opd",  # on-policy distillation from config.teachers
  "sft": "jdistill.stages.sft",  # warmup SFT on completions
  "rlvr": "jdistill.stages.rlvr",  # GRPO with verifiable rewards (+ sampled-token OPD)
  "generate": "jdistill.stages.generate",  # teacher data, verified, written exactly once
}
TRAINING = ("sft", "opd", "rlvr")


def run_stage(config) -> dict:
  """Runs the stage `config.stage` names to its end → its summary."""
  return importlib.import_module(STAGES[config.stage]).run(config)

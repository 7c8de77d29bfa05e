"""The OPD run config (`ml_collections.ConfigDict`): defaults and validation.

`configs/*.py` start from `base_config()` and override fields; the command line
overrides again (`--config.optimizer.lr=3e-6 --config.teachers.math.weight=2`).
`validate(config)` runs before anything is compiled; every error names the field and the
allowed values.

Each section's fields (default, description, allowed values) and its checks live together:

  run.py       top level (seed, stage, output_dir, ...) and mesh; config_hash
  model.py     student, teachers.<name> (teacher_config)
  data.py      data, sampling, rollout, episode
  training.py  loss, optimizer, train, checkpoint; LOSSES
  metrics.py   eval, overlap
  stages.py    generate, sft, rl, pipeline; what each `stage` needs
  fields.py    field() / section() and the shared checks (one error format)
  docs.py      renders docs/configs.md from the declarations (python -m jdistill.config.docs)
"""

from __future__ import annotations

import ml_collections as mlc

from jdistill.config import data, metrics, model, run, stages, training
from jdistill.config.fields import check_finite
from jdistill.config.model import (
  DTYPES,
  PLACEMENTS,
  teacher_config,
  teacher_domains,
  teacher_names,
)
from jdistill.config.run import RUN_BOOKKEEPING, STAGES, config_hash
from jdistill.config.training import LOSSES

__all__ = [
  "DTYPES",
  "LOSSES",
  "PLACEMENTS",
  "RUN_BOOKKEEPING",
  "SECTIONS",
  "STAGES",
  "base_config",
  "config_hash",
  "teacher_config",
  "teacher_domains",
  "teacher_names",
  "validate",
]

# Every section, in the config's order (docs/configs.md.in places them in its own order);
# `teachers.<name>` is one entry of `teachers`, filled per run with `teacher_config(...)`.
SECTIONS = (
  run.TOP,
  run.MESH,
  model.STUDENT,
  model.TEACHER,
  data.DATA,
  data.SAMPLING,
  data.ROLLOUT,
  data.EPISODE,
  training.LOSS,
  training.OPTIMIZER,
  stages.SFT,
  stages.GENERATE,
  stages.RL,
  metrics.EVAL,
  stages.PIPELINE,
  training.TRAIN,
  training.CHECKPOINT,
  metrics.OVERLAP,
)


def base_config() -> mlc.ConfigDict:
  c = run.TOP.config()
  for section in SECTIONS[1:]:
    c[section.key] = mlc.ConfigDict() if section is model.TEACHER else section.config()
  return c


def validate(config) -> None:
  """Raises ValueError naming the first bad field and what it allows."""
  check_finite(config)
  run.validate(config)
  data.validate(config)
  training.validate(config)
  metrics.validate(config)
  model.validate_student(config)
  stages.validate_stage(config)

"""Pipelines: stages chained in one run directory, each from the previous one's final model.

  python -m jdistill pipeline --config=configs/pipeline_tiny.py

`pipeline.stages` lists stages (`generate`, `sft`, `opd`, `rlvr`), e.g. `("generate", "sft",
"opd")`. Stage k runs with the same config except:

  output_dir       <output_dir>/<k>-<stage>       (its metrics, checkpoints, final model)
  checkpoint.dir   <stage dir>/checkpoints
  export_dir       <stage dir>/final              (HF safetensors + tokenizer; training stages)
  student.path     the final model of the last training stage before it (if any)
  train.steps      pipeline.steps[k] when given and > 0
  generate.out_dir <stage dir>/data               (generate)
  sft.train_files  the previous generate stage's files, when sft.train_files is empty
  anything else    pipeline.overrides.<stage>: fields that differ in stages of that name,
                   e.g. `overrides.rlvr.loss.kl_weight=0.0` (pure GRPO before a distilling OPD)

Every stage's config is validated before the first one runs. A finished stage writes
`<stage dir>/DONE.json` (atomically, after its final model is exported) and is never redone;
a killed pipeline reruns with the same command and goes on at the first unfinished stage,
which resumes from its own checkpoints at the step it reached (generation: at its last
committed batch), so the result equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

import jax
import ml_collections as mlc

from jdistill import config as config_lib
from jdistill import stages
from jdistill.runtime.io import write_json_atomic
from jdistill.stages import TRAINING
from jdistill.stages.generate import output_files

log = logging.getLogger("jdistill")


def stage_dir(config, k: int) -> str:
  return os.path.join(config.output_dir, f"{k + 1}-{config.pipeline.stages[k]}")


# What a pipeline derives for each stage: an override of these would be silently replaced.
DERIVED = ("stage", "pipeline", "output_dir", "checkpoint.dir", "export_dir", "generate.out_dir")


def apply_overrides(config, overrides, where: str) -> None:
  """Sets each leaf of `overrides` (nested like `config`) on `config`; raises ValueError
  naming `<where>.<field>` for a field `config` does not have or a pipeline derives."""
  for key, value in overrides.items():
    field = f"{where}.{key}"
    dotted = field.split(".", 3)[-1]  # the field's path inside a stage's config
    if key not in config:
      raise ValueError(f"config.{field} names no config field ({dotted!r})")
    if dotted in DERIVED:
      raise ValueError(f"config.{field}: the pipeline sets {dotted!r} for every stage")
    if isinstance(value, mlc.ConfigDict) and isinstance(config[key], mlc.ConfigDict):
      apply_overrides(config[key], value, field)
    else:
      try:
        config[key] = value
      except TypeError as e:  # ml_collections refuses another type: name the field
        raise ValueError(f"config.{field}={value!r} is invalid; allowed: {e}") from None


def stage_config(config, k: int):
  """The config of stage `k` (see the module docstring)."""
  stages = tuple(config.pipeline.stages)
  c = config.copy_and_resolve_references()
  with c.unlocked():
    overrides = c.pipeline.overrides.get(stages[k])
    c.pipeline.stages, c.pipeline.steps, c.pipeline.overrides = (), (), mlc.ConfigDict()
    if overrides is not None:
      apply_overrides(c, overrides, f"pipeline.overrides.{stages[k]}")
    c.stage = stages[k]
    c.output_dir = stage_dir(config, k)
    c.checkpoint.dir = os.path.join(c.output_dir, "checkpoints")
    c.export_dir = os.path.join(c.output_dir, "final") if c.stage in TRAINING else ""
    before = [j for j in range(k) if stages[j] in TRAINING]
    if before:
      c.student.path = os.path.join(stage_dir(config, before[-1]), "final")
    steps = tuple(config.pipeline.steps)
    if steps and steps[k] > 0:
      c.train.steps = steps[k]
    if c.stage == "generate":
      c.generate.out_dir = os.path.join(c.output_dir, "data")
    generate = [j for j in range(k) if stages[j] == "generate"]
    if c.stage == "sft" and not config.sft.train_files and generate:
      c.sft.train_files = ",".join(output_files(stage_config(config, generate[-1])))
  return c


def validate(config) -> None:
  """The pipeline fields and every stage's derived config; raises ValueError naming the field."""
  stages = tuple(config.pipeline.stages)
  for name in stages:
    if name not in config_lib.STAGES:
      raise ValueError(
        f"config.pipeline.stages={stages!r} is invalid; allowed: stages from "
        f"{list(config_lib.STAGES)}"
      )
  steps = tuple(config.pipeline.steps)
  if steps and (len(steps) != len(stages) or any(not isinstance(s, int) or s < 0 for s in steps)):
    raise ValueError(
      f"config.pipeline.steps={steps!r} is invalid; allowed: empty, or one int >= 0 per stage "
      f"of pipeline.stages ({len(stages)}; 0 = train.steps)"
    )
  unknown = sorted(set(config.pipeline.overrides) - set(stages))
  if unknown:
    raise ValueError(
      f"config.pipeline.overrides has stages {unknown} that pipeline.stages={stages!r} lacks"
    )
  for k in range(len(stages)):
    try:
      config_lib.validate(stage_config(config, k))
    except ValueError as e:
      raise ValueError(f"pipeline stage {k + 1} ({stages[k]}): {e}") from None


def run_once(config, out_dir: str, run_stage: Callable[[object], dict] = stages.run_stage) -> dict:
  """`run_stage(config)`'s summary, computed once: a finished stage leaves
  `<out_dir>/DONE.json` (atomically, after its final model is exported) and is skipped."""
  marker = os.path.join(out_dir, "DONE.json")
  if os.path.exists(marker):
    with open(marker) as f:
      return json.load(f)
  summary = {"stage": config.stage, "config_hash": config_lib.config_hash(config)}
  summary.update(run_stage(config))
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(marker, summary, indent=1)
  return summary


def run(config, run_stage: Callable[[object], dict] = stages.run_stage) -> list[dict]:
  """Runs the unfinished stages in order with `run_stage(stage_config)` (which trains or
  generates to the end and exports); returns each stage's summary (from DONE.json when it was
  already done)."""
  validate(config)
  stages = tuple(config.pipeline.stages)
  summaries = []
  for k, name in enumerate(stages):
    c = stage_config(config, k)
    head = f"pipeline stage {k + 1}/{len(stages)} ({name})"
    if os.path.exists(os.path.join(c.output_dir, "DONE.json")):
      log.info("%s: done earlier, skipped (%s)", head, c.output_dir)
    else:
      log.info("%s: %s", head, c.output_dir)
    summaries.append(run_once(c, c.output_dir, run_stage))
  return summaries

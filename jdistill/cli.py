"""The command line: `python -m jdistill <command> [flags]`, or the `jdistill` script.

  jdistill opd --config=configs/opd_tiny.py --config.train.steps=20
  jdistill pipeline --config=configs/pipeline_tiny.py
  jdistill overlap --config=configs/opd_tiny.py --out=runs/overlap

A stage command (`STAGE_COMMANDS`) reads a config file and its `--config.*` overrides and
runs that stage (the command sets `config.stage`); `train` runs whatever the config names,
as `python -m jdistill.train` always did. Exit status: 0 done, 1 bad config or input (one
line naming the field or `file:line`, before anything compiles), 128 + N stopped by signal
N after a checkpoint, 74 (EX_IOERR) a full or unwritable disk (one line naming the path and
the errno; the committed checkpoints and finished files are intact: rerun to resume), 75
(EX_TEMPFAIL) a multi-process run lost a process (one line naming it and the last committed
step, within `config.peer_timeout_s`: rerun every process to resume;
`jdistill.runtime.distributed`).
The tools keep their own flags (`jdistill <tool> --help`).
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys

STAGE_COMMANDS = {
  "opd": "on-policy distillation from config.teachers",
  "sft": "warmup SFT on completions (sft.train_files)",
  "rlvr": "GRPO with verifiable rewards, unified with sampled-token OPD when teachers are set",
  "generate": "teacher data: n verified samples per prompt, written exactly once",
  "pipeline": "the stages in config.pipeline.stages, each resumed where it stood",
  "train": "whatever the config names (config.pipeline.stages, else config.stage)",
}
TOOLS = {
  "overlap": ("jdistill.overlap.probe:cli", "support overlap of the student's rollouts"),
  "evaluate": ("jdistill.eval.accuracy:cli", "greedy accuracy and pass@k per domain"),
  "question": ("jdistill.experiments.question:cli", "can engineered overlap replace student RL?"),
  "experiment": ("jdistill.experiments.experiment:cli", "the loss grid: loss x teachers x warmup"),
  "task_world": ("jdistill.experiments.task_world:cli", "rebuild the task world"),
  "dial": ("jdistill.experiments.dial:cli", "the overlap dial: teachers forked on mixed data"),
  "merge_ten": ("jdistill.experiments.merge_ten:cli", "ten teachers into one student: V4 vs Ultra"),
  "agentic": ("jdistill.experiments.agentic:cli", "the lookup domain: multi-turn OPD, tool calls"),
  "foreign": ("jdistill.experiments.foreign:cli", "another tokenizer's teacher: OPD vs its data"),
  "demo": ("jdistill.experiments.demo:cli", "what `make demo` runs"),
  "report": ("jdistill.report.html:cli", "one self-contained HTML report of a run directory"),
}


def usage() -> str:
  lines = ["usage: jdistill <command> [flags]", "", "stages (--config=FILE):"]
  lines += [f"  {name:<11} {what}" for name, what in STAGE_COMMANDS.items()]
  lines += ["", "tools:"]
  lines += [f"  {name:<11} {what}" for name, (_, what) in TOOLS.items()]
  return "\n".join(lines)


def run_config(config, command: str) -> None:
  """Runs stage `command` (or a pipeline) from a validated `config`; one-line errors."""
  from jdistill import config as config_lib
  from jdistill.runtime import distributed
  from jdistill.runtime import loop as loop_lib
  from jdistill.runtime.io import WriteFailed, is_disk_error
  from jdistill.stages import pipeline, run_stage
  from jdistill.stages.base import InputError

  is_pipeline = bool(config.pipeline.stages)
  if command == "pipeline" and not is_pipeline:
    sys.exit("jdistill: bad config: `jdistill pipeline` needs config.pipeline.stages")
  if command not in ("pipeline", "train"):
    if is_pipeline:
      sys.exit(
        f"jdistill: bad config: config.pipeline.stages is set; run `jdistill pipeline`, "
        f"not `jdistill {command}`"
      )
    config.stage = command
  try:
    (pipeline.validate if is_pipeline else config_lib.validate)(config)
  except ValueError as e:
    sys.exit(f"jdistill: bad config: {e}")
  distributed.initialize(config.peer_timeout_s, config.checkpoint.dir)
  try:
    if is_pipeline:
      pipeline.run(config)
    else:
      run_stage(config)
    distributed.finished()
  except InputError as e:  # bad input: one line, before any compile
    sys.exit(f"jdistill: {e}")
  except loop_lib.Stopped as e:
    print(f"jdistill: {e}", file=sys.stderr, flush=True)
    sys.exit(e.code)
  except WriteFailed as e:
    stop_on_disk_error(str(e))
  except OSError as e:  # a disk error that no writer wrapped (it may be a read) is one line too
    if not is_disk_error(e):
      raise
    name = errno.errorcode.get(e.errno, str(e.errno))
    stop_on_disk_error(f"{e.filename or 'a file'}: {os.strerror(e.errno)} ({name})")
  except Exception:  # e.g. a collective whose peer died: the watch names the peer first
    distributed.wait_for_lost_peer()
    raise


DISK_ERROR_STATUS = 74  # EX_IOERR (sysexits.h)


def stop_on_disk_error(what: str) -> None:
  """Exits with one line for a full or unwritable disk (`io.WriteFailed`)."""
  print(
    f"jdistill: {what}; committed checkpoints and finished files are intact: free space or fix "
    "the permissions, then run the same command again to resume",
    file=sys.stderr,
    flush=True,
  )
  sys.exit(DISK_ERROR_STATUS)


def stage_main(command: str) -> None:
  """`jdistill <stage command>`: the config flags, then `run_config`."""
  from absl import app, flags
  from absl import logging as absl_logging
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.", lock_config=True)
  flags.mark_flag_as_required("config")
  flags.DEFINE_bool("validate_only", False, "Validate the config, print it as JSON and exit.")
  flags.DEFINE_bool(
    "resume", False, "Continue the run in config.output_dir even if its config differs."
  )
  flags.DEFINE_bool(
    "new_run", False, "Move the run in config.output_dir aside (renamed) and start afresh."
  )

  def main(argv):
    if len(argv) > 1:
      sys.exit(f"jdistill {command}: unexpected arguments {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    # absl's handler now holds the root logger at WARNING: jdistill's own status lines stay on
    logging.getLogger("jdistill").setLevel(logging.INFO)
    fl = flags.FLAGS
    config = fl.config
    if fl.resume and fl.new_run:
      sys.exit("jdistill: --resume and --new_run exclude each other")
    if fl.resume or fl.new_run:
      config.run_mode = "resume" if fl.resume else "new"
    if fl.validate_only:
      from jdistill import config as config_lib
      from jdistill.stages import pipeline

      if command not in ("pipeline", "train") and not config.pipeline.stages:
        config.stage = command
      try:
        (pipeline.validate if config.pipeline.stages else config_lib.validate)(config)
      except ValueError as e:
        sys.exit(f"jdistill: bad config: {e}")
      print(config.to_json())
      return
    run_config(config, command)

  app.run(main)


def main(argv: list[str] | None = None) -> None:
  """`jdistill <command> [flags]` (`argv` defaults to `sys.argv`)."""
  argv = list(sys.argv if argv is None else argv)
  command = argv[1] if len(argv) > 1 else None
  if command in (None, "-h", "--help", "help"):
    print(usage())
    return
  if command not in STAGE_COMMANDS and command not in TOOLS:
    sys.exit(f"jdistill: unknown command {command!r}\n\n{usage()}")
  sys.argv = [f"jdistill {command}", *argv[2:]]
  # absl's app.run puts its handler on the root logger, and a command's
  # `absl_logging.set_verbosity(WARNING)` (to quiet orbax) sets the root level: jdistill's own
  # status lines stay at INFO regardless.
  logging.getLogger("jdistill").setLevel(logging.INFO)
  if command in STAGE_COMMANDS:
    stage_main(command)
  else:
    module, function = TOOLS[command][0].split(":")
    getattr(importlib.import_module(module), function)()

"""A run directory that never mixes two runs: a lock while a run is live, and the run's identity.

`<output_dir>/run.lock` holds the pid, host and start time of the run using the directory;
a second run refuses while that process lives (a lock whose process is gone, on this host,
is stale and taken over with a warning). `<output_dir>/run.json` records the config and its
hash (`config.config_hash`: everything that changes what the run computes). A run on a
directory that holds another config refuses unless told what to do:

  mode "auto"    same config: resume; another config: refuse, naming the fields that differ
  mode "resume"  continue the run in the directory with this config (recorded in run.json)
  mode "new"     move the directory (and an outside checkpoint directory) aside, renamed with
                 a time stamp, never deleted, and start afresh

(`python -m jdistill train --resume` / `--new_run`, or `config.run_mode`.)
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time

import jax

from jdistill.runtime.io import write_json_atomic

log = logging.getLogger("jdistill")

LOCK = "run.lock"
IDENTITY = "run.json"
MODES = ("auto", "resume", "new")


class RunDirInUse(RuntimeError):
  """Another live run holds the directory."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _stamp() -> str:
  return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def set_aside(path: str, why: str) -> str:
  """Renames `path` to `<path>.<why>-<UTC time>`; returns the new name."""
  dst = f"{path.rstrip(os.sep)}.{why}-{_stamp()}"
  os.rename(path, dst)
  return dst


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


class RunDir:
  """The output directory of one run, held for the life of this process (or `release()`)."""

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    self._held = False

  # --- the lock ----------------------------------------------------------------------

  def acquire(self) -> None:
    """Takes `run.lock`, or raises RunDirInUse naming the pid and host that hold it."""
    if jax.process_index() != 0:
      return
    os.makedirs(self.path, exist_ok=True)
    lock = os.path.join(self.path, LOCK)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _stamp()}
    for _ in range(2):
      try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._read(lock)
        same_host = holder.get("host") == me["host"]
        pid = holder.get("pid")
        if same_host and (pid == me["pid"] or not (isinstance(pid, int) and _alive(pid))):
          if pid != me["pid"]:
            log.warning("taking over the stale lock of pid %s (gone) in %s", pid, self.path)
          os.remove(lock)
          continue
        raise RunDirInUse(
          f"{self.path} is in use by pid {pid} on host {holder.get('host')} since "
          f"{holder.get('started')} (lock file {lock}); wait for that run, choose another "
          "config.output_dir, or delete the lock file if that run is gone"
        ) from None
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self._held = True
      atexit.register(self.release)
      return
    raise RunDirInUse(f"{lock}: could not take the lock")

  def release(self) -> None:
    lock = os.path.join(self.path, LOCK)
    if self._held and self._read(lock).get("pid") == os.getpid():
      os.remove(lock)
    self._held = False

  @staticmethod
  def _read(path: str) -> dict:
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  # --- the identity ------------------------------------------------------------------

  def check_identity(self, config_hash: str, config_json: str, mode: str) -> str:
    """Compares this config with the one the directory holds (writes nothing).

    Returns "new" (no earlier run here), "same" (the same config: resume) or "changed"
    (mode "resume"). Raises ValueError in mode "auto" when the configs differ.
    """
    if mode not in MODES:
      raise ValueError(f"run mode {mode!r} is invalid; allowed: {list(MODES)}")
    path = os.path.join(self.path, IDENTITY)
    previous = self._read(path)
    status = "new"
    if previous:
      if previous.get("config_hash") == config_hash:
        status = "same"
      elif mode == "auto":
        old, new = _flatten(previous.get("config", {})), _flatten(json.loads(config_json))
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:6])
        more = f" and {len(differ) - 6} more" if len(differ) > 6 else ""
        raise ValueError(
          f"{self.path} holds a run with another config ({shown}{more}); pass --resume to "
          "continue it with this config, or --new_run to start afresh (the old run is moved "
          "aside, not deleted), or choose another config.output_dir"
        )
      else:
        status = "changed"
    return status

  def record_identity(self, config_hash: str, config_json: str) -> None:
    """Writes run.json (atomically), keeping the hashes of earlier configs of this run."""
    path = os.path.join(self.path, IDENTITY)
    previous = self._read(path)
    if jax.process_index() == 0:
      os.makedirs(self.path, exist_ok=True)
      record = {"config_hash": config_hash, "config": json.loads(config_json)}
      if previous.get("config_hash") not in (None, config_hash):
        record["previous_config_hashes"] = previous.get("previous_config_hashes", []) + [
          previous["config_hash"]
        ]
      write_json_atomic(path, record, indent=2)


def run_identity(config) -> dict:
  """What a checkpoint records of the run that wrote it (the model config is added once the
  student is built)."""
  from jdistill import __version__
  from jdistill import config as config_lib

  return {
    "config_hash": config_lib.config_hash(config),
    "seed": config.seed,
    "jdistill_version": __version__,
  }


def open_run_dir(config, identity: dict) -> RunDir:
  """Takes `config.output_dir`'s lock and checks the run there is this one; with
  `run_mode="new"` the old run (and an outside checkpoint directory) is moved aside first.
  Every stage opens its directory here."""
  run_dir = RunDir(config.output_dir)
  run_dir.acquire()
  if config.run_mode == "new":
    run_dir.release()
    # the output directory first: a checkpoint directory inside it moves along
    here = os.path.abspath(".")
    for path in (os.path.abspath(config.output_dir), os.path.abspath(config.checkpoint.dir or ".")):
      if path != here and os.path.isdir(path) and os.listdir(path):
        log.info("--new_run: moved the previous run aside to %s", set_aside(path, "previous"))
    run_dir.acquire()
  run_dir.check_identity(identity["config_hash"], config.to_json_best_effort(), config.run_mode)
  return run_dir

"""Orbax checkpoints of a run: student params, optimizer state, step, RNG, data-iterator state.

Layout of `<dir>/<step>/`: `params` and `opt_state` (sharded arrays; restored
onto whatever mesh the abstract target carries, so a run may resume on another
mesh shape), `meta` (JSON: step, RNG key data, data-iterator state), `pending` (host
arrays a stage computed ahead of the next step, e.g. OPD's batches sampled ahead under
`rollout.staleness`; only when there are some, described in `meta["pending"]`) and, in the
root, `model_config.json` so a checkpoint can also be loaded as a teacher.
Orbax writes each step to a temporary directory and renames it when complete
(atomic); an existing step is never overwritten.

Verified: `meta` also holds a checksum of every array (`tree_checksums`: computed on the
devices, so sharded and multi-host arrays need no gathering) and the run's identity
(config hash, model config, seed, jdistill version). `restore_verified` recomputes the
checksums after loading; a step that fails (flipped bits, truncated or deleted files) is
named in one line, set aside (renamed `<step>.corrupt-<time>`, never deleted) and the
newest step that verifies is used instead.

A full or unwritable disk: a save that fails (in orbax's background thread or not) raises
`io.WriteFailed` naming the file, at the save or at the next `save`/`wait`; orbax's own
traceback of it is not logged (the command line prints the one line). The step never commits
(orbax leaves its temporary directory, which the next save of that step replaces), so the last
committed step stays as it was and a rerun resumes from it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jdistill.models import ModelConfig, Transformer
from jdistill.models.transformer import stack_layers, unstack_layers
from jdistill.runtime import sharding as shd
from jdistill.runtime.io import is_disk_error, write_json_atomic, writing

log = logging.getLogger("jdistill")

MODEL_CONFIG = "model_config.json"
# Fields that may differ between a checkpoint and the model it is restored into (`remat`:
# the bool that `remat_policy` replaced, still in older model_config.json files).
_NON_ARCHITECTURE = ("param_dtype", "dtype", "remat", "remat_policy", "scan_layers")


def _scanned_state(layers) -> bool:
  """Whether a state's `layers` are scanned: `layers.block` (uniform) or `layers.<run>.block`
  (a hybrid's runs, `jdistill.models.layer_runs`)."""
  return "block" in layers or any("block" in layers[k] for k in layers if isinstance(k, int))


def saved_scan_layers(fields: dict) -> bool:
  """The layer layout of a saved `model_config.json` (files older than `scan_layers`: unrolled)."""
  return bool(fields.get("scan_layers") or False)


def _layout_error(directory: str, saved: bool) -> ValueError:
  return ValueError(
    f"{directory} holds checkpoints of a model with scan_layers={saved} (layer parameters "
    f"{'stacked on a leading layers axis' if saved else 'one per layer'}), this model has "
    f"scan_layers={not saved}; set config.student.scan_layers={saved} to resume them, or use "
    "another config.checkpoint.dir"
  )


class CorruptCheckpoint(Exception):
  """A checkpoint step that cannot be restored as saved; the message is one line."""


def _bits_checksum(x) -> jax.Array:
  """uint32 checksum of an array's bits: Σ_i bits_i · m_i mod 2^32 with odd multipliers m_i,
  so flipping any single bit changes it."""
  itemsize = x.dtype.itemsize
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif itemsize == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif itemsize == 2:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  elif itemsize == 1:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  else:  # 8-byte types: both halves
    halves = jax.lax.bitcast_convert_type(x, jnp.uint32)
    bits = halves[..., 0] ^ (halves[..., 1] * jnp.uint32(0x9E3779B9))
  flat = bits.reshape(-1)
  multipliers = (jnp.arange(flat.size, dtype=jnp.uint32) * jnp.uint32(2654435761)) | 1
  return jnp.sum(flat * multipliers, dtype=jnp.uint32)


@jax.jit
def _checksums(tree):
  return jax.tree.map(_bits_checksum, tree)


def tree_checksums(tree) -> dict[str, int]:
  """`{leaf path: uint32 checksum}` of a pytree of arrays."""
  sums = jax.device_get(_checksums(tree))
  return {
    jax.tree_util.keystr(path): int(v) for path, v in jax.tree_util.tree_leaves_with_path(sums)
  }


class _QuietDiskErrors(logging.Filter):
  """Drops orbax's logged tracebacks of a disk error in its save threads: `Checkpointer`
  re-raises that error as one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not is_disk_error(error)


_QUIET = _QuietDiskErrors()


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with jdistill's items."""

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
    for name in ("absl", "orbax"):
      if _QUIET not in logging.getLogger(name).filters:
        logging.getLogger(name).addFilter(_QUIET)
    self.directory = os.path.abspath(directory)
    self.every = every
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, create=True
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def write_model_config(self, cfg: ModelConfig) -> None:
    """Writes the model config beside the steps, or refuses, before writing anything, a model
    whose architecture differs from the one already there."""
    path = os.path.join(self.directory, MODEL_CONFIG)
    new = dataclasses.asdict(cfg)
    if os.path.exists(path):
      with open(path) as f:
        saved = json.load(f)
      if saved_scan_layers(saved) != cfg.scan_layers:
        raise _layout_error(self.directory, saved_scan_layers(saved))
      differ = sorted(
        k
        for k in set(saved) | set(new)
        if k not in _NON_ARCHITECTURE and _jsonable(saved.get(k)) != _jsonable(new.get(k))
      )
      if differ:
        detail = ", ".join(f"{k}: {saved.get(k)!r} there, {new.get(k)!r} here" for k in differ)
        raise ValueError(
          f"{self.directory} holds checkpoints of another architecture ({detail}); "
          "nothing was written — use another config.checkpoint.dir"
        )
      return
    if jax.process_index() == 0:  # atomically: the other processes may be reading it already
      write_json_atomic(path, new, indent=2)

  def reload(self) -> None:
    """Re-reads the steps on disk (after steps were set aside)."""
    self.manager.reload()

  def set_aside(self, step: int, why: str) -> str:
    """Renames step `step` to `<step>.<why>-<UTC time>` (never deletes it); returns the name."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.{why}-{stamp}"
    if jax.process_index() == 0 and os.path.exists(src):
      os.rename(src, dst)
    return dst

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(
    self, step: int, params, opt_state, meta: dict, *, pending=None, force: bool = False
  ) -> bool:
    """Saves if `step` is on the save interval (or `force`); never overwrites a step.
    `pending`: a pytree of host arrays saved as the `pending` item (None or empty: none)."""
    if (step % self.every and not force) or step in self.manager.all_steps():
      return False
    items = dict(
      params=ocp.args.StandardSave(params),
      opt_state=ocp.args.StandardSave(opt_state),
      meta=ocp.args.JsonSave(meta),
    )
    if pending:
      items["pending"] = ocp.args.StandardSave(pending)
    with writing(os.path.join(self.directory, str(step))):
      return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_params, abstract_opt_state, pending=None):
    """(params, opt_state, meta, pending) at `step`, placed as the abstract targets' shardings
    say; `pending`: the target of the `pending` item (host arrays), None: not read."""
    items = dict(
      params=ocp.args.StandardRestore(abstract_params),
      opt_state=ocp.args.StandardRestore(abstract_opt_state),
      meta=ocp.args.JsonRestore(),
    )
    if pending:
      items["pending"] = ocp.args.StandardRestore(pending)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["params"], out["opt_state"], out["meta"], out.get("pending") if pending else None

  def saved_meta(self, step: int) -> dict:
    """The `meta` item of `step` alone (JSON)."""
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self) -> None:
    """Waits for the save in flight to commit (`io.WriteFailed` if it failed)."""
    with writing(self.directory):
      self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def latest_step(path: str) -> int | None:
  """The newest step of a checkpoint directory."""
  manager = ocp.CheckpointManager(os.path.abspath(path))
  step = manager.latest_step()
  manager.close()
  return step


def is_checkpoint_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, MODEL_CONFIG))


def load_model_from_checkpoint(
  path: str,
  mesh,
  rules=shd.DEFAULT_RULES,
  *,
  param_dtype=None,
  dtype=None,
  scan_layers: bool | None = None,
  remat_policy: str = "none",
  step: int | None = None,
) -> Transformer:
  """A Transformer from a jdistill checkpoint directory (params only), e.g. as a teacher.

  The params are restored in the layout they were saved in and converted (stacked or
  unstacked) when `scan_layers` (None: auto by depth) asks for the other one."""
  with open(os.path.join(path, MODEL_CONFIG)) as f:
    fields = json.load(f)
  if fields.get("rope_scaling") is not None:
    fields["rope_scaling"] = tuple(tuple(kv) for kv in fields["rope_scaling"])
  # JSON lists; ModelConfig holds tuples
  for name in ("mlp_only_layers", "layer_types", "time_step_limit"):
    if isinstance(fields.get(name), list):
      fields[name] = tuple(fields[name])
  fields.pop("remat", None)
  fields["scan_layers"] = saved_scan_layers(fields)
  saved_cfg = ModelConfig(**fields).replace(
    param_dtype=param_dtype or fields["param_dtype"],
    dtype=dtype or fields["dtype"],
    remat_policy=remat_policy,
  )
  cfg = saved_cfg.replace(scan_layers=scan_layers)  # None is resolved again, by depth
  manager = ocp.CheckpointManager(os.path.abspath(path))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{path}: no checkpoint steps")
  # orbax casts to the abstract target's dtype (e.g. an f32 student saved, a bf16 teacher loaded)
  graphdef, abstract = shd.abstract_sharded_state(
    lambda: Transformer(saved_cfg, nnx.Rngs(0)), mesh, rules
  )
  params = manager.restore(
    step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract))
  )["params"]
  manager.close()
  if cfg.scan_layers == saved_cfg.scan_layers:
    return nnx.merge(graphdef, params)
  params = stack_layers(params, cfg) if cfg.scan_layers else unstack_layers(params, saved_cfg)
  graphdef, target = shd.abstract_sharded_state(lambda: Transformer(cfg, nnx.Rngs(0)), mesh, rules)
  placed = jax.tree.map(
    lambda v, t: v.replace(jax.device_put(v.get_value(), t.get_value().sharding)),
    params,
    target,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  return nnx.merge(graphdef, placed)


def _jsonable(value):
  return json.loads(json.dumps(value))


def _is_spec(x) -> bool:
  return isinstance(x, dict) and set(x) == {"shape", "dtype"}


def save_train_state(
  checkpointer: Checkpointer,
  step: int,
  state: dict,
  *,
  rng,
  data_state: dict,
  identity: dict,
  pending: tuple[dict, dict] | None = None,
  force: bool = False,
) -> bool:
  """Saves a stage's `{"params", "opt_state", "step"}` (at host `step`) with its RNG key,
  data-iterator position, the arrays' checksums and the run's `identity` (config hash,
  model config, seed, version), on the save interval or when `force`d.

  `pending`: `(arrays, description)`, what the stage computed ahead of step `step` — a pytree
  (nested dicts) of host arrays and JSON — saved, checksummed, and given back by
  `restore_train_state` as `meta["pending"]`; None: nothing pending (saved as such)."""
  if (step % checkpointer.every and not force) or step in checkpointer.all_steps():
    return False
  arrays, description = pending if pending is not None else ({}, {})
  arrays = jax.tree.map(np.asarray, arrays)
  meta = {
    "step": step,
    "rng": np.asarray(jax.random.key_data(rng)).tolist(),
    "data": data_state,
    "identity": _jsonable(identity),
    "checksums": {
      "params": tree_checksums(state["params"]),
      "opt_state": tree_checksums(state["opt_state"]),
      "pending": tree_checksums(arrays),
    },
    "pending": {
      "description": _jsonable(description),
      "arrays": jax.tree.map(lambda a: {"shape": list(a.shape), "dtype": a.dtype.name}, arrays),
    },
  }
  return checkpointer.save(
    step, state["params"], state["opt_state"], meta, pending=arrays, force=force
  )


def _restore_step(checkpointer: Checkpointer, state: dict, step: int):
  """Loads step `step` like `state` and verifies it → `(state, rng, data_state, meta)`, with
  `meta["pending"]` = `{"description", "arrays"}` (host arrays) as `save_train_state` got them
  (absent: a checkpoint older than pending state); raises CorruptCheckpoint with a one-line
  reason."""
  try:
    saved_pending = checkpointer.saved_meta(step).get("pending")
    target = None
    if saved_pending is not None:
      target = jax.tree.map(
        lambda s: np.zeros(s["shape"], s["dtype"]), saved_pending["arrays"], is_leaf=_is_spec
      )
    params, opt_state, meta, pending = checkpointer.restore(
      step, abstract_like(state["params"]), abstract_like(state["opt_state"]), target
    )
  except Exception as e:  # orbax's errors for truncated or missing files run to many lines
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    reason = f"{type(e).__name__}: {first[:200]}"
    raise CorruptCheckpoint(f"step {step}: cannot be read ({reason})") from None
  saved = meta.get("checksums")
  if saved is None:
    raise CorruptCheckpoint(f"step {step}: has no checksums (written by an older jdistill)")
  trees = {"params": params, "opt_state": opt_state}
  if "pending" in meta:
    trees["pending"] = pending or {}
  for item, tree in trees.items():
    got = tree_checksums(tree)
    if set(got) != set(saved.get(item, {})):
      raise CorruptCheckpoint(f"step {step}: {item} holds other arrays than its checksums name")
    for path, want in saved[item].items():
      if got.get(path) != want:
        raise CorruptCheckpoint(
          f"step {step}: {item}{path} does not match its checksum (saved {want}, read "
          f"{got.get(path)})"
        )
  if "pending" in meta:
    meta["pending"] = {"description": meta["pending"]["description"], "arrays": pending or {}}
  restored_step = jax.device_put(jnp.asarray(meta["step"], jnp.int32), state["step"].sharding)
  rng = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))
  new_state = {"params": params, "opt_state": opt_state, "step": restored_step}
  return new_state, rng, meta["data"], meta


def restore_train_state(checkpointer: Checkpointer, state: dict, step: int | None = None):
  """The newest verified train state → `(state, rng, data_state, meta)`, or None when the
  directory has no steps.

  Without `step`: the latest step that verifies; each newer step that does not is named in
  a one-line warning and set aside (renamed, never deleted), so the run can write it again.
  With `step`: exactly that step (a CorruptCheckpoint if it does not verify), and the
  steps after it are set aside, so the run branches from it.
  """
  config_file = os.path.join(checkpointer.directory, MODEL_CONFIG)
  if os.path.exists(config_file):
    # a tree of the other layout fails in orbax like a corrupt step, which would be set aside
    with open(config_file) as f:
      saved = saved_scan_layers(json.load(f))
    if saved != _scanned_state(state["params"]["layers"]):
      raise _layout_error(checkpointer.directory, saved)
  steps = sorted(checkpointer.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(
        f"config.checkpoint.restore_step={step}: no such step in {checkpointer.directory} "
        f"(steps: {sorted(steps)})"
      )
    restored = _restore_step(checkpointer, state, step)
    for newer in (s for s in steps if s > step):
      moved = checkpointer.set_aside(newer, "after-restore-step")
      log.info("set aside checkpoint step %d (restoring step %d): %s", newer, step, moved)
    checkpointer.reload()
    return restored
  for candidate in steps:
    try:
      restored = _restore_step(checkpointer, state, candidate)
    except CorruptCheckpoint as e:
      moved = checkpointer.set_aside(candidate, "corrupt")
      log.warning("checkpoint %s; set aside as %s", e, moved)
      continue
    checkpointer.reload()
    return restored
  if steps:
    checkpointer.reload()
    raise CorruptCheckpoint(f"no checkpoint step in {checkpointer.directory} verifies")
  return None

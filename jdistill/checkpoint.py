"""Orbax checkpoints of a run: student params, optimizer state, step, RNG, data-iterator state.

Layout of `<dir>/<step>/`: `params` and `opt_state` (sharded arrays; restored
onto whatever mesh the abstract target carries, so a run may resume on another
mesh shape), `meta` (JSON: step, RNG key data, data-iterator state) and, in the
root, `model_config.json` so a checkpoint can also be loaded as a teacher.
Orbax writes each step to a temporary directory and renames it when complete
(atomic); an existing step is never overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jdistill import sharding as shd
from jdistill.models import ModelConfig, Transformer

MODEL_CONFIG = "model_config.json"


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with jdistill's items."""

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.every = every
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, create=True
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def write_model_config(self, cfg: ModelConfig) -> None:
    if jax.process_index() == 0:
      with open(os.path.join(self.directory, MODEL_CONFIG), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, params, opt_state, meta: dict, *, force: bool = False) -> bool:
    """Saves if `step` is on the save interval (or `force`); never overwrites a step."""
    if (step % self.every and not force) or step in self.manager.all_steps():
      return False
    return self.manager.save(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta),
      ),
      force=True,
    )

  def restore(self, step: int, abstract_params, abstract_opt_state):
    """(params, opt_state, meta) at `step`, placed as the abstract targets' shardings say."""
    out = self.manager.restore(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        opt_state=ocp.args.StandardRestore(abstract_opt_state),
        meta=ocp.args.JsonRestore(),
      ),
    )
    return out["params"], out["opt_state"], out["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def is_checkpoint_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, MODEL_CONFIG))


def load_model_from_checkpoint(
  path: str,
  mesh,
  rules=shd.DEFAULT_RULES,
  *,
  param_dtype=None,
  dtype=None,
  remat: bool = False,
  step: int | None = None,
) -> Transformer:
  """A Transformer from a jdistill checkpoint directory (params only), e.g. as a teacher."""
  with open(os.path.join(path, MODEL_CONFIG)) as f:
    fields = json.load(f)
  if fields.get("rope_scaling") is not None:
    fields["rope_scaling"] = tuple(tuple(kv) for kv in fields["rope_scaling"])
  cfg = ModelConfig(**fields)
  cfg = cfg.replace(
    param_dtype=param_dtype or cfg.param_dtype, dtype=dtype or cfg.dtype, remat=remat
  )
  manager = ocp.CheckpointManager(os.path.abspath(path))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{path}: no checkpoint steps")
  # orbax casts to the abstract target's dtype (e.g. an f32 student saved, a bf16 teacher loaded)
  graphdef, abstract = shd.abstract_sharded_state(
    lambda: Transformer(cfg, nnx.Rngs(0)), mesh, rules
  )
  params = manager.restore(
    step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract))
  )["params"]
  manager.close()
  return nnx.merge(graphdef, params)


def save_train_state(
  checkpointer: Checkpointer,
  step: int,
  state: dict,
  *,
  rng,
  data_state: dict,
  seed: int,
  force: bool = False,
) -> bool:
  """Saves a stage's `{"params", "opt_state", "step"}` (at host `step`) with its RNG key
  and data-iterator position, on the save interval or when `force`d."""
  meta = {
    "step": step,
    "rng": np.asarray(jax.random.key_data(rng)).tolist(),
    "data": data_state,
    "seed": seed,
  }
  return checkpointer.save(step, state["params"], state["opt_state"], meta, force=force)


def restore_train_state(checkpointer: Checkpointer, state: dict, step: int | None = None):
  """The saved train state at `step` (default: the latest) placed like `state` →
  `(state, rng, data_state)`, or None when there is nothing to restore."""
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    return None
  params, opt_state, meta = checkpointer.restore(
    step, abstract_like(state["params"]), abstract_like(state["opt_state"])
  )
  restored_step = jax.device_put(
    jax.numpy.asarray(meta["step"], jax.numpy.int32), state["step"].sharding
  )
  rng = jax.random.wrap_key_data(jax.numpy.asarray(meta["rng"], jax.numpy.uint32))
  return {"params": params, "opt_state": opt_state, "step": restored_step}, rng, meta["data"]

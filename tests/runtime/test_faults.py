"""Faults that read cleanly: a checkpoint whose arrays hold other, well-formed values."""

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.runtime import checkpoint as ckpt


def _state(seed: int) -> dict:
  """A tiny train state `{"params", "opt_state", "step"}` whose arrays depend on `seed`."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
    "params": {"w": jax.random.normal(k1, (4, 3)), "b": jnp.full((3,), float(seed))},
    "opt_state": {"mu": jax.random.normal(k2, (4, 3))},
    "step": jnp.asarray(0, jnp.int32),
  }


def _save(directory, step: int, state: dict) -> None:
  checkpointer = ckpt.Checkpointer(str(directory), every=1, keep=5, async_save=False)
  ckpt.save_train_state(
    checkpointer,
    step,
    state,
    rng=jax.random.key(step),
    data_state={"next_index": step},
    identity={"seed": 0},
  )
  checkpointer.close()


@pytest.mark.parametrize("damage", ["other_arrays", "edited_checksum"])
def test_a_step_that_reads_cleanly_with_other_values_is_set_aside(tmp_path, damage, caplog):
  directory = tmp_path / "ckpt"
  _save(directory, 2, _state(2))
  _save(directory, 4, _state(4))
  if damage == "other_arrays":  # a copy gone wrong: step 4's params are another run's
    _save(tmp_path / "other", 4, _state(7))
    shutil.rmtree(directory / "4" / "params")
    shutil.copytree(tmp_path / "other" / "4" / "params", directory / "4" / "params")
  else:  # the arrays are intact, the stored checksum of one is not
    meta_file = directory / "4" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["checksums"]["params"]["['b']"] ^= 1
    meta_file.write_text(json.dumps(meta))

  checkpointer = ckpt.Checkpointer(str(directory), every=1, keep=5, async_save=False)
  with caplog.at_level(logging.WARNING, logger="jdistill"):
    state, _, data_state, _ = ckpt.restore_train_state(checkpointer, _state(0))
  checkpointer.close()

  assert int(state["step"]) == 2 and data_state == {"next_index": 2}  # the fallback
  want = jax.tree.map(np.asarray, _state(2))
  jax.tree.map(np.testing.assert_array_equal, want["params"], jax.device_get(state["params"]))
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 1, warnings
  assert "step 4: params['b'] does not match its checksum" in warnings[0]
  assert "set aside" in warnings[0] and "\n" not in warnings[0]
  names = os.listdir(directory)
  assert "4" not in names and any(n.startswith("4.corrupt-") for n in names)

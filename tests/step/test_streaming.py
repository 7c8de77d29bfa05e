"""Streamed teachers (params in host memory, one teacher on the mesh at a time) against
resident ones: same loss, gradients and params, on a 2x2x2 mesh."""

import functools
import gc

import jax
import numpy as np
import pytest

from jdistill import config as config_lib
from jdistill.stages import opd as train
from jdistill.step import common, streaming
from jdistill.step import opd as ts
from jdistill.testing.toy import short_run_config, tiny_config

STEPS = 3


def _trainer(world, tmp_path, placement: str) -> train.OPDTrainer:
  c = short_run_config(world, tmp_path / placement, steps=STEPS)
  c.mesh.update(dict(data=2, fsdp=2, tensor=2))
  c.optimizer.eps = 1e-2  # bounds |d update / d grad| by lr / eps (see test_train's 1 vs 8)
  for name in c.teachers:
    # f32 teachers with an f32 cache: the streamed forward is the resident one compiled in
    # another program, so only f32 rounding and reduction order may differ.
    c.teachers[name].placement = placement
    c.teachers[name].param_dtype = "float32"
    c.teachers[name].hidden_dtype = "float32"
  return train.OPDTrainer(c)


def _device_bytes() -> int:
  gc.collect()  # arrays dropped while loading must not count
  return sum(x.nbytes for x in jax.live_arrays() if x.sharding.memory_kind in (None, "device"))


@pytest.fixture(scope="module")
def trainers(small_world, tmp_path_factory):
  """A resident and a streamed trainer on the small toy world (one layer: every program of
  this file compiles twice, once per placement, and the comparison holds at any size)."""
  tmp = tmp_path_factory.mktemp("runs")
  before = _device_bytes()
  resident = _trainer(small_world, tmp, "resident")
  resident_bytes = _device_bytes() - before
  before = _device_bytes()
  streamed = _trainer(small_world, tmp, "streamed")
  streamed_bytes = _device_bytes() - before
  return resident, streamed, resident_bytes, streamed_bytes


def test_streamed_teachers_live_in_host_memory_and_free_the_devices(trainers):
  resident, streamed, resident_bytes, streamed_bytes = trainers
  assert streamed.teachers.states == () and streamed.teachers.groups == ()
  assert [t.index for t in streamed.teachers.streamed] == [0, 1]
  for t in streamed.teachers.streamed:
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(t.host_state)}
    assert kinds == {"pinned_host"}
    assert t.unembed.sharding.memory_kind == "device"
  teacher_bytes = sum(x.nbytes for x in jax.tree.leaves(resident.teachers.states))
  unembed_bytes = sum(t.unembed.nbytes for t in streamed.teachers.streamed)
  # what the streamed trainer keeps on the devices: the resident one's minus the teachers'
  # params plus their unembeddings
  assert resident_bytes - streamed_bytes == teacher_bytes - unembed_bytes


def test_streamed_equals_resident_in_loss_gradients_and_params_after_three_steps(trainers):
  resident, streamed, _, _ = trainers
  assert jax.device_count() == 8
  structure = dict(student_graphdef=resident.graphdef, specs=resident.teachers.specs)

  def grads(trainer):
    """The objective's gradient for `trainer`'s teachers, jitted once for all steps (the
    batch an argument: a batch closed over would be a new program each step)."""
    fn = functools.partial(
      ts.distill_objective,
      teacher_graphdefs=trainer.teachers.graphdefs,
      groups=trainer.teachers.groups,
      **structure,
    )
    return jax.jit(
      jax.grad(lambda p, s, b, c: fn(p, teacher_states=s, batch=b, teacher_cache=c)[0])
    )

  grads_resident, grads_streamed = grads(resident), grads(streamed)
  for step in range(STEPS):
    batch = resident.rollouts(next(resident.data_iter), resident.rollout_key(step))
    next(streamed.data_iter)
    cache = streamed.teacher_cache(batch)
    assert sorted(cache) == [0, 1]
    for i, (hidden, unembed) in cache.items():
      rows = len(resident.teachers.specs[i].rows)
      assert hidden.shape == (rows, batch["tokens"].shape[1] - 1, unembed.shape[0])
      assert hidden.dtype == np.float32

    g_resident = grads_resident(resident.params, resident.teachers.states, batch, {})
    g_streamed = grads_streamed(streamed.params, streamed.teachers.states, batch, cache)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g_resident))
    assert scale > 1e-3  # the comparison below is not between two zero gradients
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale),
      g_resident,
      g_streamed,
    )

    on = jax.numpy.asarray(True)
    resident.state, m_r = resident.train_step(
      resident.state, resident.teachers.states, {}, batch, on
    )
    streamed.state, m_s = streamed.train_step(streamed.state, (), cache, batch, on)
    np.testing.assert_allclose(float(m_s["loss"]), float(m_r["loss"]), rtol=1e-5)
    for name in resident.teachers.names:
      for key in ("loss", "reverse_kl"):
        np.testing.assert_allclose(
          float(m_s["teachers"][name][key]), float(m_r["teachers"][name][key]), rtol=1e-5
        )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6),
    resident.params,
    streamed.params,
  )
  assert resident.step == streamed.step == 0  # the loop above drove the steps directly


def test_a_bfloat16_cache_rounds_the_hidden_states_and_bad_placement_is_named(
  trainers, small_world
):
  _, streamed, _, _ = trainers
  t = streamed.teachers.streamed[0]
  batch = streamed.rollouts(next(streamed.data_iter), streamed.rollout_key(99))
  f32 = streamed.teacher_cache(batch)[0][0]
  bf16 = streaming.StreamedTeacher(
    t.index, t.graphdef, t.host_state, t.unembed, "bfloat16", t.rows
  ).forward(streamed.batch_shardings, streaming.hidden_sharding(streamed.mesh, len(t.rows)))(
    t.host_state, batch
  )
  assert bf16.dtype == np.dtype("bfloat16")
  f32, bf16 = np.asarray(f32), np.asarray(bf16, np.float32)
  np.testing.assert_allclose(bf16, f32, rtol=2**-8, atol=0)  # one bf16 rounding
  assert not np.array_equal(bf16, f32)

  # one compile for all: another teacher of the same graphdef and dtype (here the same params
  # on the other teacher's rows) runs the same program, its rows an argument
  rows = streamed.teachers.streamed[1].rows
  other = streaming.StreamedTeacher(t.index, t.graphdef, t.host_state, t.unembed, "bfloat16", rows)
  out = streaming.hidden_sharding(streamed.mesh, len(rows))
  hidden = other.forward(streamed.batch_shardings, out)(t.host_state, batch)
  program = streaming.shared_forward(
    t.graphdef, "bfloat16", streaming.host_shardings(t.host_state), streamed.batch_shardings, out
  )
  assert program._cache_size() == 1
  expected, _ = common.teacher_hidden(
    t.graphdef, t.device_state(), common.shifted_inputs(batch), rows
  )
  np.testing.assert_allclose(np.asarray(hidden, np.float32), expected, rtol=2**-8, atol=1e-6)

  c = tiny_config(small_world)
  c.teachers.math.placement = "offloaded"
  with pytest.raises(ValueError, match=r"teachers\.math\.placement.*resident.*streamed"):
    config_lib.validate(c)
  c.teachers.math.placement = "streamed"
  config_lib.validate(c)
  c.stage = "rlvr"
  with pytest.raises(ValueError, match=r"teachers\.math\.placement.*'resident' in stage"):
    config_lib.validate(c)

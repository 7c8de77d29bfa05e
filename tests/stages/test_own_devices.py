"""A teacher on devices of its own (`teachers.<name>.devices`) on 8 simulated devices: its
params only on its 2, the training mesh on the other 6, and the same losses and params as
the run with every teacher resident."""

import jax
import numpy as np
import pytest

from jdistill import config as config_lib
from jdistill.stages import opd as train
from jdistill.testing.toy import short_run_config

STEPS = 2


def _config(world, out, *, devices=0, num_devices=0):
  c = short_run_config(world, out, steps=STEPS, log_every=1, eval_every=0)
  c.num_devices = num_devices
  # 6 training devices: {data: 2, tensor: 3}, so the 8 rows split over data and the
  # all-resident reference runs the same training-mesh programs on the first 6 devices.
  c.mesh.update(dict(data=-1, fsdp=1, tensor=3))
  c.optimizer.eps = 1e-2  # bounds |d update / d grad| by lr / eps (as test_streaming)
  for name in c.teachers:
    # f32 teachers and f32 hidden states: the forward on the teacher's devices is the
    # resident one compiled in another program, so only f32 rounding may differ.
    c.teachers[name].param_dtype = "float32"
    c.teachers[name].hidden_dtype = "float32"
  c.teachers.math.devices = devices
  return c


def test_a_teacher_on_its_own_devices_equals_resident(small_world, tmp_path):
  own = train.OPDTrainer(_config(small_world, tmp_path / "own", devices=2))
  resident = train.OPDTrainer(_config(small_world, tmp_path / "resident", num_devices=6))
  devices = jax.devices()
  assert set(own.mesh.devices.flat) == set(devices[:6]) == set(resident.mesh.devices.flat)
  (math,) = own.teachers.own_devices
  assert own.teachers.names == ["code", "math"] and math.index == 1
  assert own.teachers.groups == ((0,),)  # code, resident on the training mesh
  # its params live on its 2 devices only; its unembedding alone on the training mesh
  for leaf in jax.tree.leaves(math.state):
    assert leaf.sharding.device_set == set(devices[6:])
  assert math.unembed.sharding.device_set == set(devices[:6])
  on_training = {d for s in jax.tree.leaves(own.teachers.states) for d in s.sharding.device_set}
  assert on_training == set(devices[:6])  # the resident teacher (code)
  for _ in range(STEPS):
    m_own, m_res = own.train_one(), resident.train_one()
    np.testing.assert_allclose(float(m_own["loss"]), float(m_res["loss"]), rtol=1e-5)
    for name in own.names:
      for key in ("loss", "reverse_kl"):
        np.testing.assert_allclose(
          float(m_own["teachers"][name][key]), float(m_res["teachers"][name][key]), rtol=1e-5
        )
  assert float(m_res["teachers"]["math"]["reverse_kl"]) > 0.1  # not a comparison of zeros
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6),
    resident.params,
    own.params,
  )


def test_own_devices_config_errors_name_the_field(small_world, tmp_path):
  world = small_world

  def refused(c, match, build=False):
    with pytest.raises(ValueError, match=match):
      train.OPDTrainer(c) if build else config_lib.validate(c)

  refused(_config(world, tmp_path, devices=-1), r"config.teachers.math.devices=-1.*integer >= 0")
  refused(
    _config(world, tmp_path, devices=3), r"math.devices=3.*divisor of data.slots_per_teacher=4"
  )
  c = _config(world, tmp_path, devices=2)
  c.teachers.math.placement = "streamed"
  refused(c, r"config.teachers.math.devices=2.*0 with placement 'streamed'")
  c = _config(world, tmp_path, devices=2)
  c.teachers.math.tokenizer = str(tmp_path)
  refused(c, r"config.teachers.math.devices=2.*0 with a teacher tokenizer")
  c = _config(world, tmp_path, devices=2, num_devices=4)
  c.rollout.devices = 2
  refused(c, r"config.teachers.<name>.devices=\{'math': 2\}.*rollout.devices=2.*num_devices=4")
  c = _config(world, tmp_path, devices=8)
  c.data.slots_per_teacher = 8
  refused(c, r"teachers.<name>.devices=8 with config.rollout.devices=0.*at most 7", build=True)

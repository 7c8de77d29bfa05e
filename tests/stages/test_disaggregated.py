"""Disaggregated rollouts on 8 simulated devices: the sampler on its own mesh of 4 devices,
the trainer on the other 4, batches sampled `rollout.staleness` updates behind."""

import copy
import json
import logging
import shutil

import jax
import numpy as np
import pytest

from jdistill import config as config_lib
from jdistill.stages import opd as train
from jdistill.step import common
from jdistill.testing.toy import short_run_config

STEPS_EQUAL = 3  # (a): per-step equality of k = 0 with today's loop
STEPS_STALE = 12  # (b), (c): the k = 1 run
RESTORE_AT = 6


def _config(world, out, *, steps, devices=0, staleness=1, num_devices=0):
  c = short_run_config(world, out, steps=steps, log_every=1, eval_every=0)
  c.num_devices = num_devices
  c.rollout.devices = devices
  c.rollout.staleness = staleness
  return c


def _params(trainer):
  return jax.tree.map(np.asarray, jax.device_get(trainer.params))


@pytest.fixture(scope="module")
def colocated(world, tmp_path_factory):
  """Today's loop (rollout.devices = 0) on a 4-device mesh: the same programs as the
  disaggregated trainer's training and sampler meshes, on other devices."""
  out = tmp_path_factory.mktemp("colocated")
  return train.OPDTrainer(_config(world, out, steps=STEPS_EQUAL, num_devices=4))


def test_staleness_0_equals_todays_loop_step_by_step(world, tmp_path, colocated):
  """k = 0 on a disjoint 4 + 4 split gives exactly today's losses and params.

  Reference: the colocated loop on the first 4 devices (`num_devices=4`). Both meshes are
  {data: 4} with replicated params, so the sampler and the step run the same programs on
  other devices, and the results agree bit for bit."""
  dis = train.OPDTrainer(_config(world, tmp_path, steps=STEPS_EQUAL, devices=4, staleness=0))
  train_devices = set(dis.mesh.devices.flat)
  sampler_devices = set(dis.sampler.mesh.devices.flat)
  assert train_devices == set(jax.devices()[:4]) and sampler_devices == set(jax.devices()[4:])
  assert set(colocated.mesh.devices.flat) == train_devices
  leaf = jax.tree.leaves(dis.rollout_params())[0]
  assert leaf.sharding.device_set == sampler_devices
  for _ in range(STEPS_EQUAL):
    m_ref, m_dis = colocated.train_one(), dis.train_one()
    assert m_dis["rollout_staleness"] == 0 == m_ref["rollout_staleness"]
    assert float(m_dis["loss"]) == float(m_ref["loss"])
    for name in dis.names:
      assert float(m_dis["teachers"][name]["loss"]) == float(m_ref["teachers"][name]["loss"])
    jax.tree.map(np.testing.assert_array_equal, _params(colocated), _params(dis))


@pytest.fixture(scope="module")
def stale_run(world, tmp_path_factory):
  """A k = 1 run of STEPS_STALE steps (checkpoint at RESTORE_AT), recording every sampled
  batch (with its prompts, key and the params version it used) and the params after every
  update."""
  out = tmp_path_factory.mktemp("stale")
  c = _config(world, out / "out", steps=STEPS_STALE, devices=4, staleness=1)
  c.checkpoint.dir = str(out / "ckpt")
  c.checkpoint.every = RESTORE_AT
  trainer = train.OPDTrainer(c)
  samples, params = {}, {0: _params(trainer)}
  sample, train_one = trainer.sample, trainer.train_one

  def spy_sample(prompts, rng, batcher=None, **kwargs):  # every batch training samples passes here
    batch, episodes = sample(prompts, rng, batcher, **kwargs)
    key = np.asarray(jax.random.key_data(rng)).tobytes()
    samples[key] = dict(version=trainer.step, prompts=prompts, batch=jax.device_get(batch))
    return batch, episodes

  def spy_train_one(diagnostics=True):
    metrics = train_one(diagnostics)
    params[trainer.step] = _params(trainer)
    return metrics

  trainer.sample, trainer.train_one = spy_sample, spy_train_one
  records = trainer.run()
  by_step = {
    t: samples[np.asarray(jax.random.key_data(trainer.rollout_key(t))).tobytes()]
    for t in range(STEPS_STALE)
  }
  return dict(config=c, trainer=trainer, records=records, samples=by_step, params=params)


def test_staleness_1_trains_and_logs_its_staleness(stale_run):
  records = stale_run["records"]
  assert [r["step"] for r in records] == list(range(1, STEPS_STALE + 1))
  assert [r["rollout_staleness"] for r in records] == [0.0] + [1.0] * (STEPS_STALE - 1)
  assert [s["version"] for s in stale_run["samples"].values()] == [0] + list(range(STEPS_STALE - 1))
  assert not stale_run["trainer"].pending  # nothing sampled beyond train.steps
  # The full-vocab reverse KL of the dense teacher falls within 12 steps (the sampled-token
  # one needs more steps and rows: test_train trains 40 steps of 8 rows per teacher).
  rkl = {n: np.asarray([r["teachers"][n]["reverse_kl"] for r in records]) for n in ("math", "code")}
  assert rkl["math"][-3:].mean() < 0.7 * rkl["math"][:3].mean(), rkl
  total = rkl["math"] + rkl["code"]
  assert total[-3:].mean() < 0.85 * total[:3].mean(), rkl
  # The sampled-token kernel weights by q/π with π = the sampler's (stale) policy: |log q/π|
  # is f32 noise while the batch's params equal the trained ones (step 1; step 2, since the
  # first update has learning rate 0 under warmup) and clearly non-zero once they lag.
  ratio = [r["teachers"]["code"]["abs_log_ratio_mean"] for r in records]
  assert max(ratio[:2]) < 1e-5 and min(ratio[2:]) > 1e-3, ratio


def _colocated_batch(colocated, params, prompts, key):
  """The batch today's sampler makes from `params` (host arrays) on `prompts` with `key`."""
  shardings = jax.tree.map(lambda x: x.sharding, colocated.params)
  out = colocated.sampler.generate(
    jax.device_put(params, shardings),
    (prompts["prompt_tokens"], prompts["prompt_lengths"]),
    key,
    colocated.sampling,
  )
  return jax.device_get(common.rollout_batch(out, colocated.batch_shardings))


def test_batch_of_step_t_is_sampled_from_the_params_after_update_t_minus_1(stale_run, colocated):
  trainer, samples, params = stale_run["trainer"], stale_run["samples"], stale_run["params"]
  for t in (0, 1, 2, STEPS_STALE - 1):
    got = samples[t]
    version = max(t - 1, 0)  # the first batch: the initial params
    assert got["version"] == version
    np.testing.assert_array_equal(
      got["prompts"]["prompt_tokens"], trainer.batcher.batch(t)["prompt_tokens"]
    )
    want = _colocated_batch(colocated, params[version], got["prompts"], trainer.rollout_key(t))
    jax.tree.map(np.testing.assert_array_equal, got["batch"], want)
  # the batches do differ from fresh (k = 0) ones: the check above is not vacuous
  fresh = _colocated_batch(colocated, params[2], samples[2]["prompts"], trainer.rollout_key(2))
  assert not np.array_equal(fresh["tokens"], samples[2]["batch"]["tokens"])


def _resume(stale_run, out):
  """A session restored at RESTORE_AT from the k = 1 run's checkpoint, writing to `out`."""
  c = stale_run["config"]
  c.output_dir = str(out)
  c.checkpoint.restore_step = RESTORE_AT
  c.run_mode = "resume"
  resumed = train.OPDTrainer(c)
  assert resumed.step == RESTORE_AT
  jax.tree.map(np.testing.assert_array_equal, stale_run["params"][RESTORE_AT], _params(resumed))
  return resumed


def test_resume_at_staleness_1_equals_the_uninterrupted_run(stale_run, tmp_path):
  """The checkpoint of step s keeps the batch sampled ahead for step s (from the params after
  update s − 1, which are gone): the resumed run trains on it, then samples step s + 1 from
  the params after update s, as the uninterrupted run did — its params equal, bit for bit."""
  resumed = _resume(stale_run, tmp_path / "resumed")
  assert [p.step for p in resumed.pending] == [RESTORE_AT]
  assert [p.version for p in resumed.pending] == [RESTORE_AT - 1]
  assert resumed.data_state() == {"next_index": RESTORE_AT}
  records = resumed.run(steps=2)
  assert [r["rollout_staleness"] for r in records] == [1.0, 1.0]
  for t in (RESTORE_AT + 1, RESTORE_AT + 2):
    want = stale_run["records"][t - 1]
    assert records[t - RESTORE_AT - 1]["loss"] == want["loss"], t
  jax.tree.map(np.testing.assert_array_equal, stale_run["params"][RESTORE_AT + 2], _params(resumed))


def test_a_checkpoint_without_the_batches_sampled_ahead_resamples_them_with_a_warning(
  stale_run, colocated, tmp_path, caplog
):
  """A checkpoint written before the batches sampled ahead were saved (their item and
  description removed) resumes the way a new run starts: a session restored at step s
  samples steps s .. s + k − 1 from the restored params, so the data position is exact, the
  staleness restarts at 0, and a warning says the run differs from an uninterrupted one."""
  old = tmp_path / "old"
  shutil.copytree(stale_run["config"].checkpoint.dir, old)
  step_dir = old / str(RESTORE_AT)
  shutil.rmtree(step_dir / "pending")
  meta = json.loads((step_dir / "meta" / "metadata").read_text())
  del meta["pending"], meta["checksums"]["pending"]
  (step_dir / "meta" / "metadata").write_text(json.dumps(meta))
  stale_run = dict(stale_run, config=copy.deepcopy(stale_run["config"]))
  stale_run["config"].checkpoint.dir = str(old)
  with caplog.at_level(logging.WARNING, logger="jdistill"):
    resumed = _resume(stale_run, tmp_path / "resumed")
  assert not resumed.pending
  assert f"checkpoint step {RESTORE_AT} was written before batches sampled ahead" in caplog.text
  assert resumed.data_state() == {"next_index": RESTORE_AT}
  sample, batches = resumed.sample, []
  resumed.sample = lambda p, k, b=None, **kw: (
    batches.append((p, k, *sample(p, k, b, **kw))) or batches[-1][2:]
  )
  records = resumed.run(steps=2)
  assert [r["rollout_staleness"] for r in records] == [0.0, 1.0]
  prompts, key, batch, _ = batches[0]
  assert (
    jax.random.key_data(key).tolist()
    == jax.random.key_data(resumed.rollout_key(RESTORE_AT)).tolist()
  )
  want = _colocated_batch(colocated, stale_run["params"][RESTORE_AT], prompts, key)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(batch), want)


def test_rollout_config_errors_name_the_field(world, tmp_path):
  c = _config(world, tmp_path, steps=2, devices=-1)
  with pytest.raises(ValueError, match=r"config.rollout.devices=-1.*integer >= 0"):
    config_lib.validate(c)
  c = _config(world, tmp_path, steps=2, devices=2, staleness=-1)
  with pytest.raises(ValueError, match=r"config.rollout.staleness=-1.*integer >= 0"):
    config_lib.validate(c)
  c = _config(world, tmp_path, steps=2, devices=4, num_devices=4)
  with pytest.raises(ValueError, match=r"config.rollout.devices=4.*fewer than num_devices=4"):
    config_lib.validate(c)
  c = _config(world, tmp_path, steps=2, devices=8)
  with pytest.raises(ValueError, match=r"config.rollout.devices=8.*at most 7 of the 8 devices"):
    train.OPDTrainer(c)
  c = _config(world, tmp_path, steps=2, devices=3)
  c.mesh.update(dict(data=2, fsdp=2, tensor=1))
  with pytest.raises(ValueError, match=r"config.rollout.devices=3.*5 devices left for training"):
    train.OPDTrainer(c)


def test_move_rows_copies_a_batch_between_meshes_of_other_shard_counts():
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from jdistill.runtime.sharding import make_mesh

  devices = jax.devices()
  x = np.arange(24 * 3, dtype=np.float32).reshape(24, 3)
  two = jax.device_put(x, NamedSharding(make_mesh({"data": 2}, devices[6:]), P("data")))
  for mesh in (
    make_mesh({"data": 6}, devices[:6]),
    make_mesh({"data": 2, "fsdp": 1, "tensor": 3}, devices[:6]),  # rows replicated on tensor
    make_mesh({"data": 1}, devices[:1]),
  ):
    target = NamedSharding(mesh, P("data"))
    moved = train.move_rows(two, target)
    assert moved.sharding == target
    np.testing.assert_array_equal(np.asarray(moved), x)

"""Continuous batching (`Sampler.generate_continuous`): every prompt gets the tokens and
log-probs of the static loop under the per-prompt key schedule, with fewer decode steps."""

import jax
import numpy as np
import pytest
from flax import nnx

from jdistill.models import ModelConfig, Transformer
from jdistill.runtime import sharding as shd
from jdistill.sampling import Sampler, SamplingParams

VOCAB = 64
NEW = 24
STOPS = (3, 17, 40, 41, 59)  # ~5/64 per step at T=1: rows end anywhere from 1 to NEW tokens
PROMPTS = [
  [5, 9, 12],
  [7] * 11,
  [1, 2, 4, 8, 16, 32],
  [60],
  [33, 34, 35, 36, 37, 38, 39, 42, 43],
  [21, 22],
  [50, 51, 52, 53, 54, 55, 56, 57, 58, 61, 62, 63, 0, 6],
]
GROUPS = [0, 1, 0, 0, 1, 0, 1]
SLOTS = (2, 1)  # 3 slots for 7 prompts


def _tiny(**kw):
  cfg = ModelConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    **kw,
  )
  graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(3)))
  return state, Sampler(graphdef, shd.make_mesh({"data": 1}, jax.devices()[:1]))


@pytest.fixture(scope="module")
def tiny():
  return _tiny()


def _params(**kw):
  base = dict(
    max_new_tokens=NEW,
    temperature=1.0,
    stop_token_ids=STOPS,
    prompt_buckets=(16,),
    pad_id=1,
    key_schedule="prompt",
  )
  return SamplingParams(**{**base, **kw})


def _assert_same(got, ref):
  for field in ("tokens", "prompt_lengths", "completion_lengths", "completion_mask"):
    np.testing.assert_array_equal(np.asarray(getattr(got, field)), np.asarray(getattr(ref, field)))
  for field in ("logprobs", "sampling_logprobs"):
    np.testing.assert_allclose(
      np.asarray(getattr(got, field)), np.asarray(getattr(ref, field)), atol=1e-5
    )


@pytest.mark.parametrize(
  "temperature, scan", [(1.0, False), (0.0, False), (1.0, True)], ids=["t1", "greedy", "scanned"]
)
def test_continuous_equals_static_per_prompt(tiny, temperature, scan):
  # scanned layers keep the cache as [layers, slots, ...]: a slot is a row of axis 1
  state, sampler = _tiny(scan_layers=True) if scan else tiny
  sp = _params(temperature=temperature)
  # greedy on a near-uniform random model rarely stops: per-prompt limits vary the lengths
  limits = [NEW, 2, 9, NEW, 5, 1, 13] if temperature == 0 else None
  key = jax.random.key(7)
  ref = sampler.generate(state, PROMPTS, key, sp, max_new_per_prompt=limits)
  out, stats = sampler.generate_continuous(
    state, PROMPTS, key, sp, slots_per_group=SLOTS, groups=GROUPS, max_new_per_prompt=limits
  )
  _assert_same(out, ref)
  lengths = np.asarray(ref.completion_lengths)
  assert len(set(lengths.tolist())) >= 4, f"rows should finish at different times: {lengths}"
  steps = int(stats.decode_steps)
  # slots overlap prompts: fewer steps than one prompt at a time, let alone prompts x NEW
  assert steps < lengths.sum() - len(PROMPTS) < len(PROMPTS) * NEW
  assert steps >= lengths.max() - 1
  assert int(stats.prefills) == len(PROMPTS)
  slot_group = np.repeat(np.arange(len(SLOTS)), SLOTS)
  np.testing.assert_array_equal(slot_group[np.asarray(stats.slot_of_prompt)], GROUPS)


def test_one_slot_per_prompt_runs_as_long_as_the_longest_row(tiny):
  state, sampler = tiny
  sp = _params()
  key = jax.random.key(7)
  ref = sampler.generate(state, PROMPTS, key, sp)
  wide, stats = sampler.generate_continuous(
    state, PROMPTS, key, sp, slots_per_group=(4, 3), groups=GROUPS
  )
  _assert_same(wide, ref)
  assert int(stats.decode_steps) == int(np.max(ref.completion_lengths)) - 1
  other, _ = sampler.generate_continuous(
    state, PROMPTS, jax.random.key(8), sp, slots_per_group=(4, 3), groups=GROUPS
  )
  assert not np.array_equal(np.asarray(other.tokens), np.asarray(ref.tokens))


def test_prompt_schedule_differs_from_step_schedule(tiny):
  state, sampler = tiny
  key = jax.random.key(7)
  by_prompt = sampler.generate(state, PROMPTS, key, _params())
  by_step = sampler.generate(state, PROMPTS, key, _params(key_schedule="step"))
  assert not np.array_equal(np.asarray(by_prompt.tokens), np.asarray(by_step.tokens))


def test_compiles_once_per_shape(tiny):
  state, sampler = tiny
  sampler = Sampler(sampler.graphdef, sampler.mesh)
  sp = _params()
  sampler.generate_continuous(state, PROMPTS, jax.random.key(0), sp, slots_per_group=2)
  compiled = sampler.num_compiles
  sampler.generate_continuous(
    state, PROMPTS[::-1], jax.random.key(1), _params(temperature=0.7, pad_id=2), slots_per_group=2
  )
  assert sampler.num_compiles == compiled == 1


@pytest.mark.parametrize(
  "kw,match",
  [
    (dict(params=_params(key_schedule="step")), "key_schedule='prompt'"),
    (dict(slots_per_group=0), "slots_per_group"),
    (dict(slots_per_group=(1,), groups=[0, 1, 0, 0, 1, 0, 1]), "slots_per_group"),
    (dict(groups=[0, 1]), "groups"),
    (dict(max_new_per_prompt=[0] * 7), "max_new_per_prompt"),
    (dict(max_new_per_prompt=[NEW + 1] * 7), "max_new_per_prompt"),
  ],
)
def test_bad_arguments_raise(tiny, kw, match):
  state, sampler = tiny
  kw = {"params": _params(), "slots_per_group": 2, **kw}
  with pytest.raises(ValueError, match=match):
    sampler.generate_continuous(state, PROMPTS, jax.random.key(0), **kw)


def test_sharded_slots_equal_single_device(tiny):
  state, sampler = tiny
  mesh = shd.make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
  sharded = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  sp = _params()
  ref, _ = sampler.generate_continuous(state, PROMPTS, jax.random.key(5), sp, slots_per_group=2)
  out, _ = Sampler(sampler.graphdef, mesh).generate_continuous(
    sharded, PROMPTS, jax.random.key(5), sp, slots_per_group=2
  )
  _assert_same(out, ref)


# --- training wiring (`sampling.continuous_slots`) ---------------------------------------


@pytest.fixture(scope="module")
def toy_config(world):
  from jdistill.testing.toy import tiny_config

  c = tiny_config(world)
  c.data.slots_per_teacher, c.sampling.max_new_tokens, c.loss.chunk_size = 4, 8, 8
  c.train.steps, c.optimizer.warmup_steps = 1, 1
  return c


def test_config_continuous_slots_is_validated(toy_config):
  from jdistill import config as config_lib

  c = toy_config.copy_and_resolve_references()
  for bad in (-1, 5):  # ConfigDict itself refuses non-int types
    c.sampling.continuous_slots = bad
    with pytest.raises(ValueError, match=r"config.sampling.continuous_slots=.* \[0, data"):
      config_lib.validate(c)
  c.sampling.continuous_slots = 2
  config_lib.validate(c)


def test_trainer_rollouts_with_continuous_slots(toy_config, tmp_path):
  """The step's rollouts: 2 refilling slots per teacher for its 4 rows, the static rows'
  tokens (per-prompt keys), in the train step's layout."""
  import dataclasses

  from jdistill.stages import opd as train

  c = toy_config.copy_and_resolve_references()
  c.output_dir = str(tmp_path / "out")
  c.sampling.continuous_slots = 2
  trainer = train.OPDTrainer(c)
  prompts = trainer.batcher.batch(0)
  key = jax.random.key(3)
  got = trainer.rollouts(prompts, key)
  ref = trainer.sampler.generate(
    trainer.params,
    (prompts["prompt_tokens"], prompts["prompt_lengths"]),
    key,
    dataclasses.replace(trainer.sampling, key_schedule="prompt"),
  )
  np.testing.assert_array_equal(np.asarray(got["tokens"]), np.asarray(ref.tokens))
  np.testing.assert_allclose(np.asarray(got["logprobs"]), np.asarray(ref.logprobs), atol=1e-5)
  np.testing.assert_array_equal(
    np.asarray(got["lengths"]), np.asarray(ref.prompt_lengths + ref.completion_lengths)
  )

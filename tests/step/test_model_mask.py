"""Multi-turn batches: environment tokens (`model_mask` 0) weigh nothing in the OPD and RLVR
steps (loss, gradients, overlap metrics), exactly as if zero-weighted by hand in the completion
mask, while staying context for the student and the teachers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdistill.losses import LossSettings
from jdistill.models import ModelConfig, Transformer
from jdistill.step import common
from jdistill.step import opd as ts
from jdistill.step import rlvr as step_rlvr

CFG = ModelConfig(
  vocab_size=48,
  hidden_size=32,
  intermediate_size=64,
  num_layers=1,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
)
ENV = slice(7, 10)  # an observation between two model turns: [4, 7) and [10, 13)


@pytest.fixture(scope="module")
def setup():
  graphdef, params = nnx.split(Transformer(CFG, nnx.Rngs(0)))
  t_graphdef, t_state = nnx.split(Transformer(CFG.replace(num_layers=2), nnx.Rngs(1)))
  rows = common.teacher_rows(2, 2)
  specs = (
    common.TeacherSpec("dense", LossSettings(loss="reverse_kl", chunk_size=4), 1.0, rows[0]),
    common.TeacherSpec("sampled", LossSettings(loss="sampled_token", chunk_size=4), 0.5, rows[1]),
  )
  rng = np.random.RandomState(0)
  completion = np.zeros((4, 16), np.float32)
  completion[:, 4:13] = 1
  model = completion.copy()
  model[:, ENV] = 0
  logp = np.where(model > 0, rng.uniform(-3, -0.5, (4, 16)), 0.0).astype(np.float32)
  batch = {
    "tokens": jnp.asarray(rng.randint(3, CFG.vocab_size, (4, 16)), jnp.int32),
    "completion_mask": jnp.asarray(completion),
    "model_mask": jnp.asarray(model),
    "logprobs": jnp.asarray(logp),
    "sampling_logprobs": jnp.asarray(logp),
    "lengths": jnp.full((4,), 13, jnp.int32),
    "advantages": jnp.asarray([1.0, -0.5, 0.25, -1.0]),
  }
  by_hand = {k: v for k, v in batch.items() if k != "model_mask"}
  by_hand["completion_mask"] = jnp.asarray(completion * model)
  dropped = {k: v for k, v in batch.items() if k != "model_mask"}
  structure = dict(
    student_graphdef=graphdef, teacher_graphdefs=(t_graphdef,) * 2, specs=specs, groups=None
  )
  return params, (t_state, t_state), structure, {"multi": batch, "hand": by_hand, "drop": dropped}


@pytest.fixture(scope="module")
def opd(setup):
  """batch → ((loss, metrics), grads) of the OPD objective (one jit for the module)."""
  params, t_states, structure, _ = setup

  @jax.jit
  def fn(p, batch):
    objective = functools.partial(ts.distill_objective, teacher_states=t_states, **structure)
    return jax.value_and_grad(lambda q: objective(q, batch=batch), has_aux=True)(p)

  return lambda batch: fn(params, batch)


@pytest.fixture(scope="module")
def rlvr(setup):
  """batch → ((loss, metrics), grads) of the RLVR objective (one jit for the module)."""
  params, t_states, structure, _ = setup
  settings = step_rlvr.RLSettings(chunk_size=4, clip_eps=0.2, kl_weight=0.5, dense_weight=0.3)
  s = dict(structure, groups=((0,), (1,)), reference_graphdef=structure["student_graphdef"])

  @jax.jit
  def fn(p, batch):
    objective = functools.partial(step_rlvr.rl_objective, settings=settings, **s)
    return jax.value_and_grad(lambda q: objective(q, t_states, None, batch), has_aux=True)(p)

  return lambda batch: fn(params, batch)


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("step", ["opd", "rlvr"])
def test_environment_tokens_weigh_as_zeroed_by_hand(setup, step, request):
  run = request.getfixturevalue(step)
  batches = setup[3]
  (loss, metrics), grads = run(batches["multi"])
  (hand_loss, hand_metrics), hand_grads = run(batches["hand"])
  np.testing.assert_allclose(loss, hand_loss, rtol=1e-6)
  np.testing.assert_allclose(_flat(grads), _flat(hand_grads), rtol=1e-5, atol=1e-8)
  # the overlap diagnostics and token counts too: environment tokens weigh nothing there
  np.testing.assert_allclose(_flat(metrics), _flat(hand_metrics), rtol=1e-5, atol=1e-8)
  (drop_loss, drop_metrics), drop_grads = run(batches["drop"])
  assert not np.allclose(loss, drop_loss, rtol=1e-4)
  assert not np.allclose(_flat(grads), _flat(drop_grads), rtol=1e-3)


def test_environment_tokens_stay_context(setup, opd):
  """Changing an observation token changes the loss of the model turn after it: the student
  and teachers read the observation."""
  run = opd
  batch = setup[3]["multi"]
  edited = dict(batch, tokens=batch["tokens"].at[:, ENV.start].set(1))
  (loss, _), _ = run(batch)
  (edited_loss, _), _ = run(edited)
  assert not np.allclose(loss, edited_loss, rtol=1e-4)


def test_opd_token_counts_are_model_tokens(setup, opd):
  (_, metrics), _ = opd(setup[3]["multi"])
  # 2 rows per teacher, 9 completion tokens each, 3 of them the environment's
  assert float(metrics["dense"]["tokens"]) == 2 * 6

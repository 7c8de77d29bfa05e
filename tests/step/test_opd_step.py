"""The compiled train step on its own: non-finite skip, gradient accumulation, teacher rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdistill import losses
from jdistill.losses import LossSettings
from jdistill.models import ModelConfig, Transformer
from jdistill.step import common
from jdistill.step import opd as ts

CFG = ModelConfig(
  vocab_size=48,
  hidden_size=32,
  intermediate_size=64,
  num_layers=1,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
)


@pytest.fixture(scope="module")
def setup():
  student = Transformer(CFG, nnx.Rngs(0))
  teachers = [
    Transformer(CFG.replace(model_type="qwen3", qk_norm=True), nnx.Rngs(1)),
    Transformer(CFG.replace(num_layers=2), nnx.Rngs(2)),
  ]
  graphdef, params = nnx.split(student)
  t_graphdefs, t_states = zip(*(nnx.split(t) for t in teachers))
  rows = common.teacher_rows(2, 2)
  specs = (
    common.TeacherSpec("a", LossSettings(loss="reverse_kl", chunk_size=4), 1.0, rows[0]),
    common.TeacherSpec("b", LossSettings(loss="sampled_token", chunk_size=4), 0.5, rows[1]),
  )
  rng = np.random.RandomState(0)
  mask = np.zeros((4, 12), np.float32)
  mask[:, 5:10] = 1
  batch = {
    "tokens": jnp.asarray(rng.randint(3, CFG.vocab_size, (4, 12)), jnp.int32),
    "completion_mask": jnp.asarray(mask),
    "logprobs": jnp.full((4, 12), -2.0, jnp.float32),
    "sampling_logprobs": jnp.full((4, 12), -2.0, jnp.float32),
    "lengths": jnp.full((4,), 10, jnp.int32),
  }
  return graphdef, params, t_graphdefs, t_states, specs, batch


def _step(setup, grad_accum=1):
  graphdef, params, t_graphdefs, _, specs, _ = setup
  opt, sched = common.make_optimizer(1e-2, steps=10, warmup_steps=0, grad_accum=grad_accum)
  fn = jax.jit(
    functools.partial(
      ts.train_step,
      student_graphdef=graphdef,
      teacher_graphdefs=t_graphdefs,
      specs=specs,
      optimizer=opt,
      schedule=sched,
    )
  )
  state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32)}
  return fn, state


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_loss_is_the_weighted_sum_of_per_teacher_kernels(setup):
  graphdef, params, t_graphdefs, t_states, specs, batch = setup
  loss, metrics = ts.distill_objective(params, graphdef, t_graphdefs, t_states, batch, specs)
  np.testing.assert_allclose(loss, metrics["a"]["loss"] + 0.5 * metrics["b"]["loss"], rtol=1e-6)
  # teacher a's loss recomputed by hand from full logits on its rows
  student = nnx.merge(graphdef, params)
  teacher = nnx.merge(t_graphdefs[0], t_states[0])
  x = common.shifted_inputs(batch)
  s_logits = student.forward_logits(x["inputs"], x["positions"], x["kv_mask"])[:2]
  t_logits = teacher.forward_logits(x["inputs"], x["positions"], x["kv_mask"])[:2]
  ref = losses.masked_mean(losses.reverse_kl_per_token(s_logits, t_logits), x["mask"][:2])
  np.testing.assert_allclose(metrics["a"]["loss"], ref, rtol=1e-5)
  assert float(metrics["b"]["tokens"]) == 10.0


def test_nonfinite_loss_skips_the_update(setup):
  fn, state = _step(setup)
  _, _, _, t_states, _, batch = setup
  poisoned = jax.tree.map(lambda x: x * jnp.nan, t_states[1])
  before = _leaves(state["params"])
  new_state, metrics = fn(state, (t_states[0], poisoned), batch)
  assert float(metrics["finite"]) == 0.0
  for a, b in zip(before, _leaves(new_state["params"])):
    np.testing.assert_array_equal(a, b)
  assert int(new_state["step"]) == 1
  fine_state, metrics = fn(new_state, t_states, batch)
  assert float(metrics["finite"]) == 1.0
  assert any(not np.array_equal(a, b) for a, b in zip(before, _leaves(fine_state["params"])))


def test_gradient_accumulation_applies_every_k_calls(setup):
  fn, state = _step(setup, grad_accum=2)
  _, _, _, t_states, _, batch = setup
  before = _leaves(state["params"])
  state, _ = fn(state, t_states, batch)
  assert all(np.array_equal(a, b) for a, b in zip(before, _leaves(state["params"])))
  state, _ = fn(state, t_states, batch)
  assert any(not np.array_equal(a, b) for a, b in zip(before, _leaves(state["params"])))


def test_teacher_rows_are_process_major():
  assert common.teacher_rows(2, 4) == [(0, 1, 2, 3), (4, 5, 6, 7)]
  # 2 processes each hold 2 slots of both teachers: [p0:t0 t0 t1 t1 | p1:t0 t0 t1 t1]
  assert common.teacher_rows(2, 4, process_count=2) == [(0, 1, 4, 5), (2, 3, 6, 7)]


def test_stacked_same_architecture_teachers_equal_the_loop():
  from jdistill.runtime import sharding as shd
  from jdistill.runtime.build import group_by_architecture, stack_states

  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  student = shd.create_sharded(lambda: Transformer(CFG, nnx.Rngs(0)), mesh)
  qwen = CFG.replace(model_type="qwen3", qk_norm=True)
  teachers = [
    shd.create_sharded(lambda c=c, s=s: Transformer(c, nnx.Rngs(s)), mesh)
    for c, s in ((CFG, 1), (qwen, 2), (CFG, 3))
  ]
  graphdef, params = nnx.split(student)
  t_graphdefs, t_states = zip(*(nnx.split(t) for t in teachers))
  groups = group_by_architecture(t_graphdefs)
  assert groups == ((0, 2), (1,))
  stacked = stack_states([t_states[0], t_states[2]])
  q = stacked["layers"][0]["attn"]["q_proj"].get_value()
  assert q.shape == (2, 32, 2, 16) and q.sharding.spec == jax.sharding.PartitionSpec(
    None, "fsdp", "tensor", None
  )
  rows = common.teacher_rows(3, 2)
  specs = tuple(
    common.TeacherSpec(n, LossSettings(loss=loss, chunk_size=4), 1.0, r)
    for n, loss, r in zip("abc", ("reverse_kl", "sampled_token", "jsd"), rows)
  )
  rng = np.random.RandomState(1)
  batch = {
    "tokens": jnp.asarray(rng.randint(3, CFG.vocab_size, (6, 10)), jnp.int32),
    "completion_mask": jnp.asarray(np.pad(np.ones((6, 5)), ((0, 0), (4, 1))), jnp.float32),
    "logprobs": jnp.full((6, 10), -2.0),
    "sampling_logprobs": jnp.full((6, 10), -2.0),
    "lengths": jnp.full((6,), 9, jnp.int32),
  }
  objective = jax.jit(ts.distill_objective, static_argnums=(1, 2, 5, 6))
  loop = objective(params, graphdef, t_graphdefs, t_states, batch, specs, None)
  vmapped = objective(
    params,
    graphdef,
    (t_graphdefs[0], t_graphdefs[1]),
    (stacked, t_states[1]),
    batch,
    specs,
    groups,
  )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), loop, vmapped)


def test_diagnostics_only_when_asked_with_one_compile_and_the_same_update(setup):
  graphdef, params, t_graphdefs, t_states, specs, batch = setup
  opt, sched = common.make_optimizer(1e-2, steps=10, warmup_steps=0)
  step = jax.jit(
    lambda state, teachers, batch, diagnostics: ts.train_step(
      state,
      teachers,
      batch,
      student_graphdef=graphdef,
      teacher_graphdefs=t_graphdefs,
      specs=specs,
      optimizer=opt,
      schedule=sched,
      diagnostics=diagnostics,
    )
  )
  state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32)}
  with_diag, m_on = step(state, t_states, batch, jnp.asarray(True))
  without, m_off = step(state, t_states, batch, jnp.asarray(False))
  assert step._cache_size() == 1  # one compile serves logging and other steps
  np.testing.assert_allclose(float(m_off["loss"]), float(m_on["loss"]), rtol=1e-6)
  for a, b in zip(_leaves(with_diag["params"]), _leaves(without["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  for name in ("a", "b"):
    assert float(m_on["teachers"][name]["reverse_kl"]) > 0
    assert float(m_off["teachers"][name]["reverse_kl"]) == 0  # not computed
    assert float(m_off["teachers"][name]["overlap"]) == 0
    # the sampled tokens' log-probs are always there (cheap, and the k1 metric uses them)
    np.testing.assert_allclose(
      float(m_off["teachers"][name]["teacher_logp"]), float(m_on["teachers"][name]["teacher_logp"])
    )
  expected = (
    float(m_on["teachers"]["a"]["reverse_kl"]) + 0.5 * float(m_on["teachers"]["b"]["reverse_kl"])
  ) / 1.5
  np.testing.assert_allclose(float(m_on["divergence"]), expected, rtol=1e-6)


@pytest.mark.parametrize("loss", ["reverse_kl", "sampled_token"])
def test_the_completion_window_gives_the_full_loss_and_gradients(setup, loss):
  """Rows of different prompt lengths: the loss over each row's `max_new` window equals the
  loss over every position (the prompt and pad positions weigh 0)."""
  graphdef, params, t_graphdefs, t_states, _, _ = setup
  rows = common.teacher_rows(2, 2)
  specs = tuple(
    common.TeacherSpec(n, LossSettings(loss=loss, chunk_size=4, normalize=norm), 1.0, r)
    for n, norm, r in zip("ab", ("token", "sequence"), rows)
  )
  prompt, new = np.array([3, 7, 5, 9]), 6  # L = 9 + 6 = 15
  completion = np.array([6, 2, 4, 1])
  length = 15
  rng = np.random.RandomState(3)
  mask = np.zeros((4, length), np.float32)
  for r in range(4):
    mask[r, prompt[r] : prompt[r] + completion[r]] = 1
  batch = {
    "tokens": jnp.asarray(rng.randint(3, CFG.vocab_size, (4, length)), jnp.int32),
    "completion_mask": jnp.asarray(mask),
    "logprobs": jnp.full((4, length), -2.0, jnp.float32),
    "sampling_logprobs": jnp.asarray(rng.uniform(-4, -1, (4, length)), jnp.float32),
    "lengths": jnp.asarray(prompt + completion, jnp.int32),
  }

  def objective(p, window):
    return ts.distill_objective(
      p, graphdef, t_graphdefs, t_states, batch, specs, loss_window=window
    )

  fn = jax.jit(jax.value_and_grad(objective, has_aux=True), static_argnums=1)
  (full, m_full), g_full = fn(params, None)
  (win, m_win), g_win = fn(params, new)
  np.testing.assert_allclose(win, full, rtol=1e-6)
  for name in "ab":
    for key in ("loss", "tokens", "teacher_logp"):
      np.testing.assert_allclose(m_win[name][key], m_full[name][key], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_win, g_full)
  idx = common.completion_window(common.shifted_inputs(batch), new)
  np.testing.assert_array_equal(idx[:, 0], prompt - 1)  # the position predicting token `prompt`

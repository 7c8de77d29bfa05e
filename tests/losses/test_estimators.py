"""Exact expected gradients of the sampled estimators, by enumerating a small vocabulary.

For every token x the estimator's gradient is computed through the real kernel
(`losses.distill_loss` on hidden states of width 1, so the unembedding row *is* the logits);
weighting by the sampler's probability π(x) and summing gives the expectation exactly, which
must equal the gradient of the documented objective (docs/design.md).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill import losses
from jdistill.sampling import rollout_params

V = 7
STUDENT = np.asarray([1.2, 0.3, -0.5, 2.0, 0.0, -1.5, 0.7], np.float32)
TEACHER = np.asarray([0.1, 1.5, -0.2, 1.0, -2.0, 0.5, 0.2], np.float32)


def sampler_logp(logits, temperature=1.0, top_p=1.0):
  """log π over the vocabulary: the sampler's temperature then nucleus (top-p) filter."""
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / temperature)
  if top_p < 1.0:
    inside = losses.teacher_nucleus(logp, top_p)  # the nucleus of π's own distribution
    logp = jnp.where(inside, logp, -jnp.inf)
    logp = logp - jax.nn.logsumexp(logp)
  return np.asarray(logp, np.float64)


def kernel_grad(settings, x: int, log_pi_x: float, gate_settings=None):
  """∇ over the student logits of the per-token loss at sampled token x."""

  def loss(z):
    value, _ = losses.distill_loss(
      jnp.ones((1, 1, 1)),
      z[None, :],
      jnp.ones((1, 1, 1)),
      jnp.asarray(TEACHER)[None, :],
      jnp.asarray([[x]], jnp.int32),
      jnp.ones((1, 1)),
      settings,
      behaviour_logp=jnp.asarray([[log_pi_x]], jnp.float32),
    )
    return value

  return np.asarray(jax.grad(loss)(jnp.asarray(STUDENT)), np.float64)


def expected_grad(settings, log_pi):
  grads = [
    np.exp(log_pi[x]) * kernel_grad(settings, x, log_pi[x])
    for x in range(V)
    if np.isfinite(log_pi[x])
  ]
  return np.sum(grads, axis=0)


def reverse_kl_grad():
  def kl(z):
    q = jax.nn.log_softmax(z)
    return jnp.sum(jnp.exp(q) * (q - jax.nn.log_softmax(jnp.asarray(TEACHER))))

  return np.asarray(jax.grad(kl)(jnp.asarray(STUDENT)), np.float64)


def truncated_objective_grad(support):
  """∇ of J_S(θ) = Σ_{x∈S} q(x) log(q(x)/p(x)) − q(S), S held fixed (docs/design.md)."""

  def j(z):
    q = jax.nn.log_softmax(z)
    terms = jnp.exp(q) * (q - jax.nn.log_softmax(jnp.asarray(TEACHER))) - jnp.exp(q)
    return jnp.sum(jnp.where(support, terms, 0.0))

  return np.asarray(jax.grad(j)(jnp.asarray(STUDENT)), np.float64)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.3])
def test_sampled_token_at_any_sampling_temperature_is_reverse_kl_in_expectation(temperature):
  log_pi = sampler_logp(STUDENT, temperature=temperature)
  got = expected_grad(losses.LossSettings(loss="sampled_token", chunk_size=1), log_pi)
  np.testing.assert_allclose(got, reverse_kl_grad(), rtol=1e-5, atol=1e-6)


# the fused kernel (chunk 1) and the unchunked reference (None), over sampling temperatures
@pytest.mark.parametrize("temperature, chunk_size", [(0.6, 1), (1.0, None), (1.3, 1)])
def test_the_exact_kl_baseline_keeps_the_expected_gradient(temperature, chunk_size):
  """sampled_token_baseline: advantage −(k1 − KL_t) with KL_t the exact per-position reverse
  KL (a function of the context only). Same expected gradient as sampled_token: ∇ reverse KL.
  (Whether it lowers the variance depends on the distributions: on this toy it does not, on
  the task world it does; `jdistill.experiments.noise` measures it per cell.)"""
  log_pi = sampler_logp(STUDENT, temperature=temperature)
  settings = losses.settings_for("sampled_token_baseline", chunk_size=chunk_size)
  assert settings.kl_baseline and settings.loss == "sampled_token"
  np.testing.assert_allclose(
    expected_grad(settings, log_pi), reverse_kl_grad(), rtol=1e-5, atol=1e-6
  )
  one = kernel_grad(settings, 0, log_pi[0])  # and it is another estimator, not the same one
  assert np.abs(one - kernel_grad(settings.replace(kl_baseline=False), 0, log_pi[0])).max() > 1e-3


def test_without_the_importance_weight_a_tempered_sampler_is_biased():
  """The reason for the weight: plain REINFORCE on T = 0.6 samples is off ∇KL."""
  log_pi = sampler_logp(STUDENT, temperature=0.6)
  settings = losses.LossSettings(loss="sampled_token", chunk_size=1)
  unweighted = [
    np.exp(log_pi[x]) * kernel_grad(settings, x, float(jax.nn.log_softmax(STUDENT)[x]))
    for x in range(V)
  ]
  error = np.abs(np.sum(unweighted, 0) - reverse_kl_grad()).max()
  assert error > 0.05 * np.abs(reverse_kl_grad()).max()


def test_bf16_rollouts_of_f32_params_are_unbiased_only_with_the_importance_weight():
  """`rollout.param_dtype=bfloat16`: the behaviour policy π is the bf16 copy of the student's
  weights (`sampling.rollout_params`), the trained q the f32 params. Weighted by q/π the
  expected gradient over π's draws is ∇KL(q‖p) exactly; with the ratio dropped (behaviour
  log-probs taken as q's own), it is biased by the bf16 rounding."""
  bf16 = rollout_params({"unembed": jnp.asarray(STUDENT)}, "bfloat16")["unembed"]
  log_pi = sampler_logp(bf16.astype(jnp.float32))  # the bf16 model's softmax
  log_q = np.asarray(jax.nn.log_softmax(STUDENT), np.float64)
  assert 1e-4 < np.abs(log_pi - log_q).max() < 1e-2  # a real, bf16-sized mismatch
  settings = losses.LossSettings(loss="sampled_token", chunk_size=1)
  exact = reverse_kl_grad()
  np.testing.assert_allclose(expected_grad(settings, log_pi), exact, rtol=1e-5, atol=1e-6)
  without_ratio = sum(np.exp(log_pi[x]) * kernel_grad(settings, x, log_q[x]) for x in range(V))
  assert np.abs(without_ratio - exact).max() > 100 * 1e-6


def test_sampled_token_with_top_p_is_the_truncated_objective_in_expectation():
  log_pi = sampler_logp(STUDENT, top_p=0.9)
  support = np.isfinite(log_pi)
  assert 1 < support.sum() < V  # a real truncation
  got = expected_grad(losses.LossSettings(loss="sampled_token", chunk_size=1), log_pi)
  np.testing.assert_allclose(got, truncated_objective_grad(support), rtol=1e-5, atol=1e-6)
  # and with nothing truncated the same objective is reverse KL (q(S) = 1 is constant)
  np.testing.assert_allclose(
    truncated_objective_grad(np.ones(V, bool)), reverse_kl_grad(), rtol=1e-5, atol=1e-6
  )


def test_ppo_clip_inside_the_trust_region_keeps_the_expected_gradient():
  log_pi = sampler_logp(STUDENT, temperature=0.95)  # every ratio within 1 ± 0.5
  settings = losses.LossSettings(loss="sampled_token", chunk_size=1, clip_eps=0.5)
  got = expected_grad(settings, log_pi)
  np.testing.assert_allclose(got, reverse_kl_grad(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "criterion,kw",
  [
    ("soft", dict(overlap_topk=2)),
    ("teacher_topk", dict(overlap_topk=3)),
    ("floor", dict(overlap_floor_prob=0.1)),
  ],
)
@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_overlap_aware_is_reverse_kl_in_expectation_with_every_gate(criterion, kw, temperature):
  """Every gate depends on the context only, so it mixes two unbiased estimators of the
  reverse-KL gradient (the dense term and the importance-weighted sampled term)."""
  log_pi = sampler_logp(STUDENT, temperature=temperature)
  settings = losses.LossSettings(
    loss="overlap_aware", chunk_size=1, overlap_criterion=criterion, **kw
  )
  s = losses.log_softmax(jnp.asarray(STUDENT)[None])
  t = losses.log_softmax(jnp.asarray(TEACHER)[None])
  gate = float(losses.overlap_gate(s, t, criterion, kw.get("overlap_topk", 8), 0.1)[0])
  assert 0.05 < gate < 0.95  # both terms matter
  got = expected_grad(settings, log_pi)
  np.testing.assert_allclose(got, reverse_kl_grad(), rtol=1e-5, atol=1e-6)


def test_icepop_masks_tokens_whose_ratio_leaves_the_band_and_the_step_logs_it():
  from jdistill.step import opd as ts

  ratios = np.asarray([[0.2, 0.9, 1.0, 1.5, 3.0, 0.45]], np.float32)
  student_logp = jnp.full((1, 6), -1.0)
  behaviour = student_logp - jnp.log(jnp.asarray(ratios))  # r = q / π exactly as built
  teacher_logp = jnp.asarray([[-0.5, -2.0, -1.0, -0.3, -4.0, -1.5]])
  mask = jnp.asarray([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])

  def loss(s, c):
    value, aux = losses.sampled_token_loss(
      s, teacher_logp, mask, behaviour_logp=behaviour, icepop_c=c
    )
    return value, aux

  (_, aux), grad = jax.value_and_grad(loss, has_aux=True)(student_logp, 2.0)
  (_, _), grad_off = jax.value_and_grad(loss, has_aux=True)(student_logp, None)
  np.testing.assert_array_equal(aux["icepop_masked"], [[1, 0, 0, 0, 1, 1]])
  grad, grad_off = np.asarray(grad)[0], np.asarray(grad_off)[0]
  assert grad[0] == 0 and grad[4] == 0  # outside [1/2, 2]: no gradient
  np.testing.assert_allclose(grad[1:4], grad_off[1:4], rtol=1e-6)  # inside: unchanged
  assert np.all(grad_off[[0, 4]] != 0)
  metrics = ts.teacher_metrics(
    dict(aux, student_logp=student_logp, teacher_logp=teacher_logp), mask
  )
  # 2 of the 5 completion tokens are masked; |log r| over the completion only
  np.testing.assert_allclose(float(metrics["icepop_masked"]), 2 / 5, rtol=1e-6)
  log_r = np.abs(np.log(ratios[0, :5]))
  np.testing.assert_allclose(float(metrics["abs_log_ratio_mean"]), log_r.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["abs_log_ratio_max"]), log_r.max(), rtol=1e-5)
  with pytest.raises(ValueError, match="icepop_c"):
    losses.LossSettings(loss="sampled_token", icepop_c=0.5).validate()


def test_off_support_loss_share_weights_the_advantage_or_the_dense_loss():
  """The share of |advantage| (sampled) or of the per-token loss (dense) on completion tokens
  the teacher puts off its support, against NumPy."""
  from jdistill.step import opd as ts

  mask = jnp.asarray([[1.0, 1.0, 1.0, 1.0, 0.0]])
  off = jnp.asarray([[0.0, 1.0, 0.0, 1.0, 1.0]])
  common = dict(student_logp=jnp.zeros((1, 5)), teacher_logp=jnp.zeros((1, 5)), off_support=off)
  advantage = jnp.asarray([[-1.0, -6.0, 0.5, 2.0, -9.0]])
  got = ts.teacher_metrics(dict(common, advantage=advantage, per_token_loss=advantage), mask)
  np.testing.assert_allclose(float(got["off_support_loss_share"]), 8.0 / 9.5, rtol=1e-6)
  dense = jnp.asarray([[0.2, 0.6, 0.2, 0.0, 5.0]])
  got = ts.teacher_metrics(dict(common, per_token_loss=dense), mask)
  np.testing.assert_allclose(float(got["off_support_loss_share"]), 0.6, rtol=1e-6)


# ------------------------------------------------------------------ RL advantages and k3


def test_group_advantages_match_numpy():
  rewards = np.asarray([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.25, 0.0])
  groups = rewards.reshape(-1, 4)
  centred = groups - groups.mean(1, keepdims=True)
  want = (centred / (groups.std(1, keepdims=True) + 1e-6)).reshape(-1)
  np.testing.assert_allclose(losses.group_advantages(rewards, 4), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    losses.group_advantages(rewards, 4, normalize_std=False), centred.reshape(-1), atol=1e-7
  )
  assert np.all(np.asarray(losses.group_advantages(rewards, 4))[4:8] == 0)  # all correct: 0
  with pytest.raises(ValueError, match="groups of 5"):
    losses.group_advantages(rewards, 5)


def test_combined_advantage_is_its_formula_and_reduces_to_the_pure_cases():
  rng = np.random.RandomState(0)
  student, teacher = jnp.asarray(rng.randn(3, 4)), jnp.asarray(rng.randn(3, 4))
  behaviour, reward_adv = student + 0.1, jnp.asarray([0.5, -1.0, 2.0])
  k1 = student - teacher
  got = losses.combined_advantage(k1, reward_adv, kl_weight=0.3, reward_weight=2.0)
  np.testing.assert_allclose(got, 2.0 * reward_adv[:, None] - 0.3 * k1, rtol=1e-6)

  def kernel_advantage(kl_weight, reward_weight):
    _, aux = losses.sampled_token_terms(
      student, teacher, behaviour, reward_weight * reward_adv[:, None], None, None, kl_weight
    )
    return np.asarray(aux["advantage"])

  formula = losses.combined_advantage(k1, reward_adv, kl_weight=0.3, reward_weight=2.0)
  np.testing.assert_allclose(kernel_advantage(0.3, 2.0), formula, rtol=1e-6)
  # λ = 0: pure GRPO (the reward advantage alone); reward weight 0: pure sampled-token OPD
  np.testing.assert_allclose(
    kernel_advantage(0.0, 1.0), np.broadcast_to(reward_adv[:, None], (3, 4))
  )
  pure_opd, _ = losses.sampled_token_terms(student, teacher, behaviour, None, None, None)
  zero_reward, _ = losses.sampled_token_terms(
    student, teacher, behaviour, 0.0 * reward_adv[:, None], None, None, 1.0
  )
  np.testing.assert_allclose(zero_reward, pure_opd, rtol=1e-6)


def test_k3_is_kl_in_expectation_by_exact_enumeration():
  q = jax.nn.log_softmax(jnp.asarray(STUDENT))
  ref = jax.nn.log_softmax(jnp.asarray(TEACHER))
  per_token = losses.k3_kl(q, ref)  # one value per possible sampled token
  assert float(per_token.min()) >= 0
  expected = float(jnp.sum(jnp.exp(q) * per_token))
  exact = float(jnp.sum(jnp.exp(q) * (q - ref)))
  np.testing.assert_allclose(expected, exact, rtol=1e-5)


def test_constant_normalisation_is_a_fixed_denominator():
  values = jnp.asarray([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
  mask = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  got = float(losses.masked_mean(values, mask, "constant"))
  assert got == pytest.approx((1 + 2 + 4) / 6)
  weights = losses.token_weights(mask, "constant")
  assert float(jnp.sum(weights * values)) == pytest.approx(got)

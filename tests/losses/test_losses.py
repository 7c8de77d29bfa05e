"""Tests for jdistill.losses against independent float64 NumPy references."""

import ast
import dataclasses
import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill import losses

B, T, V = 3, 7, 11
RTOL, ATOL = 1e-5, 1e-6


# --------------------------------------------------------------------------
# NumPy float64 references (written independently of the jax code)
# --------------------------------------------------------------------------


def np_log_softmax(logits, temperature=1.0):
  x = np.asarray(logits, np.float64) / temperature
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_kl(p, q):
  """KL(p||q) over the last axis for probability arrays (0 log 0 = 0)."""
  safe_p = np.where(p > 0, p, 1.0)
  safe_q = np.where(q > 0, q, 1.0)
  return np.where(p > 0, p * (np.log(safe_p) - np.log(safe_q)), 0.0).sum(axis=-1)


def np_reverse_kl(s_logits, t_logits, temperature=1.0):
  q, p = (
    np.exp(np_log_softmax(s_logits, temperature)),
    np.exp(np_log_softmax(t_logits, temperature)),
  )
  return np_kl(q, p)


def np_forward_kl(s_logits, t_logits, temperature=1.0):
  q, p = (
    np.exp(np_log_softmax(s_logits, temperature)),
    np.exp(np_log_softmax(t_logits, temperature)),
  )
  return np_kl(p, q)


def np_jsd(s_logits, t_logits, beta, temperature=1.0):
  q, p = (
    np.exp(np_log_softmax(s_logits, temperature)),
    np.exp(np_log_softmax(t_logits, temperature)),
  )
  if beta == 0.0:
    return np_kl(p, q)
  if beta == 1.0:
    return np_kl(q, p)
  m = beta * p + (1 - beta) * q
  return beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)


def np_topk_kl(s_logits, t_logits, k, support, tail, direction, temperature=1.0):
  q, p = (
    np.exp(np_log_softmax(s_logits, temperature)),
    np.exp(np_log_softmax(t_logits, temperature)),
  )
  out = np.zeros(q.shape[:-1])
  for idx in np.ndindex(*q.shape[:-1]):
    teacher_top = set(np.argsort(-p[idx])[:k])
    student_top = set(np.argsort(-q[idx])[:k])
    chosen = {"teacher": teacher_top, "student": student_top, "union": teacher_top | student_top}[
      support
    ]
    s_set = sorted(chosen)
    first, second = (q[idx], p[idx]) if direction == "reverse" else (p[idx], q[idx])
    a, b = first[s_set], second[s_set]
    if tail == "renorm":
      a, b = a / a.sum(), b / b.sum()
    else:
      a = np.append(a, max(1.0 - a.sum(), 0.0))
      b = np.append(b, max(1.0 - b.sum(), 0.0))
      if a[-1] < 1e-12:  # empty complement: the bucket holds no mass
        a, b = a[:-1], b[:-1]
    out[idx] = np_kl(a, b)
  return out


def np_masked_mean(values, mask, normalize):
  v, m = np.asarray(values, np.float64), np.asarray(mask, np.float64)
  if normalize == "token":
    return (m * v).sum() / max(m.sum(), 1.0)
  seq_means = [(m[i] * v[i]).sum() / m[i].sum() for i in range(len(v)) if m[i].sum() > 0]
  return float(np.mean(seq_means)) if seq_means else 0.0


def np_sampled_token(s_logp, t_logp, mask, behaviour_logp=None, clip_eps=None, extra=None):
  """Returns (loss, d loss / d student_logp) for token normalisation."""
  s, t, m = (np.asarray(x, np.float64) for x in (s_logp, t_logp, mask))
  adv = -(s - t) + (0.0 if extra is None else np.asarray(extra, np.float64))
  n = max(m.sum(), 1.0)
  if behaviour_logp is None:
    return (m * -adv * s).sum() / n, -m * adv / n
  r = np.exp(s - np.asarray(behaviour_logp, np.float64))
  if clip_eps is None:
    return (m * -r * adv).sum() / n, -m * r * adv / n
  unclipped, clipped = r * adv, np.clip(r, 1 - clip_eps, 1 + clip_eps) * adv
  use_unclipped = unclipped <= clipped
  per_token = -np.minimum(unclipped, clipped)
  grad = np.where(use_unclipped, -r * adv, 0.0)
  return (m * per_token).sum() / n, m * grad / n


def finite_difference_grad(f, x, eps=1e-6):
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for idx in np.ndindex(*x.shape):
    up, down = x.copy(), x.copy()
    up[idx] += eps
    down[idx] -= eps
    grad[idx] = (f(up) - f(down)) / (2 * eps)
  return grad


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def random_logits(seed, shape=(B, T, V), scale=2.0):
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def random_mask(seed, shape=(B, T)):
  mask = (np.random.default_rng(seed).random(shape) < 0.7).astype(np.float32)
  mask[0, 0] = 1.0
  mask[-1] = 0.0  # one fully masked-out sequence
  return mask


STUDENT, TEACHER = random_logits(0), random_logits(1)
MASK = random_mask(2)


def close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------
# masked_mean
# --------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_masked_mean_matches_reference(normalize):
  values = random_logits(3, (B, T))
  close(
    losses.masked_mean(jnp.asarray(values), jnp.asarray(MASK), normalize),
    np_masked_mean(values, MASK, normalize),
  )


def test_masked_mean_ignores_nan_at_masked_positions_and_empty_mask():
  values = np.where(MASK > 0, 1.5, np.nan).astype(np.float32)
  assert float(losses.masked_mean(jnp.asarray(values), jnp.asarray(MASK))) == pytest.approx(1.5)
  zeros = jnp.zeros((B, T))
  assert float(losses.masked_mean(zeros + 3.0, zeros, "sequence")) == 0.0


def test_masked_mean_bool_mask():
  values = random_logits(4, (B, T))
  close(
    losses.masked_mean(jnp.asarray(values), jnp.asarray(MASK > 0)),
    np_masked_mean(values, MASK, "token"),
  )


# --------------------------------------------------------------------------
# Full-vocab per-token terms
# --------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kl_per_token_matches_reference(temperature):
  close(
    losses.reverse_kl_per_token(STUDENT, TEACHER, temperature),
    np_reverse_kl(STUDENT, TEACHER, temperature),
  )
  close(
    losses.forward_kl_per_token(STUDENT, TEACHER, temperature),
    np_forward_kl(STUDENT, TEACHER, temperature),
  )


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_reference(beta):
  close(
    losses.jsd_per_token(STUDENT, TEACHER, beta, temperature=1.3),
    np_jsd(STUDENT, TEACHER, beta, temperature=1.3),
  )


def test_jsd_endpoints_are_exactly_the_kls():
  np.testing.assert_array_equal(
    losses.jsd_per_token(STUDENT, TEACHER, 0.0), losses.forward_kl_per_token(STUDENT, TEACHER)
  )
  np.testing.assert_array_equal(
    losses.jsd_per_token(STUDENT, TEACHER, 1.0), losses.reverse_kl_per_token(STUDENT, TEACHER)
  )


def test_kl_nonnegative_and_zero_for_equal_inputs():
  for fn in (
    losses.reverse_kl_per_token,
    losses.forward_kl_per_token,
    functools.partial(losses.jsd_per_token, beta=0.3),
  ):
    assert np.all(np.asarray(fn(STUDENT, TEACHER)) >= 0)
    close(fn(STUDENT, STUDENT), np.zeros((B, T)), atol=1e-6)
  close(losses.topk_kl_per_token(STUDENT, STUDENT, 3, support="union"), np.zeros((B, T)))


def test_bf16_logits_use_float32_softmax():
  s16, t16 = jnp.asarray(STUDENT, jnp.bfloat16), jnp.asarray(TEACHER, jnp.bfloat16)
  out = losses.reverse_kl_per_token(s16, t16)
  assert out.dtype == jnp.float32
  close(out, np_reverse_kl(np.asarray(s16, np.float32), np.asarray(t16, np.float32)), rtol=1e-5)


# --------------------------------------------------------------------------
# Top-k
# --------------------------------------------------------------------------

TOPK_CASES = [
  (support, tail, direction)
  for support in losses.TOPK_SUPPORTS
  for tail in losses.TOPK_TAILS
  for direction in losses.KL_DIRECTIONS
]


@pytest.mark.parametrize("support,tail,direction", TOPK_CASES)
def test_topk_matches_reference(support, tail, direction):
  for k in (1, 4):
    close(
      losses.topk_kl_per_token(STUDENT, TEACHER, k, support, tail, direction, 0.8),
      np_topk_kl(STUDENT, TEACHER, k, support, tail, direction, 0.8),
    )


@pytest.mark.parametrize("support,tail,direction", TOPK_CASES)
def test_topk_with_full_vocab_equals_full_kl(support, tail, direction):
  full = (np_reverse_kl if direction == "reverse" else np_forward_kl)(STUDENT, TEACHER)
  close(losses.topk_kl_per_token(STUDENT, TEACHER, V, support, tail, direction), full)


def test_topk_full_vocab_gradient_is_finite_and_matches_full_kl():
  grad = lambda f: jax.grad(lambda s: f(s).sum())(jnp.asarray(STUDENT))
  topk = grad(lambda s: losses.topk_kl_per_token(s, TEACHER, V, tail="bucket"))
  full = grad(lambda s: losses.reverse_kl_per_token(s, TEACHER))
  close(topk, np.asarray(full, np.float64), atol=1e-5)


# --------------------------------------------------------------------------
# Gradients w.r.t. student logits vs finite differences of the references
# --------------------------------------------------------------------------

GRAD_CASES = {
  "reverse_kl": (
    lambda s, t: losses.reverse_kl_per_token(s, t, 0.9),
    lambda s, t: np_reverse_kl(s, t, 0.9),
  ),
  "forward_kl": (lambda s, t: losses.forward_kl_per_token(s, t), lambda s, t: np_forward_kl(s, t)),
  "jsd_0.3": (lambda s, t: losses.jsd_per_token(s, t, 0.3), lambda s, t: np_jsd(s, t, 0.3)),
  "topk_union_bucket_rev": (
    lambda s, t: losses.topk_kl_per_token(s, t, 3, "union", "bucket", "reverse"),
    lambda s, t: np_topk_kl(s, t, 3, "union", "bucket", "reverse"),
  ),
  "topk_teacher_renorm_fwd": (
    lambda s, t: losses.topk_kl_per_token(s, t, 3, "teacher", "renorm", "forward"),
    lambda s, t: np_topk_kl(s, t, 3, "teacher", "renorm", "forward"),
  ),
  "topk_student_bucket_fwd": (
    lambda s, t: losses.topk_kl_per_token(s, t, 2, "student", "bucket", "forward"),
    lambda s, t: np_topk_kl(s, t, 2, "student", "bucket", "forward"),
  ),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradient_wrt_student_logits_matches_finite_differences(name):
  jax_fn, np_fn = GRAD_CASES[name]
  student, teacher, mask = STUDENT[:2, :3], TEACHER[:2, :3], MASK[:2, :3]
  for normalize in ("token", "sequence"):
    objective = lambda s: losses.masked_mean(jax_fn(s, teacher), mask, normalize)
    grad = jax.grad(objective)(jnp.asarray(student))
    expected = finite_difference_grad(
      lambda s: np_masked_mean(np_fn(s, teacher), mask, normalize), student
    )
    close(grad, expected, rtol=1e-4, atol=2e-6)


# --------------------------------------------------------------------------
# Sampled-token loss
# --------------------------------------------------------------------------

S_LOGP = np_log_softmax(STUDENT)[..., 0].astype(np.float32)
T_LOGP = np_log_softmax(TEACHER)[..., 0].astype(np.float32)
BEHAVIOUR_LOGP = (S_LOGP + 0.3 * random_logits(5, (B, T))).astype(np.float32)
EXTRA_SEQ = random_logits(6, (B, 1))

SAMPLED_CASES = {
  "plain": {},
  "extra_advantage_seq": {"extra": EXTRA_SEQ},
  "extra_advantage_token": {"extra": random_logits(7, (B, T))},
  "behaviour": {"behaviour_logp": BEHAVIOUR_LOGP},
  "behaviour_clip": {"behaviour_logp": BEHAVIOUR_LOGP, "clip_eps": 0.1},
  "behaviour_clip_extra": {"behaviour_logp": BEHAVIOUR_LOGP, "clip_eps": 0.2, "extra": EXTRA_SEQ},
}


@pytest.mark.parametrize("name", sorted(SAMPLED_CASES))
def test_sampled_token_loss_value_and_gradient(name):
  case = SAMPLED_CASES[name]
  kwargs = {
    "behaviour_logp": case.get("behaviour_logp"),
    "clip_eps": case.get("clip_eps"),
    "extra_advantage": case.get("extra"),
  }
  objective = lambda s: losses.sampled_token_loss(s, T_LOGP, MASK, **kwargs)
  (loss, aux), grad = jax.value_and_grad(objective, has_aux=True)(jnp.asarray(S_LOGP))
  expected_loss, expected_grad = np_sampled_token(
    S_LOGP, T_LOGP, MASK, case.get("behaviour_logp"), case.get("clip_eps"), case.get("extra")
  )
  close(loss, expected_loss)
  close(grad, expected_grad)
  close(aux["k1"], S_LOGP.astype(np.float64) - T_LOGP)
  assert aux["advantage"].shape == (B, T)
  if "clip_eps" in case:
    fraction = float(aux["clip_fraction"])
    assert 0.0 < fraction < 1.0  # the case is built so that some tokens clip
  else:
    assert float(aux["clip_fraction"]) == 0.0


def test_sampled_token_ratio_one_matches_plain_gradient():
  grad = lambda **kw: jax.grad(lambda s: losses.sampled_token_loss(s, T_LOGP, MASK, **kw)[0])(
    jnp.asarray(S_LOGP)
  )
  plain = grad()
  close(grad(behaviour_logp=S_LOGP), np.asarray(plain, np.float64))
  close(grad(behaviour_logp=S_LOGP, clip_eps=0.2), np.asarray(plain, np.float64))


def test_sampled_token_sequence_normalisation():
  loss, aux = losses.sampled_token_loss(S_LOGP, T_LOGP, MASK, normalize="sequence")
  close(loss, np_masked_mean(np.asarray(aux["per_token_loss"]), MASK, "sequence"))


def test_k1_monte_carlo_mean_approaches_reverse_kl():
  vocab, n = 6, 200_000
  student, teacher = random_logits(8, (vocab,), 1.0), random_logits(9, (vocab,), 1.0)
  s_logp, t_logp = np_log_softmax(student), np_log_softmax(teacher)
  samples = np.asarray(jax.random.categorical(jax.random.key(0), jnp.asarray(student), shape=(n,)))
  k1 = s_logp[samples] - t_logp[samples]
  exact = float(np_kl(np.exp(s_logp), np.exp(t_logp)))
  stderr = k1.std() / np.sqrt(n)
  assert abs(k1.mean() - exact) < max(4 * stderr, 1e-3), (k1.mean(), exact, stderr)
  assert stderr < 5e-3


# --------------------------------------------------------------------------
# Chunked kernel == unchunked reference
# --------------------------------------------------------------------------

DS, DT, BIAS_V = 5, 4, 13


def hidden_inputs(seed=10):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  targets = jnp.asarray(rng.integers(0, BIAS_V, (B, T)), jnp.int32)
  return (
    f(B, T, DS),
    f(DS, BIAS_V),
    f(B, T, DT),
    f(DT, BIAS_V),
    targets,
    jnp.asarray(MASK),
    f(BIAS_V),
    f(BIAS_V),
  )


LOSS_KWARGS = {
  "reverse_kl": {"temperature": 1.0},
  "forward_kl": {"temperature": 0.8},
  "jsd": {"beta": 0.4, "normalize": "sequence"},
  "topk": {"k": 4, "topk_support": "union", "topk_tail": "bucket"},
  "sampled_token": {},
  "sampled_token_ppo": {"clip_eps": 0.2},
}
CHUNK_CASES = (
  [("reverse_kl", c) for c in (0, 1, 3, T, T + 4)]
  + [("sampled_token_ppo", c) for c in (1, 3, T + 4)]
  + [(name, 3) for name in ("forward_kl", "jsd", "topk", "sampled_token")]
)


SETTING_FIELDS = {f.name for f in dataclasses.fields(losses.LossSettings)}


def split_settings(**kwargs):
  """Keyword arguments → (LossSettings of the setting fields, the array keyword arguments)."""
  settings = losses.LossSettings(**{k: v for k, v in kwargs.items() if k in SETTING_FIELDS})
  return settings, {k: v for k, v in kwargs.items() if k not in SETTING_FIELDS}


def _loss_and_grads(loss_fn, name, chunk_size, inputs):
  sh, su, th, tu, targets, mask, s_bias, t_bias = inputs
  kwargs = dict(LOSS_KWARGS[name])
  if name == "sampled_token_ppo":
    kwargs["behaviour_logp"] = jnp.asarray(random_logits(11, (B, T), 0.3)) - 2.5
  loss_name = name.removesuffix("_ppo")
  settings, kwargs = split_settings(
    loss=loss_name, chunk_size=chunk_size, diag_topk=(1, 3), **kwargs
  )

  def objective(sh, su, th, tu, s_bias):
    return loss_fn(
      sh, su, th, tu, targets, mask, settings, student_bias=s_bias, teacher_bias=t_bias, **kwargs
    )

  return jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2, 3, 4), has_aux=True))(
    sh, su, th, tu, s_bias
  )


@functools.cache
def _unchunked_reference(name):
  return _loss_and_grads(losses.unchunked_distill_loss, name, 0, hidden_inputs())


@pytest.mark.parametrize("name,chunk_size", CHUNK_CASES)
def test_chunked_equals_unchunked(name, chunk_size):
  (loss, diag), grads = _loss_and_grads(losses.distill_loss, name, chunk_size, hidden_inputs())
  (ref_loss, ref_diag), ref_grads = _unchunked_reference(name)
  close(loss, float(ref_loss))
  g_sh, g_su, g_th, g_tu, g_bias = grads
  for got, want in ((g_sh, ref_grads[0]), (g_su, ref_grads[1]), (g_bias, ref_grads[4])):
    close(got, np.asarray(want, np.float64), atol=1e-6)
  assert float(jnp.abs(g_su).max()) > 0
  for teacher_grad in (g_th, g_tu, ref_grads[2], ref_grads[3]):
    assert not np.any(np.asarray(teacher_grad))
  assert set(diag) == set(ref_diag)
  for key in diag:
    close(diag[key], np.asarray(ref_diag[key], np.float64), atol=1e-6)
    if key != "clip_fraction":
      assert diag[key].shape == (B, T), key


def test_distill_loss_matches_numpy_on_logits():
  sh, su, th, tu, targets, mask, s_bias, t_bias = hidden_inputs()
  s_logits = np.asarray(sh, np.float64) @ np.asarray(su, np.float64) + np.asarray(s_bias)
  t_logits = np.asarray(th, np.float64) @ np.asarray(tu, np.float64) + np.asarray(t_bias)
  (loss, diag), _ = _loss_and_grads(losses.distill_loss, "forward_kl", 3, hidden_inputs())
  close(loss, np_masked_mean(np_forward_kl(s_logits, t_logits, 0.8), MASK, "token"))
  t_logp = np_log_softmax(t_logits)
  tgt = np.asarray(targets)
  close(diag["teacher_logp"], np.take_along_axis(t_logp, tgt[..., None], -1)[..., 0])
  close(
    diag["student_logp"], np.take_along_axis(np_log_softmax(s_logits), tgt[..., None], -1)[..., 0]
  )
  close(diag["reverse_kl"], np_reverse_kl(s_logits, t_logits), atol=1e-5)
  close(diag["forward_kl"], np_forward_kl(s_logits, t_logits), atol=1e-5)
  rank = (t_logp > np.take_along_axis(t_logp, tgt[..., None], -1)).sum(-1)
  np.testing.assert_array_equal(diag["in_teacher_top1"], (t_logp.argmax(-1) == tgt))
  np.testing.assert_array_equal(diag["in_teacher_top3"], rank < 3)


def test_distill_loss_without_biases_and_bf16_hidden():
  sh, su, th, tu, targets, mask, _, _ = hidden_inputs()
  bf = lambda x: x.astype(jnp.bfloat16)
  settings = losses.LossSettings(loss="reverse_kl", chunk_size=3)
  loss, diag = losses.distill_loss(bf(sh), bf(su), bf(th), bf(tu), targets, mask, settings)
  s_logits = np.asarray(bf(sh), np.float64) @ np.asarray(bf(su), np.float64)
  t_logits = np.asarray(bf(th), np.float64) @ np.asarray(bf(tu), np.float64)
  close(loss, np_masked_mean(np_reverse_kl(s_logits, t_logits), MASK, "token"), rtol=1e-4)
  assert diag["per_token_loss"].dtype == jnp.float32


def test_fused_gradients_keep_bf16_dtypes_and_match_autodiff():
  """bf16 hidden states and unembedding: the fused kernel's explicit projection gradients
  (f32 contractions, cast back) have the inputs' dtypes and equal autodiff of the unchunked
  loss to bf16 precision."""
  sh, su, th, tu, targets, mask, _, _ = hidden_inputs()
  bf = lambda x: x.astype(jnp.bfloat16)
  sh, su, th, tu = bf(sh), bf(su), bf(th), bf(tu)
  settings = losses.LossSettings(loss="reverse_kl", chunk_size=3)

  def grads(fn):
    objective = lambda h, w: fn(h, w, th, tu, targets, mask, settings)[0]
    return jax.grad(objective, argnums=(0, 1))(sh, su)

  fused, reference = grads(losses.distill_loss), grads(losses.unchunked_distill_loss)
  for got, want, x in zip(fused, reference, (sh, su)):
    assert got.dtype == x.dtype == jnp.bfloat16
    scale = float(np.max(np.abs(np.asarray(want, np.float32))))
    close(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0, atol=2e-2 * scale)


# --------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------


def _distill(**overrides):
  sh, su, th, tu, targets, mask, _, _ = hidden_inputs()
  args = {
    "student_hidden": sh,
    "student_unembed": su,
    "teacher_hidden": th,
    "teacher_unembed": tu,
    "targets": targets,
    "mask": mask,
  }
  kwargs = {"loss": "reverse_kl", "chunk_size": 3}
  for key, value in overrides.items():
    (args if key in args else kwargs)[key] = value
  settings, kwargs = split_settings(**kwargs)
  return losses.distill_loss(*args.values(), settings, **kwargs)


def test_chunk_positions_from_the_shapes(monkeypatch):
  """chunk_size=0: ~AUTO_CHUNK_TOKENS_CPU tokens per chunk on CPU; a logits byte budget on
  accelerators; an explicit size is kept; never more than the sequence, never below 1."""
  cpu = losses.AUTO_CHUNK_TOKENS_CPU
  assert losses.chunk_positions(0, 16, 128, 32_000) == cpu // 16
  assert losses.chunk_positions(0, 1, 100, 32_000) == 100  # capped at the length
  assert losses.chunk_positions(0, 4 * cpu, 100, 32_000) == 1  # more rows than the budget
  assert losses.chunk_positions(24, 16, 128, 32_000) == 24
  assert losses.chunk_positions(512, 16, 128, 32_000) == 128
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  tokens = losses.AUTO_CHUNK_BYTES // (4 * 32_000)
  assert losses.chunk_positions(0, 16, 10_000, 32_000) == tokens // 16
  assert losses.chunk_positions(0, 16, 10_000, 10**7) == cpu // 16  # the floor


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"teacher_unembed": jnp.zeros((DT, BIAS_V + 1))}, rf"vocab.*{BIAS_V}.*{BIAS_V + 1}"),
    ({"student_unembed": jnp.zeros((DS + 1, BIAS_V))}, "student_hidden width"),
    ({"teacher_hidden": jnp.zeros((B, T + 1, DT))}, "teacher_hidden"),
    ({"targets": jnp.zeros((B, T - 1), jnp.int32)}, "targets"),
    ({"mask": jnp.zeros((B, T - 1))}, "mask"),
    ({"loss": "kl"}, r"loss must be one of .*sampled_token.*topk"),
    ({"normalize": "batch"}, r"normalize must be one of .*token.*sequence"),
    ({"loss": "jsd", "beta": 1.5}, r"beta must be in \[0, 1\]"),
    ({"loss": "jsd", "beta": -0.1}, r"beta must be in \[0, 1\]"),
    ({"loss": "topk", "k": 0}, "k must be"),
    ({"loss": "topk", "k": BIAS_V + 1}, "k must be"),
    ({"loss": "topk", "topk_support": "both", "k": 3}, "topk_support must be one of"),
    ({"loss": "topk", "topk_tail": "drop", "k": 3}, "topk_tail must be one of"),
    ({"loss": "topk", "topk_direction": "sideways", "k": 3}, "topk_direction must be one of"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"temperature": -1.0}, "temperature must be > 0"),
    ({"chunk_size": -1}, "chunk_size"),
    ({"chunk_size": 2.5}, "chunk_size"),
    ({"loss": "sampled_token", "clip_eps": 0.2}, "clip_eps requires behaviour_logp"),
    ({"loss": "sampled_token", "extra_advantage": jnp.zeros((B, 2))}, "extra_advantage"),
    ({"extra_advantage": jnp.zeros((B, 1))}, "extra_advantage"),
  ],
)
def test_distill_loss_rejects_bad_arguments(overrides, match):
  with pytest.raises(ValueError, match=match):
    _distill(**overrides)


def test_per_token_functions_reject_bad_arguments():
  with pytest.raises(ValueError, match="temperature must be > 0"):
    losses.reverse_kl_per_token(STUDENT, TEACHER, temperature=0.0)
  with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
    losses.jsd_per_token(STUDENT, TEACHER, beta=1.01)
  with pytest.raises(ValueError, match="k must be"):
    losses.topk_kl_per_token(STUDENT, TEACHER, k=0)
  with pytest.raises(ValueError, match="k must be"):
    losses.topk_kl_per_token(STUDENT, TEACHER, k=V + 1)
  with pytest.raises(ValueError, match="support must be one of"):
    losses.topk_kl_per_token(STUDENT, TEACHER, k=2, support="both")
  with pytest.raises(ValueError, match="tail must be one of"):
    losses.topk_kl_per_token(STUDENT, TEACHER, k=2, tail="x")
  with pytest.raises(ValueError, match="student_logits shape"):
    losses.forward_kl_per_token(STUDENT, TEACHER[..., :-1])
  with pytest.raises(ValueError, match="normalize must be one of"):
    losses.masked_mean(jnp.zeros((B, T)), jnp.ones((B, T)), "batch")
  with pytest.raises(ValueError, match="clip_eps must be > 0"):
    losses.sampled_token_loss(S_LOGP, T_LOGP, MASK, behaviour_logp=S_LOGP, clip_eps=0.0)


# --------------------------------------------------------------------------
# The fused kernel: gradients in the forward pass, one projection per model
# --------------------------------------------------------------------------


FUSED_CASES = [
  ("reverse_kl", {}, "token"),
  ("jsd", {"beta": 0.3}, "sequence"),
  ("topk", {"k": 4, "topk_support": "teacher"}, "token"),
  ("sampled_token", {"clip_eps": 0.2, "icepop_c": 3.0}, "sequence"),
  ("overlap_aware", {"overlap_criterion": "teacher_topk", "icepop_c": 3.0}, "token"),
]


@pytest.mark.parametrize("loss,kw,normalize", FUSED_CASES)
def test_fused_equals_remat_and_unchunked_with_every_input(loss, kw, normalize):
  sh, su, th, tu, targets, mask, s_bias, t_bias = hidden_inputs()
  # behaviour log-probs near the student's own, so that some ratios fall inside the clip and
  # IcePop bands and some outside
  student_logp = jax.nn.log_softmax(sh @ su + s_bias)
  own = jnp.take_along_axis(student_logp, targets[..., None], -1)[..., 0]
  behaviour = own + jnp.asarray(random_logits(11, (B, T), 1.0))
  extra = jnp.asarray(random_logits(12, (B, 1), 1.0)) if loss == "sampled_token" else None
  settings = losses.LossSettings(loss=loss, normalize=normalize, chunk_size=3, **kw)
  results = []
  for fused, chunk in ((True, 3), (False, 3), (False, None)):

    def objective(sh, su, s_bias, fused=fused, chunk=chunk):
      value, diag = losses.distill_loss(
        sh,
        su,
        th,
        tu,
        targets,
        mask,
        settings.replace(chunk_size=chunk),
        behaviour_logp=behaviour,
        extra_advantage=extra,
        student_bias=s_bias,
        teacher_bias=t_bias,
        fused=fused,
      )
      return value, diag

    results.append(jax.jit(jax.value_and_grad(objective, (0, 1, 2), has_aux=True))(sh, su, s_bias))
  (value, diag), grads = results[0]
  for (ref_value, ref_diag), ref_grads in results[1:]:
    close(value, float(ref_value))
    for got, want in zip(grads, ref_grads):
      close(got, np.asarray(want, np.float64), atol=1e-6)
    assert set(diag) == set(ref_diag)
    for key in diag:
      close(diag[key], np.asarray(ref_diag[key], np.float64), atol=1e-6)
  assert float(jnp.abs(grads[1]).max()) > 0


def _count_teacher_projections(jaxpr, teacher_unembed_shape) -> int:
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and any(
      getattr(v, "aval", None) is not None and v.aval.shape == teacher_unembed_shape
      for v in eqn.invars
    ):
      count += 1
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          count += _count_teacher_projections(inner, teacher_unembed_shape)
  return count


@pytest.mark.parametrize(
  "loss,remat_count",
  # the remat kernel recomputes the teacher projection in the backward pass whenever the
  # gradient needs full teacher log-probs (full-vocab losses); the sampled-token gradient
  # only needs the target's log-prob, which XLA keeps
  [("reverse_kl", 2), ("jsd", 2), ("sampled_token", 1)],
)
def test_fused_kernel_projects_the_teacher_vocabulary_once_per_step(loss, remat_count):
  sh, su, th, tu, targets, mask, _, _ = hidden_inputs()
  assert tu.shape != su.shape  # the teacher's unembedding is recognisable by its shape
  settings = losses.LossSettings(loss=loss, chunk_size=3)
  counts = {}
  for fused in (True, False):

    def objective(sh, su, fused=fused):
      return losses.distill_loss(sh, su, th, tu, targets, mask, settings, fused=fused)[0]

    jaxpr = jax.make_jaxpr(jax.value_and_grad(objective, (0, 1)))(sh, su).jaxpr
    counts[fused] = _count_teacher_projections(jaxpr, tu.shape)
  assert counts == {True: 1, False: remat_count}


# --------------------------------------------------------------------------
# The loss registry: the one vocabulary of loss names
# --------------------------------------------------------------------------


def _selection_in(path):
  """The names in ``LOSSES = registry.check_names((...), ...)`` of a module, read from its
  source (the demo defines absl flags on import)."""
  tree = ast.parse(pathlib.Path(path).read_text(encoding="utf-8"))
  for node in tree.body:
    if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["LOSSES"]:
      call = node.value
      assert isinstance(call, ast.Call) and ast.unparse(call.func) == "registry.check_names", (
        f"{path}: LOSSES is not checked against the registry at import"
      )
      return ast.literal_eval(call.args[0])
  raise AssertionError(f"{path} defines no LOSSES")


def test_the_registry_is_the_one_vocabulary_of_loss_names():
  from jdistill import config
  from jdistill.experiments import experiment
  from jdistill.runtime import build
  from jdistill.step import opd

  registry = losses.registry
  root = pathlib.Path(__file__).resolve().parents[2]
  assert config.LOSSES == registry.NAMES == tuple(registry.REGISTRY)
  assert all(name == entry.name for name, entry in registry.REGISTRY.items())
  # The kernel names LossSettings accepts are exactly the registry's kernels.
  assert set(losses.LOSS_NAMES) == {e.kernel for e in registry.REGISTRY.values()}
  # A kernel reads the sampled tokens under every name or under none; the step knows which.
  for entry in registry.REGISTRY.values():
    assert entry.sampled == (entry.kernel in losses.SAMPLED_LOSSES), entry
  assert opd.SAMPLED_LOSSES == losses.SAMPLED_LOSSES == ("sampled_token", "overlap_aware")
  # The demo's and the grid's selections are registry names, checked at import.
  for path in (
    "jdistill/experiments/demo.py",
    "jdistill/experiments/experiment.py",
    "jdistill/experiments/question.py",
  ):
    assert set(_selection_in(root / path)) <= set(registry.NAMES), path
  assert set(experiment.LOSSES) <= set(registry.NAMES)
  with pytest.raises(ValueError, match="are not loss names"):
    registry.check_names(("reverse_kl", "topk"), "grid")
  # Every entry builds a valid LossSettings, directly and from a config.
  cfg = config.base_config()
  for name, entry in registry.REGISTRY.items():
    settings = losses.settings_for(name, k=4)
    settings.validate(vocab=V)
    assert settings.loss == entry.kernel
    for field, value in entry.fixed:
      assert getattr(settings, field) == value, (name, field)
    from_config = build.loss_settings(cfg, name)
    from_config.validate()
    assert (from_config.loss, from_config.topk_support) == (settings.loss, settings.topk_support)
    assert entry.description and "\n" not in entry.description
  assert build.loss_settings(cfg, "topk_student").topk_support == "student"
  with pytest.raises(ValueError, match="loss must be one of"):
    losses.settings_for("topk_both")
  # docs/configs.md lists exactly the registry's names as the allowed values of the field.
  rows = [
    line
    for line in (root / "docs" / "configs.md").read_text(encoding="utf-8").splitlines()
    if line.startswith("| `teachers.<name>.loss` |")
  ]
  assert len(rows) == 1, "docs/configs.md has no single row for teachers.<name>.loss"
  allowed = rows[0].strip().strip("|").split("|")[-1]
  assert re.findall(r"`([^`]+)`", allowed) == list(registry.NAMES), (
    "docs/configs.md: the allowed values of teachers.<name>.loss are not the registry's names "
    f"(jdistill/losses/registry.py) in its order: {registry.NAMES}"
  )

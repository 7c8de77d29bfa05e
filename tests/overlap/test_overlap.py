"""Support-overlap diagnostics (jdistill.overlap) and the overlap-aware loss."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill import losses, overlap

RTOL, ATOL = 1e-5, 1e-6


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _metrics(s, t, targets, **kw):
  out = overlap.overlap_token_metrics(
    jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(targets, jnp.int32), **kw
  )
  return {k: np.asarray(v) for k, v in out.items()}


# --------------------------------------------------------------------------- per-token metrics


def test_teacher_equals_student_full_overlap():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 16)) * 3
  targets = logits.argmax(-1)
  m = _metrics(logits, logits, targets, topks=(1, 8, 32), top_p=0.9, floor_prob=1e-3)
  for k in (1, 8, 32):
    np.testing.assert_array_equal(m[f"in_teacher_top{k}"], 1.0)
  np.testing.assert_array_equal(m["in_teacher_top_p"], 1.0)
  np.testing.assert_array_equal(m["off_support"], 0.0)
  np.testing.assert_allclose(m["reverse_kl"], 0.0, atol=1e-6)
  np.testing.assert_allclose(m["forward_kl"], 0.0, atol=1e-6)
  np.testing.assert_allclose(m["tv"], 0.0, atol=1e-6)
  np.testing.assert_allclose(m["teacher_logp"], m["student_logp"], rtol=RTOL, atol=ATOL)
  p = np.exp(np_log_softmax(logits))
  np.testing.assert_allclose(m["teacher_mass_on_student_top1"], p.max(-1), rtol=RTOL)
  np.testing.assert_allclose(
    m["teacher_mass_on_student_top8"], np.sort(p, -1)[..., ::-1][..., :8].sum(-1), rtol=RTOL
  )
  np.testing.assert_allclose(m["teacher_mass_on_student_top32"], 1.0, rtol=RTOL)  # k capped at V


def test_disjoint_supports_no_overlap():
  V = 8
  s = np.full((1, 4, V), -30.0)
  t = np.full((1, 4, V), -30.0)
  s[..., :4] = 0.0  # student: uniform on tokens A = {0..3}
  t[..., 4:] = 0.0  # teacher: uniform on tokens B = {4..7}
  targets = np.array([[0, 1, 2, 3]])
  m = _metrics(s, t, targets, topks=(1, 2, 4), top_p=0.9, floor_prob=1e-3, student_topks=(4,))
  for k in (1, 2, 4):
    np.testing.assert_array_equal(m[f"in_teacher_top{k}"], 0.0)
  np.testing.assert_array_equal(m["in_teacher_top_p"], 0.0)
  np.testing.assert_array_equal(m["off_support"], 1.0)
  np.testing.assert_allclose(m["tv"], 1.0, atol=1e-6)
  np.testing.assert_allclose(m["teacher_mass_on_student_top4"], 0.0, atol=1e-6)
  assert np.all(m["reverse_kl"] > 25) and np.all(m["forward_kl"] > 25)


def test_hand_computed_small_case():
  p_t = np.array([0.5, 0.25, 0.15, 0.1])
  p_s = np.array([0.1, 0.2, 0.3, 0.4])
  t = np.log(p_t)[None, None].repeat(4, 1)
  s = np.log(p_s)[None, None].repeat(4, 1)
  targets = np.array([[0, 1, 2, 3]])
  m = _metrics(s, t, targets, topks=(1, 2, 3), top_p=0.7, floor_prob=0.12)
  np.testing.assert_array_equal(m["in_teacher_top1"][0], [1, 0, 0, 0])
  np.testing.assert_array_equal(m["in_teacher_top2"][0], [1, 1, 0, 0])
  np.testing.assert_array_equal(m["in_teacher_top3"][0], [1, 1, 1, 0])
  # nucleus at 0.7: {0, 1} (0.5 + 0.25 >= 0.7)
  np.testing.assert_array_equal(m["in_teacher_top_p"][0], [1, 1, 0, 0])
  np.testing.assert_array_equal(m["off_support"][0], [0, 0, 0, 1])
  np.testing.assert_allclose(m["tv"][0], 0.45, rtol=1e-5)
  # student top-1 = {3}, top-2 = {3, 2}, top-3 = {3, 2, 1}
  np.testing.assert_allclose(m["teacher_mass_on_student_top1"][0], 0.1, rtol=1e-5)
  np.testing.assert_allclose(m["teacher_mass_on_student_top2"][0], 0.25, rtol=1e-5)
  np.testing.assert_allclose(m["teacher_mass_on_student_top3"][0], 0.5, rtol=1e-5)
  np.testing.assert_allclose(m["reverse_kl"][0], np.sum(p_s * np.log(p_s / p_t)), rtol=1e-5)
  np.testing.assert_allclose(m["forward_kl"][0], np.sum(p_t * np.log(p_t / p_s)), rtol=1e-5)
  np.testing.assert_allclose(m["teacher_logp"][0], np.log(p_t), rtol=1e-5)
  # nucleus at 0.95 holds every token but the last (0.5 + 0.25 + 0.15 = 0.9 < 0.95)
  m = _metrics(s, t, targets, topks=(1,), top_p=0.95, floor_prob=0.12)
  np.testing.assert_array_equal(m["in_teacher_top_p"][0], [1, 1, 1, 1])
  m = _metrics(s, t, targets, topks=(1,), top_p=0.4, floor_prob=0.12)
  np.testing.assert_array_equal(m["in_teacher_top_p"][0], [1, 0, 0, 0])


def test_top_p_matches_sorted_nucleus():
  rng = np.random.default_rng(7)
  V = 12
  t = rng.normal(size=(3, 50, V)) * rng.choice([0.3, 1.0, 4.0], size=(3, 50, 1))
  targets = rng.integers(0, V, size=(3, 50))
  for top_p in (0.3, 0.6, 0.9):
    m = _metrics(np.zeros_like(t), t, targets, topks=(1,), top_p=top_p)
    p = np.exp(np_log_softmax(t))
    expect = np.zeros(targets.shape)
    for idx in np.ndindex(*targets.shape):
      order = np.argsort(-p[idx])
      n = int(np.searchsorted(np.cumsum(p[idx][order]), top_p)) + 1  # smallest prefix >= top_p
      expect[idx] = targets[idx] in order[:n]
    np.testing.assert_array_equal(m["in_teacher_top_p"], expect)


def test_ties_count_inside():
  t = np.array([[[1.0, 1.0, 0.0, 0.0]]]).repeat(4, 1)
  targets = np.array([[0, 1, 2, 3]])
  m = _metrics(np.zeros_like(t), t, targets, topks=(1, 2, 3))
  np.testing.assert_array_equal(m["in_teacher_top1"][0], [1, 1, 0, 0])
  np.testing.assert_array_equal(m["in_teacher_top2"][0], [1, 1, 0, 0])
  np.testing.assert_array_equal(m["in_teacher_top3"][0], [1, 1, 1, 1])


def test_bad_args():
  x = jnp.zeros((1, 2, 4))
  tg = jnp.zeros((1, 2), jnp.int32)
  with pytest.raises(ValueError, match="top_p"):
    overlap.overlap_token_metrics(x, x, tg, top_p=0.0)
  with pytest.raises(ValueError, match="floor_prob"):
    overlap.overlap_token_metrics(x, x, tg, floor_prob=0.0)
  with pytest.raises(ValueError, match="topks"):
    overlap.overlap_token_metrics(x, x, tg, topks=(0,))
  with pytest.raises(ValueError, match="shape"):
    overlap.overlap_token_metrics(x, jnp.zeros((1, 2, 5)), tg)


# --------------------------------------------------------------------------- chunked


def _hidden_case(seed=0, B=2, T=7, Ds=6, Dt=5, V=13):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  return (
    f(B, T, Ds),
    f(Ds, V) * 2,
    f(B, T, Dt),
    f(Dt, V) * 3,
    jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32),
  )


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 7, 100])
def test_chunked_equals_unchunked(chunk_size):
  sh, su, th, tu, targets = _hidden_case()
  kw = dict(topks=(1, 4, 32), top_p=0.8, floor_prob=0.05)
  ref = overlap.overlap_token_metrics(
    losses.project_logits(sh, su), losses.project_logits(th, tu), targets, **kw
  )
  got = jax.jit(lambda *a: overlap.chunked_overlap_metrics(*a, chunk_size=chunk_size, **kw))(
    sh, su, th, tu, targets
  )
  assert set(got) == set(ref)
  for k in ref:
    assert got[k].shape == targets.shape
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_chunked_metrics_are_stop_gradiented():
  sh, su, th, tu, targets = _hidden_case()
  g = jax.grad(
    lambda h: overlap.chunked_overlap_metrics(h, su, th, tu, targets, chunk_size=3)[
      "reverse_kl"
    ].sum()
  )(sh)
  np.testing.assert_array_equal(g, 0.0)


# --------------------------------------------------------------------------- aggregation


def test_aggregate_matches_numpy_loop():
  rng = np.random.default_rng(1)
  B, T, G = 7, 6, 3
  per_token = {
    "teacher_logp": rng.normal(size=(B, T)),
    "in_teacher_top8": rng.integers(0, 2, (B, T)),
  }
  mask = (rng.random((B, T)) > 0.4).astype(np.float32)
  mask[2] = 0.0  # a sequence without tokens
  per_token["teacher_logp"][mask == 0] = np.nan  # never read where masked out
  group = np.array([0, 0, 1, 1, 0, 1, 1])
  got = overlap.aggregate(per_token, mask, group, G)
  for g in range(G):
    for key in per_token:
      vals, seq_means = [], []
      for b in range(B):
        if group[b] != g:
          continue
        row = [per_token[key][b, t] for t in range(T) if mask[b, t]]
        vals += row
        if row:
          seq_means.append(sum(row) / len(row))
      if vals:
        np.testing.assert_allclose(got[g]["token_mean"][key], sum(vals) / len(vals), rtol=1e-12)
        np.testing.assert_allclose(got[g]["sequence_mean"][key], np.mean(seq_means), rtol=1e-12)
        assert got[g]["tokens"] == len(vals)
        assert got[g]["sequences"] == len(seq_means)
        if key == "teacher_logp":
          for q in overlap.QUANTILES:
            np.testing.assert_allclose(
              got[g]["teacher_logp_quantiles"][f"p{q}"], np.percentile(vals, q), rtol=1e-12
            )
      else:  # group 2 is empty
        assert got[g]["tokens"] == 0 and math.isnan(got[g]["token_mean"][key])
  with pytest.raises(ValueError, match="group"):
    overlap.aggregate(per_token, mask, np.full(B, 3), G)


# --------------------------------------------------------------------------- alarms / readings


def test_alarms_name_the_teacher_and_fire_only_past_thresholds():
  kw = dict(min_overlap=0.5, min_nucleus_coverage=0.5)
  metrics = {
    "math": {"overlap": 0.9, "nucleus_coverage": 0.95, "in_teacher_top8": 0.0},
    "code": {"overlap": jnp.asarray(0.12), "nucleus_coverage": np.float32(0.8)},
  }
  alarms = overlap.overlap_alarms(metrics, **kw)
  assert len(alarms) == 1  # the raw top-8 coverage of 0 never fires
  assert "'code'" in alarms[0] and "12%" in alarms[0] and "1 - TV" in alarms[0]
  assert "50%" in alarms[0] and "warmup SFT" in alarms[0]
  # exactly at the thresholds: quiet
  assert overlap.overlap_alarms({"a": {"overlap": 0.5, "nucleus_coverage": 0.5}}, **kw) == []
  (msg,) = overlap.overlap_alarms({"b": {"overlap": 0.8, "nucleus_coverage": 0.35}}, **kw)
  assert "'b'" in msg and "35%" in msg and "nucleus" in msg
  # missing or NaN values never fire
  assert overlap.overlap_alarms({"c": {"in_teacher_top1": 0.0}}, **kw) == []
  assert overlap.overlap_alarms({"c": {"overlap": float("nan")}}, **kw) == []


def test_reading_verdicts():
  th = dict(
    min_overlap=0.5,
    min_nucleus_coverage=0.5,
    on_support_overlap=0.8,
    on_support_nucleus_coverage=0.9,
  )
  r = lambda o, n: overlap.reading({"overlap": o, "nucleus_coverage": n}, **th)  # noqa: E731
  assert r(0.95, 0.97)["verdict"] == "on-support"
  assert "reverse KL" in r(0.95, 0.97)["recommendation"]
  assert r(0.7, 0.97)["verdict"] == "partially on-support"
  assert r(0.95, 0.85)["verdict"] == "partially on-support"
  assert r(0.3, 0.97)["verdict"] == "off-support"
  assert "warmup SFT" in r(0.3, 0.97)["recommendation"]
  assert r(0.95, 0.3)["verdict"] == "off-support"


# ------------------------------------------------------------------- calibrated overlap metrics


def _logits_with_entropy(vocab: int, entropy: float, rows: int, seed: int) -> np.ndarray:
  """Random logits `[rows, vocab]` scaled so that each row's softmax has `entropy` nats."""
  z = np.random.RandomState(seed).standard_normal((rows, vocab)) * 3.0
  out = np.empty_like(z)
  for i in range(rows):
    lo, hi = 1e-3, 1e3  # inverse temperature: entropy falls as it grows
    for _ in range(100):
      mid = math.sqrt(lo * hi)
      p = np.exp(mid * z[i] - np.max(mid * z[i]))
      p /= p.sum()
      h = -np.sum(p * np.log(np.maximum(p, 1e-300)))
      lo, hi = (mid, hi) if h > entropy else (lo, mid)
    out[i] = mid * z[i]
  return out


def _calibrated(student_logits, teacher_logits, top_p=0.9):
  s = losses.log_softmax(jnp.asarray(student_logits, jnp.float32))
  t = losses.log_softmax(jnp.asarray(teacher_logits, jnp.float32))
  return {k: np.asarray(v) for k, v in losses.calibrated_overlap(s, t, top_p).items()}


CALIBRATED = ("overlap", "nucleus_coverage")


@pytest.mark.parametrize(
  "vocab,entropy", [(384, 0.5), (384, 3.0), (384, 5.5), (32000, 0.5), (32000, 5.0), (32000, 9.0)]
)
def test_calibrated_metrics_read_one_for_identical_distributions_at_any_entropy(vocab, entropy):
  logits = _logits_with_entropy(vocab, entropy, rows=4, seed=vocab)
  got = _calibrated(logits, logits)
  for key in CALIBRATED:
    np.testing.assert_allclose(got[key], 1.0, atol=0.02, err_msg=key)
  np.testing.assert_allclose(got["excess_xent"], 0.0, atol=0.02 * max(entropy, 1.0))
  # the raw metrics do not: at high entropy an identical student's tokens fall outside the
  # teacher's top-8 and below the floor (expectations over x ~ q, computed exactly)
  if entropy >= 5.0:
    t = losses.log_softmax(jnp.asarray(logits, jnp.float32))
    top8 = losses._topk_mask(t, 8)
    assert float(jnp.mean(jnp.sum(jnp.where(top8, jnp.exp(t), 0.0), -1))) < 0.5


@pytest.mark.parametrize("vocab", [384, 32000])
def test_calibrated_metrics_read_zero_for_disjoint_supports(vocab):
  z = np.random.RandomState(0).standard_normal((3, vocab))
  half = vocab // 2
  student, teacher = z.copy(), z.copy()
  student[:, half:] = -1e4  # student only on the first half, teacher only on the second
  teacher[:, :half] = -1e4
  got = _calibrated(student, teacher)
  for key in CALIBRATED:
    np.testing.assert_allclose(got[key], 0.0, atol=1e-6, err_msg=key)
  assert np.all(got["excess_xent"] > 100)


@pytest.mark.parametrize("vocab,entropy", [(384, 4.0), (32000, 8.0)])
def test_calibrated_metrics_fall_monotonically_with_a_domain_bias(vocab, entropy):
  """Teacher = student + α on a domain's tokens: overlap is 1 at α = 0 and falls with α,
  at a fixed entropy of the student."""
  student = _logits_with_entropy(vocab, entropy, rows=8, seed=1)
  domain = np.random.RandomState(2).choice(vocab, vocab // 20, replace=False)
  bias = np.zeros(vocab)
  bias[domain] = 1.0
  alphas = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
  reads = [_calibrated(student, student + a * bias) for a in alphas]
  for key in CALIBRATED:
    means = [float(np.mean(r[key])) for r in reads]
    assert means[0] > 0.98, (key, means)
    assert all(b < a for a, b in zip(means, means[1:])), (key, means)
    assert means[-1] < 0.5, (key, means)


def test_coverage_ks():
  assert overlap.coverage_ks(1000) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
  assert overlap.coverage_ks(100) == [1, 2, 4, 8, 16, 32, 64, 100]
  assert overlap.coverage_ks(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]


# --------------------------------------------------------------------------- overlap-aware loss


def _loss_case(seed=0, B=2, T=6, V=9, same=False):
  """Student unembedding = identity, so student hidden states ARE the student logits."""
  rng = np.random.default_rng(seed)
  s_logits = rng.normal(size=(B, T, V)) * 2
  t_logits = s_logits + 0.3 * rng.normal(size=(B, T, V)) if same else rng.normal(size=(B, T, V)) * 2
  targets = rng.integers(0, V, size=(B, T))
  mask = (rng.random((B, T)) > 0.2).astype(np.float32)
  mask[0, 0] = 1.0
  args = (
    jnp.asarray(s_logits, jnp.float32),
    jnp.eye(V, dtype=jnp.float32),
    jnp.asarray(t_logits, jnp.float32),
    jnp.eye(V, dtype=jnp.float32),
    jnp.asarray(targets, jnp.int32),
    jnp.asarray(mask),
  )
  return args, (s_logits, t_logits, targets, mask)


def _value_and_grad(loss_fn, args, **kw):
  settings = losses.LossSettings(**kw)
  f = lambda h, *rest: loss_fn(h, *rest, settings)  # noqa: E731
  (value, diag), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(*args)
  return float(value), np.asarray(grad), diag


def np_overlap_aware(s_logits, t_logits, targets, mask, gate):
  """float64 NumPy value and analytic gradient (w.r.t. student logits), token-mean."""
  s, t = np_log_softmax(s_logits), np_log_softmax(t_logits)
  q = np.exp(s)
  rkl = np.sum(q * (s - t), -1)
  s_x = np.take_along_axis(s, targets[..., None], -1)[..., 0]
  t_x = np.take_along_axis(t, targets[..., None], -1)[..., 0]
  adv = -(s_x - t_x)
  per_token = gate * rkl + (1 - gate) * (-adv * s_x)
  n = max(mask.sum(), 1.0)
  value = np.sum(mask * per_token) / n
  onehot = np.eye(s.shape[-1])[targets]
  g_rkl = q * (s - t - rkl[..., None])  # d RKL / d logits
  g_sampled = -adv[..., None] * (onehot - q)  # d (-sg(A) log q_x) / d logits
  grad = (mask * gate)[..., None] * g_rkl + (mask * (1 - gate))[..., None] * g_sampled
  return value, grad / n


@pytest.mark.parametrize(
  "criterion,kw,chunk",
  [
    ("teacher_topk", dict(overlap_topk=9), 4),
    ("floor", dict(overlap_floor_prob=0.0), 100),
    ("floor", dict(overlap_floor_prob=1e-30), 5),
  ],
)
def test_overlap_aware_equals_reverse_kl_when_all_on_support(criterion, kw, chunk):
  args, _ = _loss_case(same=True)
  v_ref, g_ref, _ = _value_and_grad(losses.distill_loss, args, loss="reverse_kl", chunk_size=chunk)
  v, g, diag = _value_and_grad(
    losses.distill_loss,
    args,
    loss="overlap_aware",
    chunk_size=chunk,
    overlap_criterion=criterion,
    **kw,
  )
  np.testing.assert_array_equal(diag["on_support"], 1.0)
  np.testing.assert_allclose(v, v_ref, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
  "criterion,kw",
  [("floor", dict(overlap_floor_prob=1.5)), ("floor", dict(overlap_floor_prob=1.0 + 1e-6))],
)
def test_overlap_aware_equals_sampled_token_when_nothing_on_support(criterion, kw):
  args, _ = _loss_case()
  v_ref, g_ref, _ = _value_and_grad(losses.distill_loss, args, loss="sampled_token", chunk_size=4)
  v, g, diag = _value_and_grad(
    losses.distill_loss, args, loss="overlap_aware", chunk_size=4, overlap_criterion=criterion, **kw
  )
  np.testing.assert_array_equal(diag["on_support"], 0.0)
  np.testing.assert_allclose(v, v_ref, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
  "criterion,kw,normalize",
  [
    ("teacher_topk", dict(overlap_topk=3), "token"),
    ("floor", dict(overlap_floor_prob=0.1), "token"),
    ("soft", dict(overlap_topk=2), "token"),
    ("teacher_topk", dict(overlap_topk=3), "sequence"),
  ],
)
def test_overlap_aware_mixed_matches_numpy(criterion, kw, normalize):
  args, (s_logits, t_logits, targets, mask) = _loss_case(seed=3)
  s, t = np_log_softmax(s_logits), np_log_softmax(t_logits)
  q = np.exp(s)
  if criterion == "teacher_topk":  # student mass on the teacher's top-k: context only
    top = np.argsort(-t, -1)[..., : kw["overlap_topk"]]
    gate = np.take_along_axis(q, top, -1).sum(-1)
  elif criterion == "floor":  # student mass on the tokens the teacher gives >= floor
    gate = np.sum(q * (np.exp(t) >= kw["overlap_floor_prob"]), -1)
  else:
    top = np.argsort(-s, -1)[..., : kw["overlap_topk"]]
    gate = np.take_along_axis(np.exp(t), top, -1).sum(-1)
  assert 0 < gate.min() and gate.max() < 1 and 0.1 < gate.mean() < 0.9  # genuinely mixed
  results = {}
  for name, fn in (("chunked", losses.distill_loss), ("unchunked", losses.unchunked_distill_loss)):
    results[name] = _value_and_grad(
      fn,
      args,
      loss="overlap_aware",
      chunk_size=4,
      overlap_criterion=criterion,
      normalize=normalize,
      **kw,
    )
  v, g, diag = results["chunked"]
  np.testing.assert_allclose(diag["on_support"], gate, rtol=1e-5, atol=1e-6)
  if normalize == "token":
    v_ref, g_ref = np_overlap_aware(s_logits, t_logits, targets, mask, gate)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)
  else:  # sequence mean of the per-token terms
    per_token = np.asarray(diag["per_token_loss"])
    seq = [
      (mask[b] * per_token[b]).sum() / mask[b].sum() for b in range(mask.shape[0]) if mask[b].sum()
    ]
    np.testing.assert_allclose(v, np.mean(seq), rtol=1e-5, atol=1e-6)
  v_u, g_u, _ = results["unchunked"]
  np.testing.assert_allclose(v, v_u, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g, g_u, rtol=1e-4, atol=1e-6)


def test_overlap_aware_finite_differences():
  args, (_, t_logits, targets, mask) = _loss_case(seed=5, B=1, T=3, V=5)
  kw = dict(loss="overlap_aware", chunk_size=2, overlap_criterion="teacher_topk", overlap_topk=2)
  _, g, diag = _value_and_grad(losses.distill_loss, args, **kw)
  gate = np.asarray(diag["on_support"])
  # Finite differences of the loss with the gate and advantage held fixed (they are
  # stop_gradient'ed): l = sum_t m_t (g_t RKL_t(h) + (1 - g_t) (-A_t) log q_x(h)) / sum m.
  s0 = np.asarray(args[0], np.float64)
  t = np_log_softmax(t_logits)
  s_x0 = np.take_along_axis(np_log_softmax(s0), targets[..., None], -1)[..., 0]
  adv = -(s_x0 - np.take_along_axis(t, targets[..., None], -1)[..., 0])

  def f(h):
    s = np_log_softmax(h)
    rkl = np.sum(np.exp(s) * (s - t), -1)
    s_x = np.take_along_axis(s, targets[..., None], -1)[..., 0]
    return np.sum(mask * (gate * rkl + (1 - gate) * (-adv * s_x))) / mask.sum()

  eps = 1e-6
  fd = np.zeros_like(s0)
  for idx in np.ndindex(*s0.shape):
    e = np.zeros_like(s0)
    e[idx] = eps
    fd[idx] = (f(s0 + e) - f(s0 - e)) / (2 * eps)
  np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-5)


def test_overlap_aware_validation_and_train_step_settings():
  from jdistill import config as config_lib
  from jdistill.runtime import build

  args, _ = _loss_case()
  aware = losses.LossSettings(loss="overlap_aware")
  with pytest.raises(ValueError, match="overlap_criterion"):
    losses.distill_loss(*args, aware.replace(overlap_criterion="nope"))
  with pytest.raises(ValueError, match="overlap_topk"):
    losses.distill_loss(*args, aware.replace(overlap_topk=0))
  with pytest.raises(ValueError, match="overlap_floor_prob"):
    losses.distill_loss(*args, aware.replace(overlap_criterion="floor", overlap_floor_prob=-1.0))
  assert "overlap_aware" in losses.LOSS_NAMES
  # exactly the settings the trainer builds from a config
  config = config_lib.base_config()
  config.loss.chunk_size = 4
  settings = build.loss_settings(config, "overlap_aware")
  assert settings.loss == "overlap_aware" and settings.chunk_size == 4
  value, diag = losses.distill_loss(*args, settings)
  assert np.isfinite(float(value)) and diag["on_support"].shape == args[4].shape


# --------------------------------------------------------------------------- the command


def _is_png(path):
  with open(path, "rb") as f:
    return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000


def test_command_end_to_end_on_toy_world(small_world, tmp_path, capsys):
  from jdistill.testing.toy import tiny_config

  world = small_world
  c = tiny_config(world)
  c.output_dir = str(tmp_path / "run")
  c.data.slots_per_teacher = 4
  c.sampling.max_new_tokens = 8
  c.loss.chunk_size = 8
  out = tmp_path / "overlap"
  report = overlap.run(c, out_dir=str(out), rows_per_domain=3)
  printed = capsys.readouterr().out
  print(printed)
  for name in ("overlap.json", "teacher_logp_hist.png", "topk_coverage.png"):
    assert (out / name).exists(), name
  assert _is_png(out / "teacher_logp_hist.png") and _is_png(out / "topk_coverage.png")
  data = json.loads((out / "overlap.json").read_text())
  assert set(data["teachers"]) == {"math", "code"} and set(data["domains"]) == {"math", "code"}
  for name in ("math", "code"):
    t = data["teachers"][name]
    assert t["sequences"] == 3 and 0 < t["tokens"] <= 3 * 8
    for key in (
      "overlap",
      "nucleus_coverage",
      "excess_xent",
      "teacher_logp",
      "in_teacher_top1",
      "in_teacher_top8",
      "in_teacher_top_p",
      "off_support",
      "reverse_kl",
      "forward_kl",
      "tv",
      "teacher_mass_on_student_top8",
    ):
      assert key in t["token_mean"] and key in t["sequence_mean"], key
    assert set(t["teacher_logp_quantiles"]) == {"p5", "p25", "p50", "p75", "p95"}
    curve = [t["coverage_curve"][str(k)] for k in data["coverage_ks"]]
    assert curve == sorted(curve) and curve[-1] <= 1.0
    assert t["reading"]["verdict"] in ("on-support", "partially on-support", "off-support")
    assert data["domains"][name]["teacher"] == name
    assert data["domains"][name]["tokens"] == t["tokens"]
    assert f"{name}:" in printed
  assert data["coverage_ks"][-1] == min(256, data["vocab"])
  assert isinstance(data["alarms"], list)
  # a random student against sharp random teachers is far off their support
  assert any("off-support" == data["teachers"][n]["reading"]["verdict"] for n in ("math", "code"))
  assert "per teacher" in printed and "reading" in printed and report["teachers"]


def test_command_reads_a_forked_teacher_on_support_and_a_random_one_off_support(
  small_world, tmp_path
):
  """The real pipeline on cases with a known answer: a teacher forked from the student (a
  small domain bias on its unembedding) is on-support; a sharp unrelated random teacher is
  off-support."""
  from jdistill.models import hf
  from jdistill.testing.toy import tiny_config

  world = small_world
  fork = hf.from_hf(world["student"])
  bias = np.zeros(fork.cfg.vocab_size, np.float32)
  bias[np.random.RandomState(0).choice(fork.cfg.vocab_size, 20, replace=False)] = 0.3
  fork.lm_head[...] = fork.lm_head[...].at[0].add(jnp.asarray(bias))
  tokenizer_dir = world["tokenizer"]
  from jdistill.data.tokenizer import load_tokenizer

  hf.to_hf(fork, str(tmp_path / "fork"), tokenizer=load_tokenizer(tokenizer_dir))
  c = tiny_config(world)
  c.output_dir = str(tmp_path / "run")
  c.teachers.math.path = str(tmp_path / "fork")  # forked; code stays an unrelated random teacher
  c.data.slots_per_teacher = 4
  c.sampling.max_new_tokens = 8
  c.loss.chunk_size = 8
  report = overlap.measure(c, rows_per_domain=4)
  math_t, code_t = report["teachers"]["math"], report["teachers"]["code"]
  print(
    {
      n: (t["token_mean"]["overlap"], t["token_mean"]["nucleus_coverage"])
      for n, t in report["teachers"].items()
    }
  )
  assert math_t["reading"]["verdict"] == "on-support", math_t["token_mean"]
  assert code_t["reading"]["verdict"] == "off-support", code_t["token_mean"]
  assert not any("'math'" in a for a in report["alarms"])
  assert any("'code'" in a for a in report["alarms"])


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])
def test_teacher_nucleus_equals_the_sorted_nucleus(top_p):
  logits = np.random.RandomState(4).standard_normal((6, 384)) * 2.5
  logits[0, 7] = 40.0  # one token holds nearly all the mass
  t = np_log_softmax(logits)
  got = np.asarray(losses.teacher_nucleus(jnp.asarray(t, jnp.float32), top_p))
  p = np.exp(t)
  for row in range(t.shape[0]):
    order = np.argsort(-p[row])
    mass_before = np.cumsum(p[row][order]) - p[row][order]
    want = np.zeros(t.shape[1], bool)
    want[order[mass_before < top_p]] = True
    np.testing.assert_array_equal(got[row], want)


# --------------------------------------------------------------------------- across tokenizers


def test_span_log_ratio_spreads_each_span_over_its_student_tokens():
  """Spans of 1-3 student tokens, a token without a span, a masked one and padding: each
  token's share of its span's log q − log p_T, so the token mean over the tokens with a span
  is Σ_spans (log q(σ) − log p_T(σ)) / tokens (the span loss's `reverse_kl`) and a row's
  mean its own."""
  rng = np.random.default_rng(3)
  span = np.array([[0, 0, 1, 2, 2, 2, -1, -1], [0, 1, 1, -1, 2, 3, 3, -1]])
  mask = np.array([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 0, 1, 1, 1, 1, 0]], np.float32)
  logq = rng.uniform(-5, 0, span.shape).astype(np.float32)
  logp = rng.uniform(-9, 0, span.shape).astype(np.float32)
  got = {
    k: np.asarray(v)
    for k, v in overlap.span_log_ratio(
      jnp.asarray(logq), jnp.asarray(logp), jnp.asarray(span), jnp.asarray(mask)
    ).items()
  }
  has = (span >= 0) & (mask != 0)
  want, counted = np.zeros(span.shape), np.zeros(span.shape[0])
  for r in range(span.shape[0]):
    for k in np.unique(span[r][has[r]]):
      toks = has[r] & (span[r] == k)
      k1 = logq[r][toks].sum() - logp[r, k]
      want[r][toks] = k1 / toks.sum()
      counted[r] += k1
  np.testing.assert_allclose(got["span_reverse_kl"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got["span_reverse_kl"][~has], 0.0)
  agg = overlap.aggregate(got, has, np.zeros(2, np.int32), 1)[0]
  np.testing.assert_allclose(agg["token_mean"]["span_reverse_kl"], counted.sum() / has.sum(), 1e-5)
  np.testing.assert_allclose(
    agg["token_mean"]["span_student_logp"] - agg["token_mean"]["span_teacher_logp"],
    agg["token_mean"]["span_reverse_kl"],
    rtol=1e-5,
  )


def test_matched_overlap_metrics_on_the_matched_vocabulary_plus_a_tail_bucket():
  """Student ids 0..5 of which 4 and 5 have no teacher token, a teacher tail: the metrics are
  those of the two distributions coarsened to {0, 1, 2, 3, anything else}, a sampled id
  without a match read as the bucket; with every id matched and no tail they are
  `overlap_token_metrics` on the student's vocabulary."""
  rng = np.random.default_rng(5)
  s = rng.normal(size=(3, 6)) * 2
  t_full = rng.normal(size=(3, 7)) * 2  # the teacher's 7 ids; 0..3 matched to student 0..3
  t_logp = np_log_softmax(t_full)
  matched = np.array([1, 1, 1, 1, 0, 0], bool)
  t_at = np.concatenate([t_logp[:, :4], np.zeros((3, 2))], axis=1)  # any value where unmatched
  tail = np.log(np.exp(t_logp[:, 4:]).sum(-1))
  targets = np.array([1, 4, 5])
  kw = dict(topks=(1, 2), top_p=0.9, floor_prob=1e-3, student_topks=(2,))
  got = overlap.matched_overlap_metrics(
    jnp.asarray(np_log_softmax(s), jnp.float32), jnp.asarray(t_at, jnp.float32),
    jnp.asarray(tail, jnp.float32), jnp.asarray(matched), jnp.asarray(targets), **kw,
  )  # fmt: skip
  q = np.exp(np_log_softmax(s))
  q_ext = np.concatenate([q[:, :4], q[:, 4:].sum(-1, keepdims=True)], axis=1)
  p_ext = np.concatenate([np.exp(t_logp[:, :4]), np.exp(tail)[:, None]], axis=1)
  bucket = np.array([1, 4, 4])
  want = _metrics(np.log(q_ext), np.log(p_ext), bucket, **kw)
  for k, v in want.items():
    np.testing.assert_allclose(np.asarray(got[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
  # every id matched, an empty tail: today's metrics
  t_same = rng.normal(size=(3, 6))
  got = overlap.matched_overlap_metrics(
    jnp.asarray(np_log_softmax(s), jnp.float32), jnp.asarray(np_log_softmax(t_same), jnp.float32),
    jnp.full((3,), -1e30), jnp.ones(6, bool), jnp.asarray(targets), **kw,
  )  # fmt: skip
  want = _metrics(s, t_same, targets, **kw)
  for k, v in want.items():
    np.testing.assert_allclose(np.asarray(got[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)

"""The sampled-token estimator across tokenizers (`losses.span`): its expected gradient by
exact enumeration of every student sequence on a toy pair of tokenizers, and the identity
with today's same-tokenizer kernel."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill import losses
from jdistill.data import alignment
from jdistill.losses.span import chunked_span_dense_loss, matched_reverse_kl_at
from jdistill.testing.tokenizers import ab_pair, qwen_like

T = 3  # student tokens per sequence: every one of 3**3 sequences is enumerated
TT = 2 * T  # the teacher's tokens of a sequence (each student token is at most 2 characters)
rng = np.random.RandomState(0)
THETA = rng.randn(4, 3).astype(np.float32)  # student bigram logits: row = previous token, 3 = BOS
PHI = 2.0 * rng.randn(5, 4)  # teacher bigram logits over its own 4 tokens, 4 = BOS


def log_softmax(x):
  return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def student_logp(theta, ys):
  """log q(x_t | x_{t-1}) of every token of ``ys [N, T]`` -> ``[N, T]`` (jax, differentiable)."""
  prev = jnp.concatenate([jnp.full((ys.shape[0], 1), 3), ys[:, :-1]], axis=1)
  return jnp.take_along_axis(jax.nn.log_softmax(theta)[prev], ys[..., None], axis=-1)[..., 0]


@pytest.fixture(scope="module")
def toy():
  """Every student sequence, aligned with the teacher: ids, span ids, teacher log-probs."""
  s_tok, t_tok = ab_pair()
  student, teacher = alignment.Vocab.of(s_tok), alignment.Vocab.of(t_tok)
  ys = np.asarray(list(itertools.product(range(3), repeat=T)), np.int32)
  n = len(ys)
  s_span = np.zeros((n, T), np.int32)
  t_span = np.full((n, TT), -1, np.int32)
  t_logp = np.zeros((n, TT), np.float32)
  rows = []
  teacher_table = log_softmax(PHI)
  for r, y in enumerate(ys):
    row = alignment.align_row(student, teacher, y)
    rows.append(row)
    prev = np.concatenate([[4], row.teacher_ids[:-1]])
    m = len(row.teacher_ids)
    t_logp[r, :m] = teacher_table[prev, row.teacher_ids]
    t_span[r, :m] = row.teacher_span
    s_span[r] = row.student_span
  return dict(ys=ys, rows=rows, s_span=s_span, t_span=t_span, t_logp=t_logp)


def expected_gradient(toy, temperature=1.0, **kw):
  """E_{y~π}[Σ_t ∇l_t] through the real kernel: all sequences in one batch, each weighted by
  π(y) through the mask ("constant" normalisation divides by the N·T entries); π is the
  student at ``temperature`` (1: on-policy, π = q, r = 1)."""
  ys = jnp.asarray(toy["ys"])
  log_pi = student_logp(jnp.asarray(THETA) / temperature, ys)
  pi_y = np.exp(np.asarray(log_pi).sum(1))
  weights = jnp.asarray(np.repeat(pi_y[:, None], T, 1), jnp.float32)

  def loss(theta):
    s = student_logp(theta, ys)
    value, _ = losses.span_sampled_token_loss(
      s,
      jnp.asarray(toy["t_logp"]),
      jnp.asarray(toy["s_span"]),
      jnp.asarray(toy["t_span"]),
      weights,
      behaviour_logp=log_pi,
      normalize="constant",
      **kw,
    )
    return value

  return np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(THETA)), np.float64) * ys.size


def span_objective_gradient(toy, temperature=1.0):
  """∇J, J = Σ_k E_{h~π}[KL(q(σ | h) ‖ p_T(σ | h))] with the history distribution (π: the
  student at ``temperature``) held fixed, summed over the distinct (history, span) pairs of
  the enumeration (docs/design.md)."""
  pairs = {}  # (h, σ) -> log p_T(σ | h): the teacher's log-probs of the span's own tokens
  for y, row, t_logp in zip(toy["ys"], toy["rows"], toy["t_logp"], strict=True):
    for k in range(row.n_spans):
      s_idx = np.flatnonzero(row.student_span == k)
      key = (tuple(y[: s_idx[0]]), tuple(y[s_idx[0] : s_idx[-1] + 1]))
      log_p = float(t_logp[np.flatnonzero(row.teacher_span == k)].sum())
      # the toy's teacher never retokenises a finished span: the same pair, the same p
      assert pairs.setdefault(key, log_p) == pytest.approx(log_p, abs=1e-6)

  histories = sorted({h for h, _ in pairs})

  def padded(seqs, first_prev):
    """tokens, previous tokens and mask ``[P, T]`` of token tuples; the first token's previous
    token is ``first_prev[i]``."""
    x, prev, m = (np.zeros((len(seqs), T), np.int32) for _ in range(3))
    for i, seq in enumerate(seqs):
      x[i, : len(seq)] = seq
      prev[i, : len(seq)] = (first_prev[i], *seq[:-1])
      m[i, : len(seq)] = 1
    return jnp.asarray(x), jnp.asarray(prev), jnp.asarray(m)

  keys = list(pairs)
  hist = padded([h for h, _ in keys], [3] * len(keys))
  span = padded([sigma for _, sigma in keys], [h[-1] if h else 3 for h, _ in keys])
  log_p = jnp.asarray([pairs[k] for k in keys])
  which = jnp.asarray([histories.index(h) for h, _ in keys])

  def logq(theta, x, prev, m):
    return jnp.sum(m * jax.nn.log_softmax(theta)[prev, x], axis=1)

  def j(theta):
    log_h = jax.lax.stop_gradient(logq(theta / temperature, *hist))
    log_sigma = logq(theta, *span)
    total = jnp.sum(jnp.exp(log_h + log_sigma) * (log_sigma - log_p))
    return total, jax.ops.segment_sum(jnp.exp(log_sigma), which, len(histories))

  grad, per_history = jax.jit(jax.grad(j, has_aux=True))(jnp.asarray(THETA))
  # the spans after each history are a complete set of alternatives: q(σ | h) sums to 1
  np.testing.assert_allclose(per_history, 1.0, rtol=1e-5)
  return np.asarray(grad, np.float64), pairs


@pytest.mark.parametrize("kw", [{}, dict(clip_eps=0.2, icepop_c=2.0)])
def test_span_estimator_is_the_per_span_reverse_kl_in_expectation(toy, kw):
  want, pairs = span_objective_gradient(toy)
  # a real cross-tokenizer toy: spans of two student tokens and spans of two teacher tokens
  assert any(len(sigma) == 2 for _, sigma in pairs)
  assert any(np.bincount(r.teacher_span).max() == 2 for r in toy["rows"])
  np.testing.assert_allclose(expected_gradient(toy, **kw), want, rtol=1e-5, atol=1e-6)


def test_off_policy_the_span_ratio_keeps_the_objective_and_the_token_ratio_does_not(toy):
  """Under a tempered sampler π (histories from π, held fixed): with ratio="span"
  (q(σ)/π(σ) of the token's whole span) the expectation is still ∇J; today's per-token ratio
  corrects only token t's own factor, not the other tokens of its span, and misses ∇J by a
  clear margin (the same-tokenizer estimator does not: test_estimators.py)."""
  want, _ = span_objective_gradient(toy, temperature=0.7)
  np.testing.assert_allclose(
    expected_gradient(toy, temperature=0.7, ratio="span"), want, rtol=1e-5, atol=1e-6
  )
  token = expected_gradient(toy, temperature=0.7)
  assert np.abs(token - want).max() > 0.05 * np.abs(want).max()


def test_a_teacher_with_the_students_tokenizer_through_the_span_path_is_todays_loss():
  """Same loss and gradients as `distill_loss`'s sampled-token path (ratio, clip, IcePop)."""
  tok = qwen_like()
  vocab = len(tok)
  student, teacher = alignment.Vocab.of(tok), alignment.Vocab.of(tok)
  b, t, d = 2, 8, 16
  r = np.random.RandomState(1)
  # a rollout that is not the canonical tokenisation of its text ("d", "e", "f" for "def")
  ids = [student.byte_ids[ord(c)] for c in "def xyz!"]
  targets = np.asarray([ids, ids[:5] + [0, 0, 0]], np.int32)
  mask = np.asarray([[1] * 8, [1] * 5 + [0] * 3], np.float32)
  aligned = alignment.align_batch(student, teacher, targets, mask, teacher_len=t)
  np.testing.assert_array_equal(aligned["teacher_ids"], targets * mask)
  sh = jnp.asarray(r.randn(b, t, d), jnp.float32)
  su = jnp.asarray(r.randn(d, vocab) * 0.5, jnp.float32)
  th = jnp.asarray(r.randn(b, t, d), jnp.float32)
  tu = jnp.asarray(r.randn(d, vocab) * 0.5, jnp.float32)
  su_logp = losses.token_logprobs(sh, su, jnp.asarray(targets), chunk_size=None)
  behaviour = su_logp + jnp.asarray(r.uniform(-0.6, 0.6, (b, t)), jnp.float32)  # some clipped
  settings = losses.LossSettings(loss="sampled_token", clip_eps=0.2, icepop_c=1.6, chunk_size=4)

  def today(sh, su):
    value, _ = losses.distill_loss(
      sh, su, th, tu, jnp.asarray(targets), jnp.asarray(mask), settings, behaviour_logp=behaviour
    )
    return value

  def across(sh, su):
    s = losses.token_logprobs(sh, su, jnp.asarray(targets), chunk_size=None)
    p = losses.token_logprobs(th, tu, jnp.asarray(aligned["teacher_ids"]), chunk_size=None)
    value, aux = losses.span_sampled_token_loss(
      s,
      p,
      jnp.asarray(aligned["student_span"]),
      jnp.asarray(aligned["teacher_span"]),
      jnp.asarray(mask),
      behaviour_logp=behaviour,
      clip_eps=0.2,
      icepop_c=1.6,
    )
    return value, aux

  (want, want_grads) = jax.jit(jax.value_and_grad(today, argnums=(0, 1)))(sh, su)
  grad_fn = jax.jit(jax.value_and_grad(across, argnums=(0, 1), has_aux=True))
  (got, aux), got_grads = grad_fn(sh, su)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for g, w in zip(got_grads, want_grads, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)
  assert 0 < float(aux["clip_fraction"]) and float(aux["icepop_masked"].sum()) > 0  # both bite


def test_dense_across_tokenizers_matches_numpy_values_and_gradients():
  """Single spans: reverse KL on the matched vocabulary plus a tail bucket; other spans: the
  span sampled-token term. Against float64 NumPy, with the gradient written out by hand."""
  from jdistill.testing.tokenizers import llama3_like

  student, teacher = alignment.Vocab.of(qwen_like()), alignment.Vocab.of(llama3_like())
  vmap = alignment.vocab_map(student, teacher)
  assert vmap[student.eos] == teacher.eos and (vmap < 0).sum() == 2
  b, t, tt = 2, 16, 16
  targets, mask = np.zeros((b, t), np.int32), np.zeros((b, t), np.float32)
  for r, text in enumerate(["Grüße 東京 x  def", "ok 🙂"]):
    ids = qwen_like().encode(text)[: t - 1] + [student.eos]
    targets[r, : len(ids)], mask[r, : len(ids)] = ids, 1
  al = alignment.align_batch(student, teacher, targets, mask, teacher_len=tt)
  r = np.random.RandomState(2)
  zs = r.randn(b, t, len(student.pieces)) + 3.0 * (vmap < 0)  # mass on the unmatched ids
  zt = 2.0 * r.randn(b, tt, len(teacher.pieces))

  def loss(z):
    value, aux = losses.span_dense_loss(
      z,
      jnp.asarray(zt, jnp.float32),
      jnp.asarray(targets),
      jnp.asarray(al["teacher_ids"]),
      jnp.asarray(al["student_span"]),
      jnp.asarray(al["teacher_span"]),
      jnp.asarray(al["single"]),
      jnp.asarray(vmap),
      jnp.asarray(mask),
    )
    return value, aux

  (got, aux), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.asarray(zs, jnp.float32))

  # float64 NumPy reference
  lq, lp = log_softmax(zs), log_softmax(zt)
  matched = vmap >= 0
  want, want_grad, count, n_dense = 0.0, np.zeros_like(zs), 0, 0
  for i in range(b):
    s_span, t_span = al["student_span"][i], al["teacher_span"][i]
    for pos in np.flatnonzero((s_span >= 0) & (mask[i] > 0)):
      k, q = s_span[pos], np.exp(lq[i, pos])
      count += 1
      if al["single"][i, k]:
        n_dense += 1
        p = np.exp(lp[i, np.flatnonzero(t_span == k)[0]])
        p_m, q_m = p[vmap[matched]], q[matched]
        q_tail, p_tail = 1 - q_m.sum(), 1 - p_m.sum()
        want += np.sum(q_m * np.log(q_m / p_m)) + q_tail * np.log(q_tail / p_tail)
        g = np.where(matched, np.log(q / p[np.maximum(vmap, 0)]), np.log(q_tail / p_tail))
        want_grad[i, pos] += q * (g - np.sum(q * g))  # ∂/∂z of Σ_v q_v g_v's KL
      else:
        teacher_tok = np.flatnonzero(t_span == k)
        student_tok = np.flatnonzero(s_span == k)
        log_p = lp[i, teacher_tok, al["teacher_ids"][i, teacher_tok]].sum()
        log_q = lq[i, student_tok, targets[i, student_tok]].sum()
        advantage = log_p - log_q
        want += -advantage * lq[i, pos, targets[i, pos]]
        want_grad[i, pos] += -advantage * (np.eye(len(q))[targets[i, pos]] - q)
  assert 0 < n_dense < count and float(aux["dense"].sum()) == n_dense  # both branches
  np.testing.assert_allclose(float(got), want / count, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), want_grad / count, rtol=2e-4, atol=1e-6)


def test_dense_with_the_students_tokenizer_is_todays_full_vocab_reverse_kl():
  """Every span single, every id matched, no tail: `distill_loss`'s reverse KL."""
  tok = qwen_like()
  vocab = alignment.Vocab.of(tok)
  vmap = alignment.vocab_map(vocab, alignment.Vocab.of(tok))
  np.testing.assert_array_equal(vmap, np.arange(len(tok)))
  targets = np.asarray([tok.encode("ab cd!")[:4], tok.encode("x y")[:2] + [0, 0]], np.int32)
  mask = np.asarray([[1, 1, 1, 1], [1, 1, 0, 0]], np.float32)
  al = alignment.align_batch(vocab, vocab, targets, mask, teacher_len=4)
  r = np.random.RandomState(3)
  d = 8
  sh, su = (
    jnp.asarray(r.randn(2, 4, d), jnp.float32),
    jnp.asarray(r.randn(d, len(tok)), jnp.float32),
  )
  th, tu = (
    jnp.asarray(r.randn(2, 4, d), jnp.float32),
    jnp.asarray(r.randn(d, len(tok)), jnp.float32),
  )
  settings = losses.LossSettings(loss="reverse_kl", chunk_size=None)

  def today(sh):
    return losses.distill_loss(sh, su, th, tu, jnp.asarray(targets), jnp.asarray(mask), settings)[0]

  def across(sh):
    value, _ = losses.span_dense_loss(
      sh @ su,
      th @ tu,
      jnp.asarray(targets),
      jnp.asarray(al["teacher_ids"]),
      jnp.asarray(al["student_span"]),
      jnp.asarray(al["teacher_span"]),
      jnp.asarray(al["single"]),
      jnp.asarray(vmap),
      jnp.asarray(mask),
    )
    return value

  want, want_grad = jax.jit(jax.value_and_grad(today))(sh)
  got, got_grad = jax.jit(jax.value_and_grad(across))(sh)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got_grad), np.asarray(want_grad), rtol=1e-4, atol=1e-6)


def test_a_tiny_teacher_tail_is_summed_not_subtracted():
  """The teacher's mass on its unmatched ids is 2e-14 while the student's is 0.2: the tail
  term q̄ log(q̄ / p̄) ≈ 6.0 and the KL 5.9 (float64). As `1 − p(matched)` in float32 p̄ reads
  0 or 6e-8, and the KL 17.1 or 3 (what the stage's comparison with the full logits first
  showed)."""
  vocab_map = np.asarray([0, 1, 2, 3, -1, -1])  # student ids 4, 5: no teacher token
  zs = np.log(np.asarray([0.2, 0.2, 0.2, 0.2, 0.1, 0.1]))
  zt = np.asarray([0.0, 0.5, 1.0, 1.5, -30.0, -30.0])  # teacher ids 4, 5: unmatched
  lq, lp = log_softmax(zs), log_softmax(zt)
  q, p = np.exp(lq), np.exp(lp)
  q_tail, p_tail = q[4:].sum(), p[4:].sum()
  want = np.sum(q[:4] * (lq[:4] - lp[:4])) + q_tail * np.log(q_tail / p_tail)
  got = losses.matched_reverse_kl(
    jnp.asarray(lq, jnp.float32), jnp.asarray(lp, jnp.float32), jnp.asarray(vocab_map)
  )
  assert p_tail < 1e-12 and want > 5.0
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_dense_with_a_matched_set_per_token_is_the_coarsened_kl_at_each_token():
  """The marginal reading gives `matched` per token `[B, T, Vs]`: the chunked kernel's dense
  term at each token is the KL between the two distributions coarsened to *that token's*
  matched ids plus a tail (float64 NumPy), and its gradient is the unchunked per-token
  `matched_reverse_kl_at`'s."""
  r = np.random.RandomState(5)
  b, t, d, v = 2, 7, 6, 11
  hidden, unembed = r.randn(b, t, d), r.randn(d, v)
  matched = r.rand(b, t, v) < 0.6
  matched[..., 0] = True
  zt = 2.0 * r.randn(b, t, v + 1)  # the teacher's v ids, then its tail
  lp = log_softmax(np.concatenate([np.where(matched, zt[..., :v], -np.inf), zt[..., v:]], -1))
  mask = np.ones((b, t), np.float32)
  mask[1, 5:] = 0
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  args = dict(
    teacher_hidden_at=jnp.zeros((b, t, 1)), teacher_unembed_at=jnp.zeros((1, v)),
    targets=jnp.zeros((b, t), jnp.int32), teacher_span_logp=jnp.zeros((b, t)),
    teacher_tail_logp=f32(lp[..., v]), student_span=jnp.broadcast_to(jnp.arange(t), (b, t)),
    gate=jnp.ones((b, t)), matched=jnp.asarray(matched), mask=jnp.asarray(mask),
    teacher_logp_at=f32(np.where(matched, lp[..., :v], 0.0)),
  )  # fmt: skip

  def chunked(h):
    return chunked_span_dense_loss(h, f32(unembed), chunk_size=3, **args)[0]

  def unchunked(h):
    s = jax.nn.log_softmax(h @ f32(unembed), axis=-1)
    kl = matched_reverse_kl_at(s, args["teacher_logp_at"], matched, args["teacher_tail_logp"])
    return jnp.sum(kl * mask) / mask.sum()

  lq = log_softmax(hidden @ unembed)
  q = np.exp(lq)
  q_tail = np.where(matched, 0.0, q).sum(-1)
  kl = np.where(matched, q * (lq - np.where(matched, lp[..., :v], 0.0)), 0.0).sum(-1)
  kl += q_tail * (np.log(q_tail) - lp[..., v])
  got, grad = jax.value_and_grad(chunked)(f32(hidden))
  np.testing.assert_allclose(float(got), (kl * mask).sum() / mask.sum(), rtol=1e-5)
  np.testing.assert_allclose(grad, jax.grad(unchunked)(f32(hidden)), rtol=1e-4, atol=1e-6)

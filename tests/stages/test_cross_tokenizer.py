"""A teacher of another tokenizer in the OPD stage: the span path equals today's sampled-token
path when the tokenizers agree, and a student learns from a teacher of another tokenizer."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from jdistill import config as config_lib
from jdistill.data.tokenizer import train_tiny_tokenizer
from jdistill.models import ModelConfig
from jdistill.stages import opd as train
from jdistill.step import opd as ts
from jdistill.testing.toy import random_model_dir, short_run_config, tiny_config


def _rollouts(trainer, new_tokens: int, seed: int = 0):
  """A rollout batch on the next prompts without the sampler (nothing to compile): random
  completions of 3..`new_tokens` ids and random behaviour log-probs -> (batch, prompts)."""
  rng = np.random.default_rng(seed)
  prompts = next(trainer.data_iter)
  p_tok, p_len = prompts["prompt_tokens"], prompts["prompt_lengths"]
  rows, width = p_tok.shape[0], p_tok.shape[1] + new_tokens
  tokens = np.zeros((rows, width), np.int32)
  mask = np.zeros((rows, width), np.float32)
  n = rng.integers(3, new_tokens + 1, rows)
  for r in range(rows):
    p = int(p_len[r])
    tokens[r, :p] = p_tok[r, :p]
    tokens[r, p : p + n[r]] = rng.integers(5, len(trainer.tokenizer), n[r])
    mask[r, p : p + n[r]] = 1
  behaviour = np.where(mask > 0, rng.uniform(-4.0, -0.5, mask.shape), 0.0).astype(np.float32)
  batch = dict(
    tokens=tokens, completion_mask=mask, logprobs=behaviour, sampling_logprobs=behaviour,
    lengths=(p_len + n).astype(np.int32),
  )  # fmt: skip
  return {k: jax.numpy.asarray(v) for k, v in batch.items()}, prompts


@pytest.mark.parametrize(
  "through_spans, loss, match",
  [
    (("code",), "sampled_token", "token"),
    (("math", "code"), "sampled_token", "token"),
    (("code",), "reverse_kl", "token"),
    (("code",), "reverse_kl", "prefix"),
  ],
)
def test_same_tokenizer_through_the_span_path_gives_todays_loss_and_gradients(
  small_world, tmp_path, through_spans, loss, match
):
  """`teachers.<name>.tokenizer` = the student's own sends a teacher through the span path
  (host alignment, its own forward, span sums): one span per token, so on the same rollouts
  the objective, each teacher's term and the gradients are today's path's — sampled-token
  (with the PPO clip on, and behaviour log-probs that are not the student's, so the ratio is
  not 1) or the dense reverse KL (every span single, every id matched: no tail) — with a
  plain teacher beside it in the same step, or with both teachers on spans (each its own rows
  and layout)."""
  c = short_run_config(small_world, tmp_path, steps=1, eval_every=0)
  c.num_devices = 1
  c.loss.clip_eps = 0.2
  for name in ("math", "code"):
    c.teachers[name].loss = loss
  for name in through_spans:
    c.teachers[name].tokenizer = small_world["tokenizer"]
    c.teachers[name].dense_match = match  # prefix: each token its own group
  trainer = train.OPDTrainer(c)
  t = trainer.teachers
  names = config_lib.teacher_names(c)
  assert [x.index for x in t.cross] == [i for i, n in enumerate(names) if n in through_spans]
  batch, prompts = _rollouts(trainer, c.sampling.max_new_tokens)
  batch = trainer.with_teacher_layouts(batch, prompts, trainer.batcher)
  assert "teacher_layouts" in batch
  cache = trainer.teacher_cache(batch)  # takes the layouts out of the batch
  assert set(cache) == {x.index for x in t.cross} and "teacher_layouts" not in batch
  # today's path: each such teacher resident in its own group, a plain sampled-token spec
  today = dict(
    teacher_graphdefs=(*t.graphdefs, *(x.graphdef for x in t.cross)),
    teacher_states=(*t.states, *(x.state for x in t.cross)),
    specs=tuple(dataclasses.replace(s, spans=False) for s in t.specs),
    groups=(*t.groups, *((x.index,) for x in t.cross)),
    teacher_cache={},
  )
  spans = dict(
    teacher_graphdefs=t.graphdefs,
    teacher_states=t.states,
    specs=t.specs,
    groups=t.groups,
    teacher_cache=cache,
  )
  results = {}
  for name, kw in (("today", today), ("spans", spans)):

    def objective(params, kw=kw):
      return ts.distill_objective(
        params, trainer.graphdef, batch=batch, diagnostics=False,
        loss_window=c.sampling.max_new_tokens, **kw,
      )  # fmt: skip

    (loss, metrics), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(trainer.params)
    terms = {n: float(metrics[n]["loss"]) for n in ("math", "code")}
    clipped = {n: float(metrics[n].get("clip_fraction", 0.0)) for n in ("math", "code")}
    results[name] = (float(loss), terms, jax.device_get(grads), clipped)
  (loss0, terms0, g0, clip0), (loss1, terms1, g1, clip1) = results["today"], results["spans"]
  for n in ("math", "code"):
    assert terms0[n] != 0.0 and (loss != "sampled_token" or 0.0 < clip1[n] < 1.0)
    np.testing.assert_allclose(clip1[n], clip0[n], rtol=1e-6)
    np.testing.assert_allclose(terms1[n], terms0[n], rtol=1e-5)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g1, g0)


@pytest.fixture(scope="module")
def other_teacher(small_world, tmp_path_factory):
  """A sharp random teacher (width 32, 1 layer) that leans towards digits, on a byte-level
  BPE trained on the world's prompts to another size than the student's (other merges)."""
  root = tmp_path_factory.mktemp("other_teacher")
  texts = [json.loads(line)["prompt"] for line in open(small_world["train"])] * 4
  tokenizer = train_tiny_tokenizer(str(root / "tokenizer"), texts, vocab_size=300)
  cfg = ModelConfig(
    model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
    num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
  )  # fmt: skip
  digits = sorted({i for d in "0123456789" for i in tokenizer.encode(d)})
  path = random_model_dir(
    str(root / "model"), cfg, 7, tokenizer, unembed_scale=1.0, preferred_ids=digits,
    preference=10.0,
  )  # fmt: skip
  return {"path": path, "tokenizer": str(root / "tokenizer")}


def test_dense_loss_across_tokenizers_in_the_step_is_the_kernel_on_full_logits(
  small_world, other_teacher, tmp_path
):
  """A teacher of another tokenizer with `loss = reverse_kl`: the step's term (host alignment,
  the scorer's gathered teacher states, the loss window, the chunked kernel) equals
  `losses.span_dense_loss` (tested against float64 NumPy) on the full logits of both models'
  own forwards, in value and every gradient; both branches (single spans and others) are hit."""
  from flax import nnx

  from jdistill.data import alignment
  from jdistill.losses import span_dense_loss
  from jdistill.step import common

  c = short_run_config(small_world, tmp_path, steps=1, eval_every=0)
  c.num_devices = 1
  c.loss.clip_eps = 0.2
  c.loss.chunk_size = 8  # several chunks over the window
  del c.teachers["math"]
  c.teachers.code.update(
    path=other_teacher["path"], tokenizer=other_teacher["tokenizer"], domains="math,code",
    loss="reverse_kl", length_ratio=3.0, param_dtype="float32",  # no bf16 rounding to compare
  )  # fmt: skip
  trainer = train.OPDTrainer(c)
  t = trainer.teachers
  (x,) = t.cross
  batch, prompts = _rollouts(trainer, c.sampling.max_new_tokens, seed=1)
  batch = trainer.with_teacher_layouts(batch, prompts, trainer.batcher)
  layout = batch["teacher_layouts"][x.index]
  cache = trainer.teacher_cache(batch)

  def step_term(params):
    _, metrics = ts.distill_objective(
      params, trainer.graphdef, t.graphdefs, t.states, batch, t.specs, t.groups,
      diagnostics=False, teacher_cache=cache, loss_window=c.sampling.max_new_tokens,
    )  # fmt: skip
    return metrics["code"]["loss"], metrics["code"]

  vmap = alignment.vocab_map(x.student, x.teacher)
  teacher = nnx.merge(x.graphdef, x.state)
  tt = jax.numpy.asarray(layout["tokens"])
  t_pos = jax.numpy.broadcast_to(jax.numpy.arange(tt.shape[1] - 1), (tt.shape[0], tt.shape[1] - 1))
  t_len = layout["prompt_lengths"] + layout["completion_lengths"]
  t_hidden, _ = teacher(tt[:, :-1], t_pos, kv_mask=t_pos < t_len[:, None])
  t_logits = jax.numpy.dot(t_hidden, teacher.unembedding(), preferred_element_type=np.float32)

  def reference(params):
    inputs = common.shifted_inputs(batch)
    rows = lambda a: common.take_rows(a, x.rows)  # noqa: E731
    student = nnx.merge(trainer.graphdef, params)
    hidden, _ = student(rows(inputs["inputs"]), rows(inputs["positions"]),
                        kv_mask=rows(inputs["kv_mask"]))  # fmt: skip
    return span_dense_loss(
      hidden @ student.unembedding(), t_logits, rows(inputs["targets"]), tt[:, 1:],
      layout["student_span"][:, 1:], layout["teacher_span"][:, 1:], layout["single"][:, :-1],
      vmap, rows(inputs["mask"]), behaviour_logp=rows(inputs["behaviour_logp"]), clip_eps=0.2,
    )  # fmt: skip

  (got, metrics), g_got = jax.jit(jax.value_and_grad(step_term, has_aux=True))(trainer.params)
  (want, aux), g_want = jax.jit(jax.value_and_grad(reference, has_aux=True))(trainer.params)
  dense = float(metrics["dense_tokens"])
  assert 0.1 < dense < 0.9 and float(aux["dense"].sum()) > 0, dense  # both branches
  assert float(metrics["dropped_tokens"]) == 0.0
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g_got, g_want)


def _dense_trainer(small_world, other_teacher, tmp_path, match: str):
  """A one-device trainer whose one teacher is `other_teacher` with the dense loss read by
  `match`, in float32 (no bf16 rounding to compare) -> (trainer, its `CrossTeacher`)."""
  c = short_run_config(small_world, tmp_path, steps=1, eval_every=0)
  c.num_devices = 1
  del c.teachers["math"]
  c.teachers.code.update(
    path=other_teacher["path"], tokenizer=other_teacher["tokenizer"], domains="math,code",
    loss="reverse_kl", dense_match=match, length_ratio=3.0, param_dtype="float32",
  )  # fmt: skip
  trainer = train.OPDTrainer(c)
  (x,) = trainer.teachers.cross
  return trainer, x


def _teacher_logp(x, layout):
  """The teacher's float64 log-softmax `[S, Lt-1, Vt]` from its own forward on its `layout`
  (`cross_tokenizer.layouts`), for references built outside the scorer."""
  from flax import nnx
  from scipy.special import logsumexp

  teacher = nnx.merge(x.graphdef, x.state)
  tt = jax.numpy.asarray(layout["tokens"])
  t_pos = jax.numpy.broadcast_to(jax.numpy.arange(tt.shape[1] - 1), (tt.shape[0], tt.shape[1] - 1))
  t_len = layout["prompt_lengths"] + layout["completion_lengths"]
  t_hidden, _ = teacher(tt[:, :-1], t_pos, kv_mask=t_pos < t_len[:, None])
  logits = np.asarray(t_hidden @ teacher.unembedding(), np.float64)
  return logits - logsumexp(logits, axis=-1, keepdims=True)


def test_the_prefix_reading_is_the_teachers_mass_by_the_student_token_its_text_begins_with(
  small_world, other_teacher, tmp_path
):
  """`dense_match = "prefix"`: at each student position whose span is single, the scorer's
  `logp_at[v]` is the log of the teacher's mass (float64 NumPy, from its full logits at the
  span's teacher position) on the tokens grouped under student id v by `prefix_map`, the tail
  the mass in no group, and the groups plus the tail hold all of it."""
  from scipy.special import logsumexp

  trainer, x = _dense_trainer(small_world, other_teacher, tmp_path, "prefix")
  batch, prompts = _rollouts(trainer, trainer.config.sampling.max_new_tokens, seed=2)
  batch = trainer.with_teacher_layouts(batch, prompts, trainer.batcher)
  layout = batch["teacher_layouts"][x.index]
  entry = jax.device_get(trainer.teacher_cache(batch)[x.index])
  logp = _teacher_logp(x, layout)
  groups = np.asarray(x.groups)
  vocab = entry["logp_at"].shape[-1]
  s_span, t_span = layout["student_span"][:, 1:], layout["teacher_span"][:, 1:]
  checked = 0
  for r, p in zip(*np.nonzero(entry["gate"] > 0), strict=True):
    (at,) = np.flatnonzero(t_span[r] == s_span[r, p])
    want = np.full(vocab, -np.inf)
    for v in np.unique(groups[groups >= 0]):
      want[v] = logsumexp(logp[r, at, groups == v])
    matched = np.isfinite(want)
    np.testing.assert_array_equal(entry["matched"], matched)
    np.testing.assert_allclose(entry["logp_at"][r, p][matched], want[matched], atol=2e-5)
    mass = np.exp(entry["logp_at"][r, p][matched]).sum()
    if (groups < 0).any():
      np.testing.assert_allclose(entry["tail_logp"][r, p], logsumexp(logp[r, at, groups < 0]),
                                 atol=2e-5)  # fmt: skip
      mass += np.exp(entry["tail_logp"][r, p])
    np.testing.assert_allclose(mass, 1.0, atol=1e-5)
    checked += 1
  assert checked >= 10, checked
  # a merged teacher token sits under a student token its bytes begin with
  pieces = x.teacher.pieces
  j = next(j for j, piece in enumerate(pieces) if len(piece) > 1 and j not in x.teacher.special)
  assert pieces[j].startswith(x.student.pieces[groups[j]])


def _marginal_reference(
  student_pieces, teacher_pieces, special, special_student, logp_from, logp_next, x, vocab
):
  """float64 NumPy: the next student token's log-probs `[vocab]` (-inf where impossible) and
  the tail after the teacher has spelt `x` since the distribution `logp_from [Vt]`
  (`logp_next`: at a boundary, the distribution after the token `x`; else None);
  `special_student` maps a teacher special id to the student's."""
  from scipy.special import logsumexp

  def first(rest):  # the student id whose bytes are the longest prefix of `rest`, or None
    best = None
    for i, p in enumerate(student_pieces):
      if p and rest.startswith(p) and (best is None or len(p) > len(student_pieces[best])):
        best = i
    return best

  numer = [[] for _ in range(vocab)]
  tail, whole, exact = [], [], []
  for j, piece in enumerate(teacher_pieces):
    if j >= logp_from.size or (x and j in special) or not piece.startswith(x):
      continue
    whole.append(logp_from[j])
    if x and piece == x:
      exact.append(logp_from[j])
      continue
    v = special_student.get(j) if not x and j in special else first(piece[len(x) :])
    (tail if v is None else numer[v]).append(logp_from[j])
  lse = lambda a: logsumexp(a) if a else -np.inf  # noqa: E731
  out = np.array([lse(n) for n in numer])
  t = lse(tail)
  if exact:
    e = lse(exact)
    if logp_next is None:
      t = np.logaddexp(t, e)
    else:
      nxt, nxt_tail = _marginal_reference(
        student_pieces, teacher_pieces, special, special_student, logp_next, None, b"", vocab
      )
      out, t = np.logaddexp(out, e + nxt), np.logaddexp(t, e + nxt_tail)
  return out - lse(whole), t - lse(whole)


def test_the_marginal_reading_is_the_teachers_next_token_distribution_from_its_partial_token(
  small_world, other_teacher, tmp_path
):
  """`dense_match = "marginal"`: at *every* completion position the scorer's `logp_at`,
  `matched_at` and tail equal a float64 NumPy reference built here from the raw rollout (its
  bytes re-tokenised by the teacher's tokenizer, the teacher's boundaries found, its full
  logits): the teacher's mass on its tokens that continue the partial token it is inside with
  each student token, plus at a boundary the previous token's mass times the prefix reading
  after it; both inside tokens and at boundaries are checked, and the masses sum to 1."""
  trainer, x = _dense_trainer(small_world, other_teacher, tmp_path, "marginal")
  batch, prompts = _rollouts(trainer, 40, seed=3)
  # completions spelt byte by byte from the teacher's merged tokens, so that many student
  # positions are inside a teacher token, where the partial is often a token itself
  rng = np.random.default_rng(3)
  merged = [p for j, p in enumerate(x.teacher.pieces) if len(p) > 2 and j not in x.teacher.special]
  spelt, mask = np.array(batch["tokens"]), np.asarray(batch["completion_mask"]) > 0
  for r in range(spelt.shape[0]):
    data = b"".join(merged[i] for i in rng.integers(0, len(merged), 40))
    spelt[r, mask[r]] = [x.student.byte_ids[b] for b in data[: mask[r].sum()]]
  # an EOS inside row 0: after it the partial is its text, which no teacher token spells
  spelt[0, int(np.argmax(mask[0])) + 12] = x.student.eos
  batch["tokens"] = jax.numpy.asarray(spelt)
  batch = trainer.with_teacher_layouts(batch, prompts, trainer.batcher)
  layout = batch["teacher_layouts"][x.index]
  entry = jax.device_get(trainer.teacher_cache(batch)[x.index])
  logp = _teacher_logp(x, layout)
  vocab = entry["logp_at"].shape[-1]
  s_pieces, t_pieces = x.student.pieces, x.teacher.pieces
  special_student = {j: int(x.groups[j]) for j in x.teacher.special if x.groups[j] >= 0}
  tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["completion_mask"])
  kinds = {"inside": 0, "boundary": 0, "inside, the partial a token": 0, "after EOS": 0}
  whole_tokens = {piece for j, piece in enumerate(t_pieces) if j not in x.teacher.special}
  for r in range(tokens.shape[0]):
    p = int(np.argmax(mask[r]))
    ids = tokens[r][mask[r] > 0]
    tp, nt = int(layout["prompt_lengths"][r]), int(layout["completion_lengths"][r])
    t_ids = layout["tokens"][r, tp : tp + nt]
    text = b"".join(s_pieces[i] for i in ids)
    # the teacher's own tokenizer on the text (EOS as its own token)
    own, eos = [], x.student.pieces[x.student.eos]
    for n, part in enumerate(text.split(eos)):
      own += [x.teacher.eos] * (n > 0) + x.teacher.tokenizer.encode(part.decode())
    np.testing.assert_array_equal(t_ids, own[: len(t_ids)])
    t_off = np.cumsum([0] + [len(t_pieces[j]) for j in t_ids])
    o = 0
    for i, sid in enumerate(ids):
      w = p + i - 1  # the position that predicts the completion's token i
      if o >= t_off[-1]:
        break
      k = int(np.searchsorted(t_off, o, side="right")) - 1
      boundary = t_off[k] == o and k > 0
      start = k - 1 if boundary else k
      if i and ids[i - 1] == x.student.eos:
        assert entry["gate"][r, w] == 0.0, (r, i)
        kinds["after EOS"] += 1
        o += len(s_pieces[sid])
        continue
      want, tail = _marginal_reference(
        s_pieces, t_pieces, x.teacher.special, special_student, logp[r, tp + start - 1],
        logp[r, tp + k - 1] if boundary else None, text[t_off[start] : o], vocab,
      )  # fmt: skip
      assert entry["gate"][r, w] == 1.0, (r, i)
      on = np.isfinite(want)
      np.testing.assert_array_equal(entry["matched_at"][r, w], on)
      np.testing.assert_allclose(entry["logp_at"][r, w][on], want[on], atol=3e-5)
      np.testing.assert_allclose(entry["tail_logp"][r, w], max(tail, -1e30), atol=3e-5)
      mass = np.exp(want[on]).sum() + np.exp(tail)
      np.testing.assert_allclose(mass, 1.0, atol=1e-5)
      kinds["boundary" if boundary else "inside"] += 1
      kinds["inside, the partial a token"] += (
        not boundary and text[t_off[start] : o] in whole_tokens
      )
      o += len(s_pieces[sid])
  assert kinds.pop("after EOS") == 1 and min(kinds.values()) >= 5, kinds


@pytest.mark.parametrize("loss, match", [("sampled_token", "token"), ("reverse_kl", "marginal")])
def test_student_moves_towards_a_teacher_of_another_tokenizer(
  small_world, other_teacher, tmp_path, loss, match
):
  """OPD from a teacher whose tokenizer is not the student's (it puts most of its mass on
  digits), span sampled-token or the dense loss read at every position: over 60 steps the
  teacher's log-prob of the student's rollouts (per student token, summed over its own
  tokens) rises and the sequence reverse-KL estimate falls."""
  c = short_run_config(small_world, tmp_path, steps=60, eval_every=0, log_every=1000)
  c.data.slots_per_teacher = 8
  c.num_devices = 1
  del c.teachers["math"]
  c.teachers.code.update(
    path=other_teacher["path"], tokenizer=other_teacher["tokenizer"], domains="math,code",
    loss=loss, dense_match=match,
  )  # fmt: skip
  c.teachers.code.length_ratio = 3.0  # its prompt is near byte level: no span is dropped
  trainer = train.OPDTrainer(c)
  history = [jax.device_get(trainer.train_one(diagnostics=False)) for _ in range(60)]
  code = [h["teachers"]["code"] for h in history]
  first, last = code[:10], code[-10:]
  mean = lambda rows, k: float(np.mean([float(r[k]) for r in rows]))  # noqa: E731
  assert all(float(r["dropped_tokens"]) == 0.0 for r in code)
  # measured (first -> last 10 steps): sampled-token teacher_logp -52 -> -3, reverse_kl 46 ->
  # 0.6; marginal -47 -> -2.3, 41 -> 0.003, its dense share 0.98 -> 1.0
  assert match != "marginal" or mean(code, "dense_tokens") > 0.9, code
  assert mean(last, "teacher_logp") > mean(first, "teacher_logp") + 20.0, code
  assert mean(last, "reverse_kl") < 0.1 * mean(first, "reverse_kl"), code


def test_a_batch_sampled_ahead_is_aligned_on_a_host_thread_while_the_step_runs(
  small_world, other_teacher, tmp_path, monkeypatch
):
  """Disaggregated rollouts one update behind (`rollout.devices = 4`, `staleness = 1`): the
  batch of step t + 1 is sampled before step t is dispatched, and its alignment (which waits
  for the sampler) runs on a host thread, so step t is dispatched without waiting for it. The
  alignment here blocks until the trainer has dispatched a step; on the main thread it would
  block the dispatch it waits for."""
  import threading

  from jdistill.step import cross_tokenizer

  c = short_run_config(small_world, tmp_path, steps=3, eval_every=0, log_every=1000)
  c.rollout.devices, c.rollout.staleness = 4, 1
  del c.teachers["math"]
  c.teachers.code.update(
    path=other_teacher["path"], tokenizer=other_teacher["tokenizer"], domains="math,code",
    length_ratio=3.0,
  )  # fmt: skip
  trainer = train.OPDTrainer(c)
  dispatched, waited = threading.Event(), []
  step = trainer.train_step

  def train_step(*args):
    dispatched.set()
    return step(*args)

  def layouts(*args, **kwargs):
    if threading.current_thread() is not threading.main_thread():
      waited.append(dispatched.wait(timeout=60))
      dispatched.clear()
    return real_layouts(*args, **kwargs)

  real_layouts = cross_tokenizer.layouts
  monkeypatch.setattr(trainer, "train_step", train_step)
  monkeypatch.setattr(cross_tokenizer, "layouts", layouts)
  history = [jax.device_get(trainer.train_one(diagnostics=False)) for _ in range(3)]
  assert waited == [True, True], waited  # steps 1 and 2's batches, each behind a dispatch
  assert [h["rollout_staleness"] for h in history] == [0, 1, 1]
  assert all(np.isfinite(float(h["loss"])) for h in history)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("loss", "forward_kl", "needs loss = sampled_token or reverse_kl"),
    ("placement", "streamed", "is resident"),
  ],
)
def test_another_tokenizer_is_validated_before_anything_compiles(
  small_world, field, value, message
):
  c = tiny_config(small_world)
  c.teachers.code.tokenizer = small_world["tokenizer"]
  config_lib.validate(c)  # sampled_token, resident: allowed
  c.teachers.code[field] = value
  with pytest.raises(ValueError, match=rf"config.teachers.code.tokenizer=.*{message}"):
    config_lib.validate(c)


def test_another_tokenizer_in_a_run_of_several_processes_is_refused_before_loading(
  small_world, monkeypatch
):
  """The host alignment reads the rows of the whole batch: a run of several processes is
  refused naming the field, before any teacher's weights load."""
  from jdistill.runtime import build

  c = tiny_config(small_world)
  c.teachers.code.tokenizer = small_world["tokenizer"]
  c.teachers.code.path = "/nonexistent"  # loading would fail otherwise, not refuse
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match=r"config.teachers.code.tokenizer=.*this run has 2"):
    build.teachers(c, None, 384)


def test_the_overlap_command_refuses_another_tokenizer_in_a_run_of_several_processes(
  small_world, monkeypatch
):
  """What the command still refuses for a teacher of another tokenizer, before anything loads:
  a run of several processes, naming the field."""
  from jdistill import overlap

  c = tiny_config(small_world)
  c.teachers.code.tokenizer = small_world["tokenizer"]
  c.student.path = c.teachers.code.path = "/nonexistent"  # a load would fail, not refuse
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match=r"config.teachers.code.tokenizer=.*this run has 2"):
    overlap.measure(c, rows_per_domain=1)


def _overlap_config(small_world, tmp_path, **code):
  """The overlap command's toy config: one teacher (`code`, updated with `code`) owning both
  domains, 8 new tokens, chunks of 8."""
  c = tiny_config(small_world)
  c.output_dir = str(tmp_path / "run")
  c.sampling.max_new_tokens = 8
  c.loss.chunk_size = 8
  del c.teachers["math"]
  c.teachers.code.update(domains="math,code", **code)
  return c


def test_the_overlap_command_reads_a_teacher_of_the_students_tokenizer_on_spans_as_today(
  small_world, tmp_path
):
  """`teachers.<name>.tokenizer` = the student's own: the command lays the rows out for it and
  scores it on its own tokens (every span single, every id matched, an empty tail), and every
  metric equals today's same-tokenizer path on the same rollouts; the span log-ratio is the
  token log-ratio."""
  from jdistill import overlap

  c = _overlap_config(small_world, tmp_path)
  today = overlap.measure(c, rows_per_domain=1)["teachers"]["code"]
  c.teachers.code.tokenizer = small_world["tokenizer"]
  spans = overlap.measure(c, rows_per_domain=1)["teachers"]["code"]
  assert "measured_on" not in today and spans["measured_on"] == "single spans"
  assert spans["tokens"] == spans["span_tokens"] == spans["completion_tokens"] == today["tokens"]
  a, b = today["token_mean"], spans["token_mean"]
  assert b["single_span_share"] == 1.0 and b["dropped_share"] == 0.0
  assert set(a) < set(b) and len(a) > 12, sorted(a)
  for key in a:
    np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)
    np.testing.assert_allclose(
      spans["sequence_mean"][key], today["sequence_mean"][key], rtol=1e-4, atol=1e-5
    )
  np.testing.assert_allclose(b["span_reverse_kl"], a["student_logp"] - a["teacher_logp"], rtol=1e-4)
  np.testing.assert_allclose(b["span_teacher_logp"], a["teacher_logp"], rtol=1e-4)
  assert spans["reading"]["verdict"] == today["reading"]["verdict"]


def _recorded_rollouts(monkeypatch) -> dict:
  """The command's own rollouts and prompt rows, recorded as its real `_rollouts` samples
  them."""
  from jdistill.overlap import probe

  seen, sample = {}, probe._rollouts

  def record(config, student, tokenizer, mesh, rows, seed, sampler=None):
    seen["rows"] = rows
    seen["batch"] = sample(config, student, tokenizer, mesh, rows, seed, sampler=sampler)
    return seen["batch"]

  monkeypatch.setattr(probe, "_rollouts", record)
  return seen


@pytest.mark.parametrize("loss, match", [("sampled_token", "token"), ("reverse_kl", "marginal")])
def test_the_overlap_command_reads_a_teacher_of_another_tokenizer_on_its_single_spans(
  small_world, other_teacher, tmp_path, monkeypatch, capsys, loss, match
):
  """A 300-token BPE teacher against the student's 384: the command runs, writes the new keys,
  and its numbers are float64 NumPy's from both models' full logits (the teacher's on its own
  layout of the same rollouts): on the single spans the overlap and the reverse KL between the
  two distributions coarsened to the matched ids plus one tail bucket, the share of single-span
  tokens, and the span log-ratio (each span's log q − log p_T once, per token with a span).
  A teacher trained with the marginal reading is measured the same way (by token)."""
  from jdistill import overlap
  from jdistill.data import alignment
  from jdistill.data.tokenizer import load_tokenizer
  from jdistill.models import hf

  c = _overlap_config(
    small_world, tmp_path, path=other_teacher["path"], tokenizer=other_teacher["tokenizer"],
    length_ratio=3.0, param_dtype="float32", loss=loss, dense_match=match,
  )  # fmt: skip
  seen = _recorded_rollouts(monkeypatch)
  report = overlap.run(c, out_dir=str(tmp_path / "overlap"), rows_per_domain=2)
  printed = capsys.readouterr().out
  print(printed)
  t = report["teachers"]["code"]
  m = t["token_mean"]
  assert t["measured_on"] == "single spans" and t["tokenizer"] == other_teacher["tokenizer"]
  assert "code*" in printed and "(on its single spans)" in printed
  for key in ("overlap", "nucleus_coverage", "excess_xent", "reverse_kl", "tv", "span_reverse_kl"):
    assert np.isfinite(m[key]) and np.isfinite(t["sequence_mean"][key]), key
  assert 0.0 < m["single_span_share"] < 1.0, m["single_span_share"]
  assert m["dropped_share"] == 0.0  # length_ratio 3: every span fits

  # by hand: both models' full log-probs on the recorded rollouts, the teacher on its layout
  batch, records = seen["batch"], [r[2] for r in seen["rows"]]
  tokens, mask = batch["tokens"], batch["completion_mask"]
  n = mask.sum(axis=1).astype(np.int32)
  s_vocab = alignment.Vocab.of(load_tokenizer(small_world["tokenizer"]))
  t_vocab = alignment.Vocab.of(load_tokenizer(other_teacher["tokenizer"]))
  layout = alignment.teacher_rollouts(
    s_vocab, t_vocab, records, tokens, batch["lengths"] - n, n, 3 * tokens.shape[1],
    use_chat_template=c.data.use_chat_template,
  )  # fmt: skip

  def logp(path, ids, lengths):
    model = hf.from_hf(path)
    pos = np.broadcast_to(np.arange(ids.shape[1] - 1), (ids.shape[0], ids.shape[1] - 1))
    hidden, _ = model(jax.numpy.asarray(ids[:, :-1]), pos, kv_mask=pos < lengths[:, None])
    logits = np.asarray(hidden @ model.unembedding(), np.float64)
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))

  q = logp(small_world["student"], tokens, batch["lengths"])
  t_ids = layout["tokens"]
  p = logp(other_teacher["path"], t_ids, layout["prompt_lengths"] + layout["completion_lengths"])
  vmap = alignment.vocab_map(s_vocab, t_vocab)
  assert vmap.size == q.shape[-1]
  on = vmap >= 0
  unmatched = np.ones(p.shape[-1], bool)
  unmatched[vmap[on]] = False
  overlaps, rkls, k1, single, with_span = [], [], 0.0, 0, 0
  for r in range(tokens.shape[0]):
    s_span, t_span = layout["student_span"][r], layout["teacher_span"][r]
    for k in range(s_span.max() + 1):  # each span: its log q − log p_T, once
      s_pos, t_pos = np.flatnonzero(s_span == k), np.flatnonzero(t_span == k)
      k1 += q[r, s_pos - 1, tokens[r, s_pos]].sum() - p[r, t_pos - 1, t_ids[r, t_pos]].sum()
      with_span += s_pos.size
      if not layout["single"][r, k]:
        continue
      single += 1
      qq, pp = np.exp(q[r, s_pos[0] - 1]), np.exp(p[r, t_pos[0] - 1])
      q_ext = np.append(qq[on], qq[~on].sum())
      p_ext = np.append(pp[vmap[on]], pp[unmatched].sum())
      overlaps.append(np.minimum(q_ext, p_ext).sum())
      rkls.append(np.sum(q_ext * (np.log(q_ext) - np.log(p_ext))))
  assert with_span == int(mask.sum()) == t["completion_tokens"] and single == t["tokens"]
  print({k: (m[k], want) for k, want in (("overlap", np.mean(overlaps)),
                                         ("reverse_kl", np.mean(rkls)))})  # fmt: skip
  np.testing.assert_allclose(m["single_span_share"], single / with_span, rtol=1e-6)
  np.testing.assert_allclose(m["overlap"], np.mean(overlaps), rtol=1e-4)
  np.testing.assert_allclose(m["reverse_kl"], np.mean(rkls), rtol=1e-4)
  np.testing.assert_allclose(m["span_reverse_kl"], k1 / with_span, rtol=1e-4)


def test_the_dense_map_covers_the_students_model_vocabulary():
  """A model's vocabulary padded past its tokenizer's (Qwen: 151,936 against 151,665): the
  dense loss's map has one entry per model id, the padding unmatched, so the scorer's
  gathered unembedding and the step's logits agree in width."""
  from jdistill.data import alignment
  from jdistill.step import cross_tokenizer
  from jdistill.testing.tokenizers import llama3_like, qwen_like

  student, teacher = alignment.Vocab.of(qwen_like()), alignment.Vocab.of(llama3_like())
  own = alignment.vocab_map(student, teacher)
  padded = cross_tokenizer.model_vocab_map(student, teacher, own.size + 7)
  assert padded.shape == (own.size + 7,) and padded.dtype == np.int32
  np.testing.assert_array_equal(padded[: own.size], own)
  assert (padded[own.size :] == -1).all()

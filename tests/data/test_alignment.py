"""Alignment of a student's rollout with a teacher of another tokenizer, on hand cases: the
"Qwen-like" student and the "Llama-3-like" teacher of `jdistill.testing.tokenizers` (byte-level
BPEs of different vocabularies, split regexes and special tokens)."""

import numpy as np
import pytest

from jdistill.data import alignment
from jdistill.testing.tokenizers import llama3_like, qwen_like


@pytest.fixture(scope="module")
def vocabs():
  return alignment.Vocab.of(qwen_like()), alignment.Vocab.of(llama3_like())


def span_texts(vocab, ids, span):
  """The bytes of each span, from one side's tokens."""
  out = [b""] * (int(span.max()) + 1)
  for i, k in zip(ids, span, strict=True):
    out[k] += vocab.pieces[int(i)]
  return out


def test_unicode_split_across_tokens_is_one_span_and_no_cut_falls_inside_a_character(vocabs):
  student, teacher = vocabs
  text = "Grüße 東京 🙂"
  ids = qwen_like().encode(text)
  # the hand case: the student splits ß (c3 9f) and 東京 into bytes, the teacher joins "Gr"
  # and cuts 東京 as e6|9d|b1e4|ba|ac, across the two characters
  assert [student.pieces[i] for i in ids][:5] == [b"G", b"r", "ü".encode(), b"\xc3", b"\x9f"]
  row = alignment.align_row(student, teacher, ids)
  assert [teacher.pieces[i] for i in row.teacher_ids][8] == b"\xb1\xe4"
  want = ["Gr", "ü", "ß", "e", " ", "東京", " ", "🙂"]
  assert [s.decode() for s in span_texts(student, ids, row.student_span)] == want
  assert [s.decode() for s in span_texts(teacher, row.teacher_ids, row.teacher_span)] == want
  # one token on both sides with equal bytes: ü, e and the spaces; ß is two on both sides
  np.testing.assert_array_equal(row.single, [0, 1, 0, 1, 1, 0, 1, 0])
  np.testing.assert_array_equal(
    row.student_span, [0, 0, 1, 2, 2, 3, 4, 5, 5, 5, 5, 5, 5, 6, 7, 7, 7]
  )


def test_whitespace_runs_and_newlines(vocabs):
  student, teacher = vocabs
  text = "x  \t\ty\n\n\n  def f(a):\n    return a"
  ids = qwen_like().encode(text)
  row = alignment.align_row(student, teacher, ids)
  s_spans = span_texts(student, ids, row.student_span)
  assert s_spans == span_texts(teacher, row.teacher_ids, row.teacher_span)
  assert b"".join(s_spans).decode() == text
  # every token boundary that both sides share is a span boundary, and only those
  common = set(row.student_offsets) & set(row.teacher_offsets)
  ends = np.cumsum([len(s) for s in s_spans])
  assert set(ends) | {0} == common
  assert row.single.sum() == sum(
    1
    for k in range(row.n_spans)
    if (row.student_span == k).sum() == 1 and (row.teacher_span == k).sum() == 1
  )


def test_special_tokens_map_eos_to_eos_by_role_and_others_by_text(vocabs):
  student, teacher = vocabs
  ids = qwen_like().encode("ok") + [student.eos]
  row = alignment.align_row(student, teacher, ids)
  assert (
    int(row.teacher_ids[-1]) == teacher.eos == llama3_like().convert_tokens_to_ids("<|eot_id|>")
  )
  assert row.student_span[-1] == row.teacher_span[-1] == row.n_spans - 1
  assert not row.single[-1]  # one token each, but <|im_end|> is not <|eot_id|>
  # a special token the teacher lacks is scored as its literal text, in a span of its own
  im_start = qwen_like().convert_tokens_to_ids("<|im_start|>")
  row = alignment.align_row(student, teacher, [im_start] + ids)
  literal = [teacher.pieces[i] for i in row.teacher_ids[row.teacher_span == 0]]
  assert b"".join(literal) == b"<|im_start|>" and len(literal) > 1
  assert (row.student_span == 0).sum() == 1 and row.n_spans == len(ids) + 1
  # and text that spells a teacher special is not read as that special
  spelled = list(qwen_like().encode("<|eot_id|>"))
  row = alignment.align_row(student, teacher, spelled)
  assert teacher.eos not in row.teacher_ids.tolist()


def test_invalid_utf8_bytes_become_the_teachers_byte_tokens(vocabs):
  student, teacher = vocabs
  lone = student.byte_ids[0x9F]  # a continuation byte with no lead byte
  ids = qwen_like().encode("a") + [lone] + qwen_like().encode("b")
  row = alignment.align_row(student, teacher, ids)
  assert [teacher.pieces[i] for i in row.teacher_ids] == [b"a", b"\x9f", b"b"]
  np.testing.assert_array_equal(row.student_span, [0, 1, 2])
  assert row.single.all()


def test_the_teachers_prompt_is_rendered_with_its_own_chat_template(vocabs):
  _, teacher = vocabs
  record = {"prompt": "hi"}
  ids = alignment.teacher_prompt_ids(teacher, record, use_chat_template=True)
  text = llama3_like().decode(ids)
  assert text == (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
  )


def test_the_same_vocabulary_scores_the_students_own_ids(vocabs):
  student, _ = vocabs
  ids = [qwen_like().convert_tokens_to_ids(t) for t in ("d", "e", "f")]  # not canonical "def"
  row = alignment.align_row(student, alignment.Vocab.of(qwen_like()), ids)
  np.testing.assert_array_equal(row.teacher_ids, ids)
  np.testing.assert_array_equal(row.student_span, [0, 1, 2])
  assert row.single.all()


def test_batch_is_padded_to_static_shapes_and_cuts_whole_spans(vocabs):
  student, teacher = vocabs
  rows = [qwen_like().encode("Grüße 東京"), qwen_like().encode("x")]
  t = 16
  completions = np.zeros((2, t), np.int32)
  mask = np.zeros((2, t), np.float32)
  for r, ids in enumerate(rows):
    completions[r, : len(ids)] = ids
    mask[r, : len(ids)] = 1
  full = alignment.align_row(student, teacher, rows[0])
  assert len(full.teacher_ids) == 11
  out = alignment.align_batch(student, teacher, completions, mask, teacher_len=8)
  assert out["teacher_ids"].shape == out["teacher_span"].shape == (2, 8)
  assert out["student_span"].shape == out["single"].shape == (2, t)
  # teacher token 8 (b1e4) belongs to span 5 (東京), which no longer fits: spans 0..4 stay
  np.testing.assert_array_equal(out["teacher_span"][0], [0, 1, 2, 2, 3, 4, -1, -1])
  np.testing.assert_array_equal(out["student_span"][0, :7], [0, 0, 1, 2, 2, 3, 4])
  assert (out["student_span"][0, 7:] == -1).all() and out["dropped"][0] == 6
  np.testing.assert_array_equal(out["student_span"][1], [0] + [-1] * 15)
  assert out["teacher_mask"].sum(1).tolist() == [6, 1] and out["dropped"][1] == 0


def test_teacher_rollouts_put_the_teachers_prompt_and_completion_in_the_trainers_layout(vocabs):
  from jdistill.data.prompts import encode_full_prompt

  student, teacher = vocabs
  records = [{"prompt": "hi"}, {"messages": [{"role": "user", "content": "ok?"}]}]
  completions = [qwen_like().encode("Grüße!") + [student.eos], qwen_like().encode("no")]
  width = 40
  tokens = np.zeros((2, width), np.int32)
  prompt_lengths, completion_lengths = [], []
  for r, (record, completion) in enumerate(zip(records, completions, strict=True)):
    prompt = encode_full_prompt(record, qwen_like(), use_chat_template=True)
    tokens[r, : len(prompt) + len(completion)] = prompt + completion
    prompt_lengths.append(len(prompt))
    completion_lengths.append(len(completion))
  out = alignment.teacher_rollouts(
    student, teacher, records, tokens, prompt_lengths, completion_lengths, teacher_len=32
  )
  assert out["tokens"].shape == out["teacher_span"].shape == (2, 32)
  assert out["student_span"].shape == (2, width)
  header = "<|start_header_id|>{}<|end_header_id|>\n\n"
  want = "<|begin_of_text|>" + header.format("user") + "hi<|eot_id|>" + header.format("assistant")
  tp, tn = out["prompt_lengths"][0], out["completion_lengths"][0]
  assert llama3_like().decode(out["tokens"][0, : tp + tn]) == want + "Grüße!<|eot_id|>"
  assert (out["tokens"][0, tp + tn :] == llama3_like().pad_token_id).all()
  completion = out["completion_mask"][0] > 0
  assert llama3_like().decode(out["tokens"][0][completion]) == "Grüße!<|eot_id|>"
  # the spans sit at the completion's positions on both sides and cover the same text
  p, n = prompt_lengths[0], completion_lengths[0]
  assert (out["student_span"][0, :p] == -1).all() and (out["student_span"][0, p + n :] == -1).all()
  s_texts = span_texts(student, tokens[0, p : p + n], out["student_span"][0, p : p + n])
  t_texts = span_texts(teacher, out["tokens"][0][completion], out["teacher_span"][0][completion])
  assert s_texts[:-1] == t_texts[:-1] and b"".join(s_texts[:-1]) == "Grüße!".encode()
  tp, tn = out["prompt_lengths"][1], out["completion_lengths"][1]
  assert (
    llama3_like()
    .decode(out["tokens"][1, : tp + tn])
    .endswith("ok?<|eot_id|>" + header.format("assistant") + "no")
  )
  assert out["dropped"].tolist() == [0, 0]
  with pytest.raises(ValueError, match="teacher_len=8"):
    alignment.teacher_rollouts(
      student, teacher, records, tokens, prompt_lengths, completion_lengths, teacher_len=8
    )


def test_vocab_map_is_one_to_one_when_two_student_ids_share_their_bytes():
  """An added token with a regular token's bytes: only the first id is matched, so the matched
  masses stay distributions (a second id on the same teacher id would count its p twice)."""
  student = alignment.Vocab(None, (b"a", b"a", b"b", b"<e>"), {3: "<e>"}, 3, {})
  teacher = alignment.Vocab(None, (b"b", b"a", b"<e>", b"c"), {2: "<e>"}, 2, {})
  np.testing.assert_array_equal(alignment.vocab_map(student, teacher), [1, -1, 0, 2])


def test_partials_say_where_the_teacher_stands_at_each_student_token():
  """The marginal reading's host side on the {a, b} pair: the student writes a|b|b|a, the
  teacher reads a|bb|a. At each student token: inside a teacher token the partial is its
  bytes so far; at a boundary it is the whole previous token (and the next token's index);
  at the start it is empty. The teacher's ids are grouped by what they spell after it."""
  from jdistill.testing.tokenizers import ab_pair

  s_tok, t_tok = ab_pair()
  student, teacher = alignment.Vocab.of(s_tok), alignment.Vocab.of(t_tok)
  ids = [s_tok.convert_tokens_to_ids(c) for c in "abba"]
  row = alignment.align_row(student, teacher, ids)
  assert [teacher.pieces[j] for j in row.teacher_ids] == [b"a", b"bb", b"a"]
  start, nxt, text = alignment.row_partials(student, ids, row)
  np.testing.assert_array_equal(start, [0, 0, 1, 1])
  np.testing.assert_array_equal(nxt, [-1, 1, -1, 2])
  assert list(text) == [b"", b"a", b"b", b"bb"]
  v = len(student.pieces)
  t_id = {p.decode(): j for j, p in enumerate(teacher.pieces)}
  s_id = {p.decode(): i for i, p in enumerate(student.pieces)}
  after_b = alignment.partial_groups(student, teacher, b"b", v)
  assert after_b[t_id["b"]] == v + 1  # the partial itself
  assert after_b[t_id["a"]] == v + 2  # does not begin with it
  assert after_b[t_id["bb"]] == s_id["b"] and after_b[t_id["ba"]] == s_id["a"]
  after_bb = alignment.partial_groups(student, teacher, b"bb", v)
  assert after_bb[t_id["bb"]] == v + 1 and (np.delete(after_bb, t_id["bb"]) == v + 2).all()
  groups = alignment.prefix_map(student, teacher)
  assert [groups[t_id[p]] for p in ("a", "b", "bb", "ba")] == [s_id[c] for c in "abbb"]

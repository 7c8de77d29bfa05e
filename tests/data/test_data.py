"""Tests of jdistill.data.prompts and jdistill.data.tokenizer (CPU, no network)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jdistill.data import packing
from jdistill.data.prompts import PromptBatcher, encode_prompt, read_prompt_records
from jdistill.data.tokenizer import load_tokenizer, train_tiny_tokenizer

TEACHERS = {"mathT": ["math", "logic"], "codeT": ["code"]}


def _records():
  recs = [{"domain": "math", "prompt": f"what is {i} plus {i + 1}?"} for i in range(9)]
  recs += [{"domain": "logic", "prompt": f"is {i} even or odd"} for i in range(4)]
  recs += [
    {"domain": "code", "messages": [{"role": "user", "content": f"write a function f{i}"}]}
    for i in range(6)
  ]
  return recs


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  texts = [r.get("prompt") or r["messages"][0]["content"] for r in _records()] * 3
  train_tiny_tokenizer(str(d), texts, vocab_size=300)
  return str(d)


@pytest.fixture(scope="module")
def tok(tok_dir):
  return load_tokenizer(tok_dir)


def _batcher(tok, records=None, **kw):
  args = dict(slots_per_teacher=4, max_prompt_len=48, pad_id=tok.pad_token_id, seed=0)
  args.update(kw)
  return PromptBatcher(_records() if records is None else records, tok, TEACHERS, **args)


def _take(batcher, n, state=None):
  it = batcher.iterator()
  if state is not None:
    it.set_state(state)
  return [next(it) for _ in range(n)]


def _text(tok, batch, row):
  return tok.decode(batch["prompt_tokens"][row, : batch["prompt_lengths"][row]])


# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrip(tmp_path, tok_dir):
  texts = ["hello world", "def f(x): return x"]
  trained = train_tiny_tokenizer(str(tmp_path), texts * 4, vocab_size=280)
  loaded = load_tokenizer(str(tmp_path))
  for s in texts + ["unseen ünïcode ∑"]:
    assert loaded.encode(s) == trained.encode(s)
    assert loaded.decode(loaded.encode(s)) == s
  assert loaded.pad_token_id == 0 and len(loaded) == len(trained) <= 280
  msgs = [{"role": "user", "content": "hi"}]
  assert loaded.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  )
  with pytest.raises(FileNotFoundError):
    load_tokenizer(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no tokenizer files"):
    load_tokenizer(str(tmp_path / "empty"))


# ------------------------------------------------------------------------------ reading


def _write_jsonl(path, lines):
  path.write_text(
    "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
  )
  return str(path)


def test_read_jsonl_and_parquet(tmp_path):
  recs = _records()
  path = _write_jsonl(tmp_path / "p.jsonl", recs)
  records, n = read_prompt_records(path)
  assert n == 0 and [{k: v for k, v in r.items() if k != "where"} for r in records] == recs
  assert records[2]["where"] == f"{path}:3"  # each record knows its file and line
  cols = {k: [r.get(k) for r in recs] for k in ("domain", "prompt", "messages")}
  pq.write_table(pa.Table.from_pydict(cols), tmp_path / "p.parquet")
  records, n = read_prompt_records(str(tmp_path / "p.parquet"))
  assert n == 0 and [{k: v for k, v in r.items() if k != "where"} for r in records] == recs
  assert records[0]["where"].endswith("p.parquet:row 0")


@pytest.mark.parametrize(
  "bad, why",
  [
    ("{not json", "bad JSON"),
    ({"prompt": "x"}, "missing 'domain'"),
    ({"domain": "math"}, "neither"),
    ({"domain": "math", "prompt": 3}, "must be a string"),
    ({"domain": "math", "prompt": "   "}, "empty"),
    ({"domain": "math", "messages": [{"role": "user"}]}, "content"),
  ],
)
def test_malformed_jsonl(tmp_path, bad, why):
  lines = [{"domain": "math", "prompt": "ok"}, bad, {"domain": "code", "prompt": "ok"}]
  path = _write_jsonl(tmp_path / "p.jsonl", lines)
  with pytest.raises(ValueError, match=why) as e:
    read_prompt_records(path)
  assert f"{path}:2" in str(e.value)
  records, n = read_prompt_records(path, on_error="skip")
  assert n == 1 and [r["domain"] for r in records] == ["math", "code"]


def test_malformed_parquet_row(tmp_path):
  rows = [{"domain": "math", "prompt": "a"}, {"domain": None, "prompt": "b"}]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
  with pytest.raises(ValueError, match="row 1: missing 'domain'"):
    read_prompt_records(str(tmp_path / "p.parquet"))


# ----------------------------------------------------------------------------- encoding


def test_encode_overlong(tok):
  rec = {"domain": "math", "prompt": "what is 1 plus 2? what is 3 plus 4? what is 5 plus 6?"}
  full = encode_prompt(rec, tok, use_chat_template=False, max_prompt_len=1000)
  assert full == tok.encode(rec["prompt"]) and len(full) > 8
  kw = dict(use_chat_template=False, max_prompt_len=8)
  assert encode_prompt(rec, tok, overlong="truncate_left", **kw) == full[-8:]
  assert encode_prompt(rec, tok, overlong="drop", **kw) is None
  with pytest.raises(ValueError, match=f"{len(full)} tokens.*max_prompt_len=8"):
    encode_prompt(rec, tok, overlong="error", **kw)
  # The tail of a chat prompt, i.e. the generation prompt, survives truncation.
  chat = encode_prompt(rec, tok, use_chat_template=True, max_prompt_len=1000)
  ids = encode_prompt(rec, tok, use_chat_template=True, max_prompt_len=20)
  assert ids == chat[-20:] and tok.decode(ids).endswith("?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("chat", [True, False])
def test_an_sft_examples_prompt_carries_no_loss(tok, chat):
  """`packing.encode_example`: the prompt as the student sees it (mask 0), then the completion
  and EOS (mask 1); a multi-turn record's prompt is context too."""
  record = {"prompt": "what is 2 plus 3?", "completion": " 5"}
  ids, mask = packing.encode_example(record, tok, use_chat_template=chat)
  shown = "<|im_start|>user\nwhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"
  n = mask.index(1)
  assert len(ids) == len(mask) and mask == [0] * n + [1] * (len(ids) - n)
  assert tok.decode(ids[:n]) == (shown if chat else record["prompt"])
  assert tok.decode(ids[n:]) == " 5<eos>"
  turns = {"prompt": record["prompt"], "turns": [{"origin": "model", "text": " 5"}]}
  ids, mask = packing.encode_example(turns, tok, use_chat_template=chat)
  assert tok.decode([i for i, m in zip(ids, mask) if m]) == " 5<eos>"


# ----------------------------------------------------------------------------- batching


def test_batch_format(tok):
  b = _batcher(tok)
  assert b.teacher_names == ["mathT", "codeT"] and b.domains == ["code", "logic", "math"]
  assert b.rows_per_batch == b.local_rows == 8
  for batch in _take(b, 5):
    assert batch["prompt_tokens"].shape == (8, 48)
    assert all(v.dtype == np.int32 for v in batch.values())
    np.testing.assert_array_equal(batch["teacher_index"], [0] * 4 + [1] * 4)
    for row in range(8):
      length = batch["prompt_lengths"][row]
      assert 0 < length < 48  # nothing truncated
      assert (batch["prompt_tokens"][row, length:] == tok.pad_token_id).all()
      assert (batch["prompt_tokens"][row, :length] != tok.pad_token_id).all()
      domain = b.domains[batch["domain_index"][row]]
      assert domain in TEACHERS[b.teacher_names[batch["teacher_index"][row]]]
      text = _text(tok, batch, row)
      assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
      assert ("function" in text) == (domain == "code")


def test_plain_prompts_and_epochs(tok):
  recs = [r for r in _records() if "prompt" in r] + [{"domain": "code", "prompt": "write code"}]
  b = _batcher(tok, recs, use_chat_template=False)
  batches = _take(b, 7)
  texts = [_text(tok, x, row) for x in batches for row in range(4)]
  assert all("<|im_start|>" not in t for t in texts)
  # 13 mathT prompts: each epoch (13 slots) is a permutation of them, reshuffled.
  mathT = sorted(r["prompt"] for r in recs if r["domain"] in TEACHERS["mathT"])
  assert sorted(texts[:13]) == sorted(texts[13:26]) == mathT
  assert texts[:13] != texts[13:26]
  with pytest.raises(ValueError, match="use_chat_template=False"):
    _batcher(tok, use_chat_template=False)


def test_determinism_and_seeds(tok):
  a, b, c = _take(_batcher(tok), 4), _take(_batcher(tok), 4), _take(_batcher(tok, seed=1), 4)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x["prompt_tokens"], z["prompt_tokens"]) for x, z in zip(a, c))


def test_resume_state(tok):
  b = _batcher(tok)
  it = b.iterator()
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(4)]
  for got in (_take(_batcher(tok), 4, state), _take(b, 4, state)):
    for x, y in zip(expected, got):
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])


def test_process_sharding(tok):
  (glob,) = _take(_batcher(tok), 1)
  locs = [_take(_batcher(tok, process_index=p, process_count=2), 1)[0] for p in range(2)]
  assert locs[0]["prompt_tokens"].shape == (4, 48)
  # Teacher-major: teacher t's block is the concatenation of each process's block t.
  for k in glob:
    parts = [loc[k][t * 2 : (t + 1) * 2] for t in range(2) for loc in locs]
    np.testing.assert_array_equal(np.concatenate(parts), glob[k])


def test_drop_overlong(tok):
  recs = _records() + [{"domain": "code", "prompt": "very long " * 40}]
  b = _batcher(tok, recs, use_chat_template=True, overlong="drop")
  batches = _take(b, 4)  # 16 codeT slots > 7 codeT prompts: the long one was met.
  assert b.n_dropped == 1
  assert all("very long" not in _text(tok, x, r) for x in batches for r in range(8))
  with pytest.raises(ValueError, match="max_prompt_len=48"):
    _take(_batcher(tok, recs, overlong="error"), 4)
  tail = _take(_batcher(tok, recs, overlong="truncate_left"), 4)
  cut = [(x, r) for x in tail for r in range(4, 8) if "very long" in _text(tok, x, r)]
  assert cut and all(x["prompt_lengths"][r] == 48 for x, r in cut)
  assert all(not _text(tok, x, r).startswith("<|im_start|>user") for x, r in cut)  # head cut
  assert all(_text(tok, x, r).endswith("<|im_start|>assistant\n") for x, r in cut)  # tail kept
  with pytest.raises(ValueError, match="every prompt of teacher 'mathT' is overlong"):
    _take(_batcher(tok, recs, overlong="drop", max_prompt_len=3), 1)


@pytest.mark.parametrize(
  "kw, match",
  [
    (dict(records=_records() + [{"domain": "poetry", "prompt": "x"}]), "poetry"),
    (
      dict(records=[r for r in _records() if r["domain"] != "code"]),
      "teacher 'codeT' has no prompts",
    ),
    (dict(process_count=3), "not divisible"),
    (dict(process_count=2, process_index=2), "process_index"),
    (dict(slots_per_teacher=0), "slots_per_teacher"),
    (dict(overlong="cut"), "overlong"),
  ],
)
def test_config_errors(tok, kw, match):
  with pytest.raises(ValueError, match=match):
    _batcher(tok, **kw)


def test_domain_in_two_teachers(tok):
  with pytest.raises(ValueError, match="two teachers"):
    PromptBatcher(
      _records(),
      tok,
      {"a": ["math"], "b": ["math", "code", "logic"]},
      slots_per_teacher=2,
      max_prompt_len=16,
      pad_id=0,
      seed=0,
    )

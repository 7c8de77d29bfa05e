"""Warmup SFT: completion-only cross-entropy, packing, and a student that learns."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdistill import losses
from jdistill.data import packing
from jdistill.models import ModelConfig, Transformer
from jdistill.stages import sft
from jdistill.step import sft as step_sft
from jdistill.testing.toy import tiny_config

CFG = ModelConfig(
  vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
  head_dim=8,
)  # fmt: skip


def _examples(seed=0, n=3):
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    prompt, completion = (
      rng.randint(3, 50, rng.randint(3, 7)),
      rng.randint(3, 50, rng.randint(2, 5)),
    )
    out.append((list(prompt) + list(completion), [0] * len(prompt) + [1] * len(completion)))
  return out


def test_cross_entropy_matches_numpy_and_chunked_equals_unchunked():
  rng = np.random.RandomState(0)
  hidden = jnp.asarray(rng.randn(2, 7, 5), jnp.float32)
  unembed = jnp.asarray(rng.randn(5, 11), jnp.float32)
  targets = jnp.asarray(rng.randint(0, 11, (2, 7)), jnp.int32)
  mask = jnp.asarray(rng.rand(2, 7) > 0.4, jnp.float32)
  logits = np.asarray(hidden, np.float64) @ np.asarray(unembed, np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  want = (nll * np.asarray(mask)).sum() / np.asarray(mask).sum()
  for chunk in (None, 1, 3, 7, 50):
    loss, _ = losses.cross_entropy_loss(hidden, unembed, targets, mask, chunk_size=chunk)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  grad = jax.grad(lambda h: losses.cross_entropy_loss(h, unembed, targets, mask, chunk_size=3)[0])
  g = np.asarray(grad(hidden))
  assert np.all(g[np.asarray(mask) == 0] == 0) and np.abs(g[np.asarray(mask) == 1]).max() > 0


def test_packing_places_segments_with_restarting_positions():
  examples = _examples(n=3)
  rows = packing.pack(examples, 24)
  assert rows["tokens"].shape[0] == 1  # all three fit in one row
  segs = rows["segment_ids"][0]
  assert sorted(set(segs.tolist())) == [0, 1, 2, 3]
  for s, (ids, mask) in enumerate(examples, start=1):
    where = segs == s
    np.testing.assert_array_equal(rows["tokens"][0][where], ids)
    np.testing.assert_array_equal(rows["positions"][0][where], np.arange(len(ids)))
    np.testing.assert_array_equal(rows["loss_mask"][0][where], mask)
  assert packing.pack(examples, 24, pack_rows=False)["tokens"].shape[0] == 3


def test_packed_and_unpacked_batches_give_the_same_loss_and_prompts_no_gradient():
  model = Transformer(CFG, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  examples = _examples(n=3)
  packed = {k: jnp.asarray(v) for k, v in packing.pack(examples, 24).items()}
  alone = {k: jnp.asarray(v) for k, v in packing.pack(examples, 24, pack_rows=False).items()}
  loss_packed, n_packed = step_sft.sft_loss(params, graphdef, packed, chunk_size=5)
  loss_alone, n_alone = step_sft.sft_loss(params, graphdef, alone, chunk_size=None)
  assert float(n_packed) == float(n_alone) == sum(sum(m) for _, m in examples)
  np.testing.assert_allclose(float(loss_packed), float(loss_alone), rtol=1e-5)
  # the targets that carry loss: completion tokens only, never across a segment boundary
  mask = np.asarray(step_sft.target_mask(packed))[0]
  targets_seg = np.asarray(packed["segment_ids"])[0, 1:]
  targets_mask = np.asarray(packed["loss_mask"])[0, 1:]
  assert np.all(mask <= targets_mask)  # prompt targets carry no loss
  boundary = np.asarray(packed["segment_ids"])[0, :-1] != targets_seg
  assert np.all(mask[boundary] == 0)
  # changing a prompt token's prediction (the model's output there) leaves the loss alone:
  # the gradient wrt the hidden states of prompt-target positions is exactly zero
  student = nnx.merge(graphdef, params)
  segments = packed["segment_ids"][:, :-1]
  hidden, _ = student(
    packed["tokens"][:, :-1], packed["positions"][:, :-1], kv_mask=segments > 0,
    segment_ids=segments,
  )  # fmt: skip
  grad = jax.grad(
    lambda h: losses.cross_entropy_loss(
      h, student.unembedding(), packed["tokens"][:, 1:], step_sft.target_mask(packed), chunk_size=4
    )[0]
  )(hidden)
  g = np.abs(np.asarray(grad))[0].sum(-1)
  assert np.all(g[mask == 0] == 0) and np.all(g[mask == 1] > 0)


def test_sft_learns_a_small_memorisable_dataset(small_world, tmp_path):
  world = small_world
  lines = [
    {"domain": "math", "prompt": f"what is {a} plus {b}?", "completion": f"{a + b}"}
    for a, b in ((1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (4, 5), (6, 1), (9, 0))
  ]
  data = tmp_path / "sft.jsonl"
  data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  c = tiny_config(world)
  c.stage = "sft"
  c.output_dir = str(tmp_path / "run")
  c.sft.train_files = str(data)
  c.sft.max_len = 64
  c.sft.rows_per_step = 8
  c.sft.pack = False
  c.train.steps = 40
  c.train.log_every = 10
  c.train.eval_every = 0
  c.optimizer.warmup_steps = 2
  c.loss.chunk_size = 16
  trainer = sft.SFTTrainer(c)
  before = trainer.evaluate()["cross_entropy"]
  records = trainer.run()
  after = trainer.evaluate()["cross_entropy"]
  assert after < 0.5 * before, (before, after)
  assert [r["step"] for r in records] == [10, 20, 30, 40]
  assert (tmp_path / "run" / "learning_curves.png").exists()


def test_bad_sft_examples_name_file_and_line(small_world, tmp_path):
  world = small_world
  from jdistill.data.tokenizer import load_tokenizer

  tok = load_tokenizer(world["tokenizer"])
  path = tmp_path / "bad.jsonl"
  path.write_text('{"prompt": "hi", "completion": "yo"}\n{"prompt": "no completion"}\n')
  with pytest.raises(ValueError, match=rf"{path}:2: needs a string 'completion'"):
    packing.read_examples(str(path), tok, use_chat_template=True, max_len=64)
  path.write_text('{"prompt": "hi", "completion": "' + "yo " * 100 + '"}\n')
  with pytest.raises(ValueError, match=rf"{path}:1: example has \d+ tokens, more than max_len"):
    packing.read_examples(str(path), tok, use_chat_template=True, max_len=64)


def test_multi_turn_examples_carry_loss_on_the_model_turns_only(tmp_path):
  from jdistill.testing.chars import CharTokenizer

  tok = CharTokenizer()
  turns = [
    {"origin": "model", "text": "[get ab]"},
    {"origin": "environment", "text": " ab=12 "},
    {"origin": "model", "text": "answer: 12"},
  ]
  path = tmp_path / "episodes.jsonl"
  path.write_text(json.dumps({"prompt": "q:", "turns": turns}) + "\n")
  ((ids, mask, _),) = packing.read_examples(str(path), tok, use_chat_template=False, max_len=64)
  assert tok.decode(ids) == "q:[get ab] ab=12 answer: 12$"  # "$": EOS after the last model turn
  assert mask == [0] * 2 + [1] * 8 + [0] * 7 + [1] * 10 + [1]
  batch = packing.pack([(ids, mask, None)], 64)
  assert float(step_sft.target_mask(batch).sum()) == sum(mask)  # the SFT step's targets
  for bad, message in (
    ({"prompt": "q:", "turns": [{"origin": "user", "text": "x"}]}, r"turns\[0\] must be"),
    ({"prompt": "q:", "turns": [{"origin": "environment", "text": "x"}]}, "no model tokens"),
    ({"prompt": "q:", "turns": turns, "completion": "x"}, "both 'completion' and 'turns'"),
  ):
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:1: .*{message}"):
      packing.read_examples(str(path), tok, use_chat_template=False, max_len=64)


def _rows_of(replay_share: float, switches: dict, step: int) -> np.ndarray:
  """The teachers of the rows `SFTTrainer.batch` picks, on a stand-in with 3 teachers' rows."""
  from types import SimpleNamespace

  teachers = np.repeat(np.array(["add", "count", "reverse"]), 10)
  stand_in = SimpleNamespace(
    rows={name: np.arange(30)[:, None] for name in sft.BATCH_KEYS},
    row_teacher=teachers,
    switches=switches,
    phase_start=0,
    shardings={name: None for name in sft.BATCH_KEYS},
    config=SimpleNamespace(seed=0, sft=SimpleNamespace(rows_per_step=8, replay_share=replay_share)),
  )
  stand_in.active_rows = lambda: sft.SFTTrainer.active_rows(stand_in)
  stand_in.replay_rows = lambda: sft.SFTTrainer.replay_rows(stand_in)
  picked = np.asarray(sft.SFTTrainer.batch(stand_in, step)[sft.BATCH_KEYS[0]])[:, 0]
  return teachers[picked]


def test_a_switched_teachers_rows_are_replayed_at_the_replay_share():
  """Before any switch every teacher's rows are drawn; after 'add' switches, 2 of 8 rows per
  step (share 0.25) are its, the rest the others'; with share 0 it leaves the mix."""
  assert set(np.concatenate([_rows_of(0.25, {}, s) for s in range(4)])) == {
    "add",
    "count",
    "reverse",
  }
  for step in range(6):
    rows = _rows_of(0.25, {"add": {"step": 0}}, step)
    assert len(rows) == 8 and list(rows).count("add") == 2, rows
    assert list(_rows_of(0.0, {"add": {"step": 0}}, step)).count("add") == 0
  np.testing.assert_array_equal(  # a pure function of the step: resume draws the same rows
    _rows_of(0.25, {"add": {"step": 0}}, 3), _rows_of(0.25, {"add": {"step": 0}}, 3)
  )

"""Multi-turn episodes (`jdistill.sampling.episodes`) with a tiny random student: every token's
origin, rows that advance independently, faults that end only their episode, and the
environment loader."""

import dataclasses
import logging

import jax
import numpy as np
import pytest
from flax import nnx

from jdistill.data.chat import ToolRole
from jdistill.models import ModelConfig, Transformer
from jdistill.runtime import sharding as shd
from jdistill.sampling import Sampler, SamplingParams
from jdistill.sampling.environment import MalformedTurn, load_environment
from jdistill.sampling.episodes import EpisodeParams, run_episodes
from jdistill.testing.chars import EOS, PAD, VOCAB, CharTokenizer

STOPS = (EOS, *range(50, VOCAB))  # 15 of 64 ids: a random model's turns end after ~4 tokens
TOK = CharTokenizer()


class ScriptedEnv:
  """Each record says what the environment does: `turns` turns answered with `observation`,
  then done with reward 1; or a fault (`fault`: "raise", "malformed", "flood", "reset",
  "bad_return", "untokenisable"). The state keeps the texts the environment was handed."""

  def reset(self, record):
    if record.get("fault") == "reset":
      raise RuntimeError("no such task")
    return {"record": record, "texts": []}

  def step(self, state, turn_text):
    state["texts"].append(turn_text)
    fault = state["record"].get("fault")
    if fault == "raise":
      raise RuntimeError("tool crashed")
    if fault == "malformed":
      raise MalformedTurn("no closing bracket")
    if fault == "flood":  # a reward before done is no episode reward
      return "a" * 500, False, 0.7
    if fault == "bad_return":
      return "ok", False  # two values, not three
    if fault == "untokenisable":  # text the tokenizer cannot encode
      return "\u2603", False, None
    if len(state["texts"]) >= state["record"]["turns"]:
      return None, True, 1.0
    return state["record"].get("observation", "ok."), False, None


@pytest.fixture(scope="module")
def student():
  cfg = ModelConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
  )
  graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(3)))
  return state, Sampler(graphdef, shd.make_mesh({"data": 1}, jax.devices()[:1]))


SAMPLING = SamplingParams(temperature=1.0, stop_token_ids=STOPS, prompt_buckets=(32, 64, 128),
                          pad_id=PAD)  # fmt: skip
PROMPTS = [TOK.encode(p) for p in ("task a:", "task bb:", "c:", "task d?", "e:")]


def _run(student, records, episode, seed=0, env=None):
  state, sampler = student
  prompts = (PROMPTS * 2)[: len(records)]
  env = env or ScriptedEnv()
  envs = []

  class Recording:  # keeps each episode's state to read what the environment was handed
    def reset(self, record):
      s = env.reset(record)
      envs.append(s)
      return s

    def step(self, s, text):
      return env.step(s, text)

  out = run_episodes(sampler, state, Recording(), records, prompts, jax.random.key(seed),
                     SAMPLING, episode, TOK)  # fmt: skip
  return out, envs


LONG = EpisodeParams(max_turns=16, max_turn_tokens=48, max_total_tokens=100, wave_tokens=4,
                     slots=2)  # fmt: skip
TURNS = [8, 1, 1, 1, 1]  # one slow episode, four fast ones, two slots


@pytest.fixture(scope="module")
def uneven(student):
  records = [{"turns": k, "observation": "ok." if k > 1 else "x"} for k in TURNS]
  return _run(student, records, LONG)


def test_every_token_carries_its_origin(uneven):
  out, envs = uneven
  assert out.reasons == ("done",) * 5 and out.turns.tolist() == TURNS
  np.testing.assert_array_equal(out.rewards, np.ones(5))
  for b, state in enumerate(envs):
    p, n = int(out.prompt_lengths[b]), int(out.lengths[b])
    row, model = out.tokens[b], out.model_mask[b]
    positions = np.arange(row.size)
    np.testing.assert_array_equal(out.completion_mask[b], (positions >= p) & (positions < n))
    assert not model[:p].any() and not model[n:].any() and (row[n:] == PAD).all()
    # maximal runs of one origin: model turns alternate with the environment's observations
    runs, start = [], p
    for t in range(p + 1, n + 1):
      if t == n or model[t] != model[t - 1]:
        runs.append((bool(model[start]), row[start:t].tolist()))
        start = t
    assert out.turn_texts(b, TOK.decode) == [
      {"origin": "model" if is_model else "environment", "text": TOK.decode(ids)}
      for is_model, ids in runs
    ]
    turns = [ids for is_model, ids in runs if is_model]
    observations = [TOK.decode(ids) for is_model, ids in runs if not is_model]
    assert len(turns) == TURNS[b] and observations == ["ok."] * (TURNS[b] - 1)
    # every turn ends at a stop id, and the environment was handed its text without it
    assert all(ids[-1] in STOPS and not set(ids[:-1]) & set(STOPS) for ids in turns)
    assert state["texts"] == [TOK.decode(ids[:-1]) for ids in turns]
    # log-probs on the model's tokens only
    assert (out.logprobs[b][model > 0] < 0).all() and (out.logprobs[b][model == 0] == 0).all()
    assert (out.sampling_logprobs[b][model == 0] == 0).all()


def test_rows_advance_independently(uneven):
  out, _ = uneven
  # every episode decodes in every wave from its start to its end: none waits for another
  np.testing.assert_array_equal(out.decode_waves, out.end_wave - out.start_wave + 1)
  slow, fast = 0, slice(1, None)
  assert out.decode_waves[slow] >= TURNS[slow]  # a turn takes at least one wave
  # the fast episodes cycle through the second slot while the slow one is still in flight
  assert (out.end_wave[fast] < out.end_wave[slow]).all()
  assert (out.start_wave[fast] <= out.end_wave[slow]).all()
  assert out.waves == out.end_wave[slow] + 1 < out.decode_waves.sum()


def test_episodes_are_a_function_of_the_seed(student, uneven):
  records = [{"turns": k, "observation": "ok." if k > 1 else "x"} for k in TURNS]
  again, _ = _run(student, records, LONG)
  other, _ = _run(student, records, LONG, seed=1)
  for field in dataclasses.fields(again):
    a, b = getattr(again, field.name), getattr(uneven[0], field.name)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(other.tokens, again.tokens)


def test_faults_end_only_their_episode(student, caplog):
  records = [{"turns": 2}, {"fault": "raise"}, {"fault": "malformed"}, {"fault": "flood"},
             {"fault": "reset"}, {"fault": "bad_return"}, {"turns": 3},
             {"fault": "untokenisable"}]  # fmt: skip
  with caplog.at_level(logging.DEBUG, logger="jdistill"):
    out, _ = _run(student, records, dataclasses.replace(LONG, slots=None))
  logged = [r.getMessage() for r in caplog.records]
  assert any("episode 1 ended early: env_error (step raised RuntimeError" in m for m in logged)
  assert any("episode 2 ended early: malformed (no closing bracket)" in m for m in logged)
  assert any("episode 7 ended early: env_error (observation not tokenisable" in m for m in logged)
  warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert all("env_error" in m for m in warned) and len(warned) >= 2  # the policy's: debug only
  assert out.reasons == (
    "done", "env_error", "malformed", "total_limit", "env_error", "env_error", "done", "env_error"
  )  # fmt: skip
  np.testing.assert_array_equal(out.rewards, [1, 0, 0, 0, 0, 0, 1, 0])
  counts = out.reason_counts()
  assert counts["env_error"] == 4 and counts["malformed"] == 1 and counts["total_limit"] == 1
  assert out.lengths[4] == out.prompt_lengths[4]  # reset failed: nothing decoded
  # the flood is cut at the total limit; what fits stays as context
  assert out.lengths[3] - out.prompt_lengths[3] == LONG.max_total_tokens
  assert out.model_mask[3].sum() < LONG.max_total_tokens


def test_an_overlong_turn_ends_only_its_episode(student):
  # 2 tokens per turn: a random student's turn stops in time about half the time
  short = dataclasses.replace(LONG, max_turn_tokens=2, wave_tokens=2, slots=None)
  out, _ = _run(student, [{"turns": 1}] * 8, short)
  assert set(out.reasons) == {"done", "turn_limit"}
  over = np.asarray(out.reasons) == "turn_limit"
  np.testing.assert_array_equal(out.rewards, np.where(over, 0.0, 1.0))
  assert out.reason_counts()["turn_limit"] == over.sum()
  model_tokens = out.model_mask.sum(axis=1)
  assert (model_tokens[over] == 2).all() and (model_tokens[~over] <= 2).all()
  last = out.tokens[np.arange(8), out.lengths - 1]
  assert not np.isin(last[over], STOPS).any() and np.isin(last[~over], STOPS).all()


def test_stop_strings_end_a_turn(student):
  """A turn ends where its text first contains a stop string; tokens after it are dropped."""
  stop = dataclasses.replace(LONG, stop_strings=tuple("abcdefghijklmnopqrstuvwxyz"), slots=None)
  out, envs = _run(student, [{"turns": 1}] * 5, stop)
  by_string = 0
  for b, state in enumerate(envs):
    ids = out.tokens[b, out.prompt_lengths[b] : out.lengths[b]].tolist()
    text = TOK.decode([i for i in ids if i not in STOPS])
    assert state["texts"] == [text]
    if not set(ids) & set(STOPS):  # ended by the stop string: its last character is a letter
      assert text[-1].isalpha() and not any(c.isalpha() for c in text[:-1])
      by_string += 1
  assert by_string > 0 and out.reasons == ("done",) * 5


def test_load_environment(tmp_path, monkeypatch):
  (tmp_path / "my_envs.py").write_text(
    "class Env:\n"
    "  def reset(self, record): return record\n"
    "  def step(self, state, text): return None, True, 1.0\n"
    "def make(): return Env()\n"
    "instance = Env()\n"
    "def not_an_env(): return 3\n"
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  for spec in ("my_envs:Env", "my_envs:make", "my_envs:instance"):
    assert load_environment(spec).step(None, "") == (None, True, 1.0)
  for spec, message in (
    ("my_envs", "expected 'module:Class'"),
    ("no_such_module:Env", "cannot import module 'no_such_module'"),
    ("my_envs:Missing", "has no attribute 'Missing'"),
    ("my_envs:not_an_env", "is not an environment"),
  ):
    with pytest.raises(ValueError, match=f"rollout.environment=.*{message}"):
      load_environment(spec, field="rollout.environment")


def test_observations_enter_as_the_chat_templates_tool_messages(student):
  """With a tool role each observation is wrapped as the chat template's tool message, and a
  turn a stop string ended (no stop token) is closed by the template's end-of-turn text."""
  role = ToolRole(end_of_turn="$", before="<tool>", after="</tool>=")
  records = [{"turns": 3, "observation": "ok."} for _ in range(8)]
  episode = dataclasses.replace(LONG, observation_role=role, stop_strings=("a", "e", "o", "i"))
  out, _ = _run(student, records, episode)
  closed_by = set()
  for b in range(len(records)):
    texts = out.turn_texts(b, TOK.decode)
    for before, after in zip(texts, texts[1:]):
      if after["origin"] == "environment":
        closed = TOK.encode(before["text"])[-1] in STOPS
        closed_by.add(closed)
        assert after["text"] == ("" if closed else "$") + "<tool>ok.</tool>="
  assert closed_by == {True, False}  # both kinds of turn end were met


def test_environments_step_at_once_and_the_episodes_do_not_change(student):
  """With `env_workers` the finished turns' environments run on threads at once (observed:
  several calls in flight together), and the episodes equal the one-after-another run's."""
  import threading

  class SlowEnv(ScriptedEnv):
    def __init__(self):
      self.lock, self.in_flight, self.most = threading.Lock(), 0, 0

    def step(self, state, turn_text):
      with self.lock:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
      threading.Event().wait(0.05)  # a slow tool: the others' calls overlap this one's
      with self.lock:
        self.in_flight -= 1
      return super().step(state, turn_text)

  records = [{"turns": 3, "observation": "ok."} for _ in range(6)]
  serial_env, threaded_env = SlowEnv(), SlowEnv()
  serial, _ = _run(student, records, dataclasses.replace(LONG, slots=None), env=serial_env)
  threaded, _ = _run(
    student, records, dataclasses.replace(LONG, slots=None, env_workers=4), env=threaded_env
  )
  assert serial_env.most == 1 and threaded_env.most > 1
  for field in dataclasses.fields(serial):
    a, b = getattr(serial, field.name), getattr(threaded, field.name)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="env_workers=0"):
    dataclasses.replace(LONG, env_workers=0)

"""The lookup task (`jdistill.experiments.lookup`): the environment's rules, and OPD and RLVR
steps on a tiny student's multi-turn lookup episodes, environment tokens masked."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdistill import losses
from jdistill.experiments import lookup
from jdistill.losses import LossSettings
from jdistill.models import ModelConfig, Transformer
from jdistill.runtime import sharding as shd
from jdistill.sampling import Sampler, SamplingParams
from jdistill.sampling.environment import MalformedTurn, load_environment
from jdistill.sampling.episodes import EpisodeParams, run_episodes
from jdistill.step import common
from jdistill.step import opd as ts
from jdistill.step import rlvr as step_rlvr
from jdistill.testing.chars import EOS, PAD, VOCAB, CharTokenizer


def test_the_answer_needs_the_tool(tmp_path):
  path = lookup.write_prompts(str(tmp_path / "lookup.jsonl"), 8, seed=1)
  records = [json.loads(line) for line in open(path)]
  env = load_environment("jdistill.experiments.lookup:LookupEnv")
  table = lookup.make_table(0)
  assert table == env.table and len(table) == 64
  for record in records:
    key, value = record["key"], record["answer"]
    assert table[key] == value and key in record["prompt"] and value not in record["prompt"]
    state = env.reset(record)
    observation, done, reward = env.step(state, f"let me look [get {key}]")
    assert observation == f" {key}={value} " and not done and reward is None
    assert env.step(state, f"answer: {value}") == (None, True, 1.0)
    wrong = f"{(int(value) + 1) % 100:02d}"
    assert env.step(env.reset(record), f"answer: {wrong}") == (None, True, 0.0)
  assert env.step(state, "[get zzzz]")[0] == " zzzz=none "
  with pytest.raises(MalformedTurn):
    env.step(state, "no idea")
  hinting = load_environment("jdistill.experiments.lookup:make_env")
  assert hinting.step(hinting.reset(records[0]), "no idea") == (lookup.HINT, False, None)
  with pytest.raises(ValueError, match="not a lookup record"):
    env.reset({"domain": "math", "answer": "3"})


CFG = ModelConfig(
  vocab_size=VOCAB,
  hidden_size=32,
  intermediate_size=48,
  num_layers=1,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
)
EPISODE = EpisodeParams(max_turns=3, max_turn_tokens=12, max_total_tokens=64,
                        stop_strings=lookup.STOP_STRINGS, wave_tokens=6)  # fmt: skip


@pytest.fixture(scope="module")
def episodes(tmp_path_factory):
  """4 lookup episodes of a tiny random student (the hinting environment, so a turn that is
  no tool call gets an observation and the episode goes on)."""
  graphdef, params = nnx.split(Transformer(CFG, nnx.Rngs(0)))
  sampler = Sampler(graphdef, shd.make_mesh({"data": 1}, jax.devices()[:1]))
  path = lookup.write_prompts(str(tmp_path_factory.mktemp("lookup") / "p.jsonl"), 4, seed=0)
  records = [json.loads(line) for line in open(path)]
  tok = CharTokenizer()
  # many stop ids: a random student's turns end after a few tokens, not at the turn limit
  sampling = SamplingParams(stop_token_ids=(EOS, *range(50, VOCAB)), prompt_buckets=(32, 64, 128),
                            pad_id=PAD)  # fmt: skip
  out = run_episodes(sampler, params, lookup.make_env(), records,
                     [tok.encode(r["prompt"]) for r in records], jax.random.key(0), sampling,
                     EPISODE, tok)  # fmt: skip
  return graphdef, params, out


def test_opd_and_rlvr_steps_train_on_episodes(episodes):
  graphdef, params, out = episodes
  environment = out.completion_mask - out.model_mask
  assert environment.sum() > 0 and out.model_mask.sum() > 0  # several turns, observations
  batch = {k: jnp.asarray(v) for k, v in out.batch().items()}
  target = np.asarray(common.loss_mask(batch))[:, 1:]  # what the loss may weigh
  np.testing.assert_array_equal(target, out.model_mask[:, 1:])

  t_graphdef, t_state = nnx.split(Transformer(CFG.replace(num_layers=2), nnx.Rngs(1)))
  rows = common.teacher_rows(1, 4)
  specs = (common.TeacherSpec("lookup", LossSettings(loss="sampled_token", chunk_size=8), 1.0,
                              rows[0]),)  # fmt: skip
  opt, sched = common.make_optimizer(1e-2, steps=4)
  state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32)}
  opd_step = jax.jit(functools.partial(
    ts.train_step, student_graphdef=graphdef, teacher_graphdefs=(t_graphdef,), specs=specs,
    optimizer=opt, schedule=sched, loss_window=EPISODE.max_total_tokens,
  ))  # fmt: skip
  new_state, metrics = opd_step(state, (t_state,), batch)
  assert float(metrics["finite"]) == 1.0
  assert float(metrics["teachers"]["lookup"]["tokens"]) == target.sum()

  batch["advantages"] = losses.group_advantages(out.rewards, 2, normalize_std=False)
  rl_step = jax.jit(functools.partial(
    step_rlvr.rl_step, optimizer=opt, schedule=sched, student_graphdef=graphdef,
    teacher_graphdefs=(t_graphdef,), specs=specs, groups=((0,),), reference_graphdef=graphdef,
    settings=step_rlvr.RLSettings(chunk_size=8, kl_weight=1.0),
  ))  # fmt: skip
  rl_state, rl_metrics = rl_step(state, (t_state,), None, batch)
  assert float(rl_metrics["finite"]) == 1.0
  np.testing.assert_allclose(rl_metrics["response_length"], target.sum(axis=1).mean())
  for trained in (new_state, rl_state):
    before, after = jax.tree.leaves(state["params"]), jax.tree.leaves(trained["params"])
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))

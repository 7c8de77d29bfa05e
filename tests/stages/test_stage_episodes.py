"""The OPD, RLVR and generate stages with multi-turn rollouts (`episode.environment`): the
lookup task's episodes train the toy student, the loss counts the student's tokens only,
generated episodes are SFT examples, and the config checks name their field."""

import json

import ml_collections
import pytest

from jdistill import config as config_lib
from jdistill.config import teacher_config
from jdistill.data import packing
from jdistill.data.tokenizer import load_tokenizer
from jdistill.experiments import lookup
from jdistill.sampling.episodes import REASONS
from jdistill.stages import generate, rlvr
from jdistill.stages import opd as train
from jdistill.testing.toy import short_run_config


def _config(world, tmp_path, **train):
  c = short_run_config(world, tmp_path / "out", **train)
  c.teachers = ml_collections.ConfigDict(
    {"math": teacher_config(world["teacher_math"], "lookup", loss="sampled_token")}
  )
  c.data.train_files = lookup.write_prompts(str(tmp_path / "lookup.jsonl"), 16, seed=0)
  c.data.eval_files = ""
  c.num_devices = 2  # 4 rows over 2 data-parallel shards
  c.episode.environment = "jdistill.experiments.lookup:make_env"  # hints: episodes go on
  # a random student's turns end within a few tokens, so episodes have several turns
  c.episode.stop_strings = tuple("aeiou]")
  c.episode.max_turns = 3
  c.episode.max_total_tokens = 96  # the hint is ~30 tokens of the toy tokenizer
  c.sampling.prompt_buckets = (32, 128)
  return c


def test_opd_trains_on_episodes_with_environment_tokens_masked(small_world, tmp_path):
  c = _config(small_world, tmp_path, steps=2, log_every=1, eval_every=0)
  config_lib.validate(c)
  trainer = train.OPDTrainer(c)
  held_out = trainer.evaluate()["math"]  # held-out episodes, scored by the teacher
  assert held_out["tokens"] > 0 and held_out["reverse_kl"] > 0
  trainer.run()
  records = [
    json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
  ]
  assert [r["step"] for r in records] == [1, 2]
  for record in records:
    episodes, teacher = record["episodes"], record["teachers"]["math"]
    assert record["finite"] == 1.0
    assert episodes["turns"] > 1 and episodes["environment_tokens"] > 0
    assert sum(v for k, v in episodes.items() if k.startswith("ended_")) == 4  # 4 rows a step
    # the loss weighs the student's tokens of the 4 rows, none of the environment's
    assert teacher["tokens"] == pytest.approx(4 * episodes["model_tokens"])


def test_rlvr_rewards_are_the_episodes(small_world, tmp_path):
  c = _config(small_world, tmp_path, steps=2, log_every=1, eval_every=0)
  c.stage = "rlvr"
  c.teachers = ml_collections.ConfigDict()  # pure GRPO: one "policy" group
  c.data.slots_per_teacher, c.rl.group_size = 2, 2  # 4 rows: 2 prompts x 2 episodes
  c.data.eval_files = c.data.train_files
  c.rl.eval_prompts = 2
  config_lib.validate(c)
  trainer = rlvr.RLVRTrainer(c)
  assert trainer.evaluate() == {"lookup": {"accuracy": 0.0, "prompts": 2}}  # a random student
  trainer.run()
  records = [
    json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
  ]
  for record in records:
    episodes = record["episodes"]
    assert record["finite"] == 1.0 and episodes["turns"] > 1
    assert record["rewards"]["reward_mean"] == episodes["reward"]
    # the loss weighs the student's tokens, none of the environment's
    assert record["response_length"] == pytest.approx(episodes["model_tokens"])


def test_generate_writes_episodes_that_sft_reads(small_world, tmp_path):
  c = _config(small_world, tmp_path)
  c.stage = "generate"
  c.generate.model, c.generate.model_name = small_world["teacher_math"], "math"
  c.generate.prompt_files = c.data.train_files  # 16 prompts, and one whose reset fails:
  with open(c.data.train_files, "a") as f:  # its episode has no model turn to learn from
    f.write(json.dumps({"domain": "lookup", "prompt": "value of zz?\n"}) + "\n")
  c.generate.out_dir = str(tmp_path / "generated")
  c.generate.samples_per_prompt, c.generate.prompts_per_batch = 2, 4
  progress = generate.generate_all(c)
  assert progress["sampled"] == 34 and progress["kept"] == 32
  (path,) = generate.output_files(c)
  lines = [json.loads(line) for line in open(path)]
  assert len(lines) == 32 and not any("completion" in line for line in lines)
  for line in lines:
    origins = [t["origin"] for t in line["turns"]]
    assert origins[::2] == ["model"] * len(origins[::2])  # the model's turns alternate
    assert set(origins[1::2]) <= {"environment"}
    assert line["ended"] in REASONS and line["score"] in (0.0, 1.0)
  assert max(len(line["turns"]) for line in lines) > 1
  tokenizer = load_tokenizer(small_world["tokenizer"])
  examples = packing.read_examples(
    path, tokenizer, use_chat_template=c.data.use_chat_template, max_len=512
  )
  assert len(examples) == 32 and all(0 < sum(mask) < len(mask) for _, mask, _ in examples)
  # special tokens survive the round trip: the chat template's tool-message wrapper is written
  # as text and SFT reads it back as those tokens (so is a turn's closing stop token)
  im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
  for line, (ids, mask, _) in zip(lines, examples):
    observations = [t["text"] for t in line["turns"] if t["origin"] == "environment"]
    assert all("<|im_start|>tool\n" in text for text in observations)
    if observations:
      context = [i for i, m in zip(ids, mask) if not m]
      assert context.count(im_start) >= len(observations) + 1  # the prompt's, then each's


def test_episode_config_checks_name_their_field(small_world, tmp_path):
  c = _config(small_world, tmp_path)
  for field, value, message in (
    ("episode.environment", "no_colon", "episode.environment='no_colon'"),
    ("episode.max_turns", 0, "episode.max_turns=0"),
    ("episode.stop_strings", ("",), "episode.stop_strings"),
    ("sampling.prompt_buckets", (32, 64), "sampling.prompt_buckets=.*>= .* = 128"),
    ("sampling.continuous_slots", 2, "sampling.continuous_slots=2"),
    ("eval.verifier", "exact_match", "eval.verifier='exact_match'"),
    ("stage", "sft", "episode.environment=.*stage='sft'"),
  ):
    bad = _config(small_world, tmp_path)
    section, name = field.split(".") if "." in field else (None, field)
    (bad[section] if section else bad)[name] = value
    with pytest.raises(ValueError, match=message):
      config_lib.validate(bad)
  config_lib.validate(c)
  # rejection sampling of episodes keeps reward-1 episodes: no verifier needed, unlike
  # single-turn generation
  c.stage, c.generate.keep, c.generate.verifier = "generate", "verified", ""
  c.generate.model, c.generate.prompt_files = small_world["teacher_math"], c.data.train_files
  config_lib.validate(c)
  c.episode.environment = ""
  with pytest.raises(ValueError, match="generate.keep='verified'"):
    config_lib.validate(c)


def test_single_turn_configs_keep_their_hash():
  """The episode section at its default changes no run's hash (runs from before it resume)."""
  c = config_lib.base_config()
  without = config_lib.base_config()
  del without["episode"]
  assert config_lib.config_hash(c) == config_lib.config_hash(without)
  c.episode.environment = "jdistill.experiments.lookup:LookupEnv"
  assert config_lib.config_hash(c) != config_lib.config_hash(without)


def test_overlap_probe_weighs_the_students_tokens_only(small_world, tmp_path, monkeypatch):
  """The `overlap` command on multi-turn episodes: each teacher's token count is the
  student's tokens, none of the environment's."""
  from jdistill.overlap import probe
  from jdistill.sampling import episodes

  c = _config(small_world, tmp_path)
  c.data.eval_files = c.data.train_files
  seen = []
  run_episodes = episodes.run_episodes

  def spy(*args, **kw):
    seen.append(run_episodes(*args, **kw))
    return seen[-1]

  monkeypatch.setattr(episodes, "run_episodes", spy)
  report = probe.measure(c, rows_per_domain=4)
  (out,) = seen
  assert (out.completion_mask - out.model_mask).sum() > 0  # there were environment tokens
  assert report["teachers"]["math"]["tokens"] == int(out.model_mask.sum())


def test_a_resumed_episode_run_equals_an_uninterrupted_one(small_world, tmp_path):
  """OPD on episodes stopped after 2 of 4 steps and resumed from its checkpoint ends with the
  params of a straight run: the episodes of a step are a function of the seed and the step."""
  import jax
  import numpy as np

  def run(sessions, name):
    (tmp_path / name).mkdir()
    for steps in sessions:
      c = _config(small_world, tmp_path / name, steps=4, log_every=1, eval_every=0)
      c.checkpoint.dir, c.checkpoint.every = str(tmp_path / name / "ckpt"), 2
      trainer = train.OPDTrainer(c)  # resumes from the latest checkpoint, if any
      trainer.run(steps=steps)
    return trainer

  straight, resumed = run([4], "a"), run([2, 2], "b")
  assert resumed.checkpointer.all_steps() == [2, 4]
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    jax.device_get(straight.params),
    jax.device_get(resumed.params),
  )


def test_chat_format_runs_wrap_observations_as_tool_messages(small_world, tmp_path):
  from jdistill.runtime import build

  c = _config(small_world, tmp_path)
  c.data.use_chat_template = True
  _, limits = build.episodes(c)  # the toy tokenizer's ChatML template: role "tool"
  assert limits.observation_role.render("x", turn_closed=True) == (
    "<|im_end|>\n<|im_start|>tool\nx<|im_end|>\n<|im_start|>assistant\n"
  )
  c.data.use_chat_template = False
  assert build.episodes(c)[1].observation_role is None


def test_rlvr_on_episodes_learns_the_turn_after_the_observation(small_world, tmp_path):
  """GRPO on two-turn episodes (`toy.VowelEnv`: reward 1 when the turn after the
  environment's observation ends in "a"; a random student earns ~0.05): the sampled reward
  and the greedy success rise, so the episodes' rewards reach their own rows' model tokens."""
  c = _config(small_world, tmp_path, steps=30, log_every=1, eval_every=0)
  c.stage = "rlvr"
  c.teachers = ml_collections.ConfigDict()
  c.num_devices = 1
  c.episode.environment = "jdistill.testing.toy:VowelEnv"
  c.episode.stop_strings = tuple("aeiou")
  c.episode.max_turns = 2
  c.episode.max_total_tokens = 48
  c.data.slots_per_teacher, c.rl.group_size = 4, 8
  c.data.eval_files = c.data.train_files
  c.rl.eval_prompts = 8
  c.optimizer.lr = 1e-2
  config_lib.validate(c)
  trainer = rlvr.RLVRTrainer(c)
  assert trainer.evaluate()["lookup"]["accuracy"] == 0.0
  rewards = [r["rewards"]["reward_mean"] for r in trainer.run()]
  first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
  assert first < 0.1 and last > first + 0.2, rewards
  assert trainer.evaluate()["lookup"]["accuracy"] >= 0.75

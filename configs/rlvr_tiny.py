"""Embedded CPU config for RLVR (GRPO): a tiny random student learns to answer "larger of a
and b ->" with the larger digit, rewarded by a verifier (`jdistill.testing.toy:larger_reward`: 1 for
the right digit, 0.2 for another digit). No teachers: pure GRPO. Add teachers and
`--config.loss.kl_weight` for the unified objective (see docs/design.md):

  python -m jdistill rlvr --config=configs/rlvr_tiny.py --config.train.steps=40
"""

import os

import ml_collections

from jdistill.testing.toy import load_or_make_world, tiny_config, write_larger_prompts

WORLD = os.environ.get("JDISTILL_TOY_WORLD", "runs/toy_world")


def get_config():
  paths = load_or_make_world(WORLD)
  train = f"{WORLD}/larger_train.jsonl"
  evals = f"{WORLD}/larger_eval.jsonl"
  if not os.path.exists(evals):
    write_larger_prompts(train, 256, seed=0)
    write_larger_prompts(evals, 64, seed=1)
  config = tiny_config(paths)
  config.stage = "rlvr"
  config.output_dir = "runs/rlvr_tiny"
  config.teachers = ml_collections.ConfigDict()
  config.data.train_files = train
  config.data.eval_files = evals
  config.data.use_chat_template = False
  config.data.max_prompt_len = 16
  config.data.slots_per_teacher = 8  # prompts per step
  config.sampling.prompt_buckets = (16,)
  config.sampling.max_new_tokens = 1  # the answer is one token
  config.sampling.stop_at_eos = False
  config.rl.group_size = 8
  config.rl.verifier = "jdistill.testing.toy:larger_reward"
  config.rl.eval_prompts = 64
  config.optimizer.lr = 3e-3
  config.optimizer.warmup_steps = 0
  config.optimizer.schedule = "constant"
  config.train.steps = 60
  config.train.log_every = 5
  config.train.eval_every = 0
  return config

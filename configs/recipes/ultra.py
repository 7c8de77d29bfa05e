"""Nemotron 3 Ultra's recipe as a preset: unified RLVR, a warmup SFT on the teachers'
distribution, then MOPD with the sampled-token advantage. Stages:

  1-rlvr      unified RLVR: GRPO over all domains at once (rl.group_size rollouts per prompt,
              verifiable rewards, PPO clip), *no* teacher term (loss.kl_weight = 0 here only,
              see STAGE_OVERRIDES)
  2-generate  each teacher samples completions of its domain's training prompts, verified
              (keep only correct ones): the teachers' training distribution
  3-sft       warmup SFT of the RLVR student on those completions (fixed steps)
  4-opd       MOPD: per token, advantage sg[log p_T - log q] (sampled-token reverse KL), the
              importance ratio q/pi against the behaviour (sampling) policy PPO-clipped at
              loss.clip_eps = 0.2 and IcePop-masked outside [1/5, 5] (loss.icepop_c = 5, the
              bounds of the public mopd.yaml's truncated importance ratio); one rollout per
              prompt; rewards are not in the MOPD advantage (the opd stage has no reward term)

Run it faithfully through this file, which applies STAGE_OVERRIDES to each stage:

  PYTHONPATH=. python configs/recipes/ultra.py [--config.output_dir=... --config.student.path=...]
  # or, in Python: ultra.run(ultra.get_config())  (jdistill.stages.pipeline.run + run_stage)

`python -m jdistill pipeline --config=configs/recipes/ultra.py` runs the same stages *without*
the overrides: a pipeline gives every stage one config, and the rlvr stage adds the teachers'
sampled-token advantage whenever teachers are configured (loss.kl_weight, which MOPD needs at
1). Through the plain CLI stage 1 is therefore the unified reward + distillation advantage
(issue 22's third RL arm), not Ultra's pure GRPO.

Deviations from the report, and why:
- Ultra's first stage, SFT on its general data, is not a stage here: the task world's base is
  already that model (SFT on the plain mixture; the world does not commit that data), and one
  pipeline cannot give two sft stages different data (`sft.train_files` is shared; an empty
  one takes the previous generate stage's files). On your models start from your SFT
  checkpoint (`--config.student.path`).
- The teachers are the task world's external teachers (other inits trained on external-style
  data, Ultra's situation: teachers from other pipelines' data). The public reproduction
  forks them from the student's RLVR checkpoint; that needs the overlap dial's teachers.
  `:lineage` picks the lineage teachers instead (`--config=configs/recipes/ultra.py:lineage`).
- The optimizer (lr, schedule) is shared by the stages, as the pipeline shares one config;
  Ultra's is a constant 2e-6 at scale, here the task world's lr (tune it per recipe).
- The warmup SFT runs fixed steps, as Ultra's; `sft.until_overlap` > 0 makes it the project's
  overlap-triggered warmup instead.

By default it runs on the committed task world (see configs/recipes/v4.py); on your models
override student, tokenizer, data and teacher paths as there. Budget: RLVR_STEPS (25) steps
of 16 prompts x 4 rollouts x 3 groups sample as many student tokens as 100 MOPD steps; with
MOPD_STEPS (200) the total equals V4's 300 OPD steps (tests/experiments/test_recipes.py asserts it).
"""

import os

import ml_collections

from jdistill.config import base_config, teacher_config
from jdistill.experiments import task_world, tasks

WORLD = task_world.COMMITTED
VERIFIER = "jdistill.experiments.tasks:verify"
RLVR_STEPS, WARMUP_STEPS, MOPD_STEPS = 25, 60, 200

# Per-stage fields the one pipeline config cannot hold (see the module docstring).
STAGE_OVERRIDES = {"rlvr": {"loss.kl_weight": 0.0}}


def world_config(teachers: str, loss: str, world: str = WORLD) -> ml_collections.ConfigDict:
  """The task-world fields (as configs/recipes/v4.py's `world_config`)."""
  c = base_config()
  c.student.path = os.path.join(world, "base")
  c.tokenizer = os.path.join(world, "tokenizer")
  c.teachers = ml_collections.ConfigDict(
    {
      d: teacher_config(os.path.join(world, f"{teachers}_{d}"), d, loss, param_dtype="float32")
      for d in tasks.DOMAINS
    }
  )
  c.data.train_files = os.path.join(world, "train.jsonl")
  c.data.eval_files = os.path.join(world, "eval.jsonl")
  c.data.use_chat_template = False
  c.data.max_prompt_len = 24
  c.data.slots_per_teacher = 16
  c.sampling.max_new_tokens = 48
  c.sampling.prompt_buckets = (24,)
  c.loss.chunk_size = 16
  c.optimizer.b2 = 0.99
  c.eval.verifier = VERIFIER
  c.train.log_every = 10
  c.train.eval_every = 50
  c.checkpoint.every = 50
  return c


def get_config(teachers: str = "external"):
  c = world_config(teachers or "external", "sampled_token")
  c.output_dir = "runs/recipes/ultra"
  c.pipeline.stages = ("rlvr", "generate", "sft", "opd")
  c.pipeline.steps = (RLVR_STEPS, 0, WARMUP_STEPS, MOPD_STEPS)
  c.train.steps = MOPD_STEPS
  # rlvr: GRPO, group-normalised rewards, the same verifier for every domain
  c.rl.group_size = 4
  c.rl.verifier = VERIFIER
  c.rl.reward_weight = 1.0
  c.rl.eval_prompts = 64
  # MOPD (and RLVR's policy ratio): PPO clip and IcePop against the behaviour policy
  c.loss.kl_weight = 1.0
  c.loss.clip_eps = 0.2
  c.loss.icepop_c = 5.0
  # generate: the teachers' own verified completions of the training prompts
  c.generate.model = "teachers"
  c.generate.samples_per_prompt = 1
  c.generate.prompts_per_batch = 64
  c.generate.verifier = VERIFIER
  c.generate.keep = "verified"
  c.sft.max_len = 96
  c.sft.rows_per_step = 16
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 5
  return c


def with_overrides(config):
  """`config` (one stage's) with STAGE_OVERRIDES[config.stage] applied."""
  c = config.copy_and_resolve_references()
  for field, value in STAGE_OVERRIDES.get(c.stage, {}).items():
    *parents, leaf = field.split(".")
    node = c
    for part in parents:
      node = node[part]
    node[leaf] = value
  return c


def run_stage(config) -> dict:
  from jdistill import stages

  return stages.run_stage(with_overrides(config))


def run(config) -> list[dict]:
  """The pipeline with STAGE_OVERRIDES: each stage's summary."""
  from jdistill.stages import pipeline

  return pipeline.run(config, run_stage)


if __name__ == "__main__":
  from absl import app
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file("config", os.path.abspath(__file__))
  app.run(lambda argv: run(_CONFIG.value))

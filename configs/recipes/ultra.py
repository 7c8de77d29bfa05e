"""Nemotron 3 Ultra's recipe as a preset: unified RLVR, a warmup SFT on the teachers'
distribution, then MOPD with the sampled-token advantage. Stages:

  1-rlvr      unified RLVR: GRPO over all domains at once (rl.group_size rollouts per prompt,
              verifiable rewards, PPO clip), *no* teacher term (loss.kl_weight = 0 in this
              stage only: pipeline.overrides.rlvr)
  2-generate  each teacher samples completions of its domain's training prompts, verified
              (keep only correct ones): the teachers' training distribution
  3-sft       warmup SFT of the RLVR student on those completions (fixed steps)
  4-opd       MOPD: per token, advantage sg[log p_T - log q] (sampled-token reverse KL), the
              importance ratio q/pi against the behaviour (sampling) policy PPO-clipped at
              loss.clip_eps = 0.2 and IcePop-masked outside [1/5, 5] (loss.icepop_c = 5, the
              bounds of the public mopd.yaml's truncated importance ratio); one rollout per
              prompt; rewards are not in the MOPD advantage (the opd stage has no reward term)

  python -m jdistill pipeline --config=configs/recipes/ultra.py

`pipeline.overrides.rlvr.loss.kl_weight=0.0` makes stage 1 pure GRPO while MOPD keeps the
teachers' advantage; set it to 1.0 for the unified reward + distillation advantage in RLVR
(issue 22's third RL arm).

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
- The optimizer (lr, schedule) is shared by the stages (`pipeline.overrides.<stage>` can set
  another); Ultra's is a constant 2e-6 at scale, here the task world's lr (tune it per recipe).
- The warmup SFT runs fixed steps, as Ultra's; `sft.until_overlap` > 0 makes it the project's
  overlap-triggered warmup instead.

By default it runs on the committed task world (see configs/recipes/v4.py); on your models
override student, tokenizer, data and teacher paths as there. Budget: RLVR_STEPS (25) steps
of 16 prompts x 4 rollouts x 3 groups sample as many student tokens as 100 MOPD steps; with
MOPD_STEPS (200) the total equals V4's 300 OPD steps (tests/experiments/test_recipes.py asserts it).
"""

import ml_collections

from jdistill.experiments.task_world import VERIFIER, recipe_config

RLVR_STEPS, WARMUP_STEPS, MOPD_STEPS = 25, 60, 200


def get_config(teachers: str = "external"):
  c = recipe_config(teachers or "external", "sampled_token")
  c.output_dir = "runs/recipes/ultra"
  c.pipeline.stages = ("rlvr", "generate", "sft", "opd")
  c.pipeline.steps = (RLVR_STEPS, 0, WARMUP_STEPS, MOPD_STEPS)
  # pure GRPO in stage 1: no teacher term there (MOPD keeps loss.kl_weight = 1)
  c.pipeline.overrides.rlvr = ml_collections.ConfigDict({"loss": {"kl_weight": 0.0}})
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

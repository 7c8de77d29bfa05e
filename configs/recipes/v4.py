"""DeepSeek V4's recipe as a preset: teachers forked from one base, full-vocabulary reverse KL at
every token, no student RL and no warmup. One stage:

  1-opd   multi-teacher OPD from the base: per teacher, full-vocab reverse KL on the student's
          rollouts of its domain's prompts, weighted (w_i = 1); teachers streamed: params in
          host memory, brought onto the mesh one at a time, their last hidden states cached
          per step and the logits rebuilt from them (V4's teacher hidden-state cache)

  python -m jdistill pipeline --config=configs/recipes/v4.py
  python -m jdistill pipeline --config=configs/recipes/v4.py:external   # off-lineage teachers

By default it runs on the committed task world (`jdistill/experiments/assets/task_world`: a
weak base and, per domain add / count / reverse, a lineage teacher forked from the base; with
`:external`, the other-init teachers trained on the external style). On your models override
the paths (one teacher per domain name; add teachers as `--config.teachers.<name>.*`):

  python -m jdistill pipeline --config=configs/recipes/v4.py \
      --config.student.path=/ckpt/base --config.tokenizer=/ckpt/base \
      --config.data.train_files=/data/prompts.jsonl --config.data.eval_files=/data/eval.jsonl \
      --config.teachers.add.path=/ckpt/math-rl ...

Budget: OPD_STEPS (300) OPD steps sample as many student tokens as the Ultra preset's 25 RLVR
steps (16 prompts x 4 rollouts per teacher group: 100 OPD steps' worth) + 200 MOPD steps
(`jdistill.experiments.budget.opd_steps_for_budget`; tests/experiments/test_recipes.py asserts
it), so the two presets compare at equal budget (at full length; with stop_at_eos the counts
are measured).

Deviations from V4: 3 teachers, not 10+; the teachers are domain SFT forks (the task world's),
without their own GRPO; the learning rate is the task world's (tune it per recipe, issue 22).
"""

from jdistill.experiments.task_world import recipe_config

OPD_STEPS = 300


def get_config(teachers: str = "lineage"):
  c = recipe_config(teachers or "lineage", "reverse_kl")
  c.output_dir = "runs/recipes/v4"
  for name in c.teachers.keys():
    c.teachers[name].placement = "streamed"
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 5
  c.train.steps = OPD_STEPS
  c.pipeline.stages = ("opd",)
  c.pipeline.steps = (OPD_STEPS,)
  return c

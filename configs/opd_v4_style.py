"""DeepSeek-V4-style multi-teacher OPD: teachers forked from one base (high support overlap),
full-vocabulary reverse KL at every token, weighted per teacher, no warmup SFT.

  python -m jdistill opd --config=configs/opd_v4_style.py \
      --config.student.path=/ckpt/base --config.data.train_files=/data/opd.jsonl \
      --config.teachers.math.path=/ckpt/math-rl --config.teachers.code.path=/ckpt/code-rl \
      --config.teachers.agent.path=/ckpt/agent-rl --config.checkpoint.dir=/ckpt/opd-v4
"""

import ml_collections

from jdistill.config import base_config, teacher_config


def get_config():
  c = base_config()
  c.output_dir = "runs/opd_v4"
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.student.dtype = "bfloat16"
  c.student.remat_policy = "full"
  c.teachers = ml_collections.ConfigDict(
    {
      "math": teacher_config(domains="math", loss="reverse_kl", weight=1.0),
      "code": teacher_config(domains="code", loss="reverse_kl", weight=1.0),
      "agent": teacher_config(domains="agent,tool_use", loss="reverse_kl", weight=1.0),
    }
  )
  c.data.max_prompt_len = 2048
  c.data.slots_per_teacher = 32
  c.sampling.max_new_tokens = 4096
  c.loss.chunk_size = 1024
  c.optimizer.lr = 3e-6
  c.optimizer.warmup_steps = 20
  c.train.steps = 2000
  c.train.eval_every = 100
  c.checkpoint.every = 100
  return c

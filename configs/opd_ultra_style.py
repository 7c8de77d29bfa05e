"""Nemotron-3-Ultra-style multi-teacher OPD: teachers SFT'd on other models' data (low support
overlap), sampled-token reverse-KL advantage with PPO clipping against the sampler's
logprobs. Run a warmup SFT on the teachers' data first, and check overlap before training:

  python -m jdistill.overlap --config=configs/opd_ultra_style.py --config.student.path=... ...
  python -m jdistill opd --config=configs/opd_ultra_style.py \
      --config.student.path=/ckpt/student-warm --config.data.train_files=/data/opd.jsonl \
      --config.teachers.reasoning.path=/ckpt/reasoning --config.teachers.chat.path=/ckpt/chat
"""

import ml_collections

from jdistill.config import base_config, teacher_config


def get_config():
  c = base_config()
  c.output_dir = "runs/opd_ultra"
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.student.dtype = "bfloat16"
  c.student.remat_policy = "full"
  c.teachers = ml_collections.ConfigDict(
    {
      "reasoning": teacher_config(domains="math,science,code", loss="sampled_token"),
      "chat": teacher_config(domains="chat,instruction", loss="sampled_token"),
    }
  )
  c.data.max_prompt_len = 2048
  c.data.slots_per_teacher = 64
  c.sampling.max_new_tokens = 8192
  c.loss.clip_eps = 0.2
  c.loss.chunk_size = 1024
  c.optimizer.lr = 1e-6
  c.train.steps = 1000
  c.checkpoint.every = 50
  return c

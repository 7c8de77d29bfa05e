"""A self-made toy world for the CPU demo and tests: tokenizer, prompts, teachers, student.

Nothing is downloaded. Teachers are random decoders of *different* architectures
(a Llama and a Qwen3), made sharp (scaled unembedding) so each has a distinct,
confident next-token distribution; the student is a small random Llama that has
to move onto each teacher's distribution for that teacher's domain.
"""

from __future__ import annotations

import json
import os
import random

import jax.numpy as jnp
import ml_collections
from flax import nnx

from jdistill.config import base_config, teacher_config
from jdistill.data.tokenizer import train_tiny_tokenizer
from jdistill.models import ModelConfig, Transformer, hf

DOMAINS = {"math": "math", "code": "code"}


def _math_prompt(rng: random.Random) -> str:
  a, b = rng.randint(0, 99), rng.randint(0, 99)
  op = rng.choice(["+", "-", "*"])
  return f"math: compute {a} {op} {b} and explain the steps."


def _code_prompt(rng: random.Random) -> str:
  name = rng.choice(["sort", "parse", "merge", "count", "reverse", "sum"])
  thing = rng.choice(["list", "string", "tree", "file", "table"])
  return f"code: write a python function that will {name} a {thing}."


PROMPTS = {"math": _math_prompt, "code": _code_prompt}


def write_prompts(path: str, n_per_domain: int, seed: int) -> str:
  rng = random.Random(seed)
  with open(path, "w") as f:
    for _ in range(n_per_domain):
      for domain, make in PROMPTS.items():
        record = {"domain": domain, "prompt": make(rng)}
        if domain == "math":  # "math: compute a op b ...": a verifiable reference answer
          a, op, b = record["prompt"].split()[2:5]
          record["answer"] = str(
            {"+": int(a) + int(b), "-": int(a) - int(b)}.get(op, int(a) * int(b))
          )
        f.write(json.dumps(record) + "\n")
  return path


def write_larger_prompts(path: str, n: int, seed: int) -> str:
  """A tiny verifiable task for RLVR: "larger of a and b ->" with one-digit a != b; the
  reference answer is the larger digit. Domain "larger"."""
  rng = random.Random(seed)
  with open(path, "w") as f:
    for _ in range(n):
      a, b = rng.sample(range(10), 2)
      record = {"domain": "larger", "prompt": f"larger of {a} and {b} ->", "answer": str(max(a, b))}
      f.write(json.dumps(record) + "\n")
  return path


def larger_reward(completion: str, reference: str) -> float:
  """Shaped verifier of the "larger" task: 1 for the right digit, 0.2 for another single
  digit (the answer's format), 0 otherwise. Used as
  `rl.verifier="jdistill.testing.toy:larger_reward"`."""
  answer = completion.strip()
  if answer == reference.strip():
    return 1.0
  return 0.2 if len(answer) == 1 and answer.isdigit() else 0.0


class VowelEnv:
  """A two-turn toy environment for RL on episodes (`episode.environment=
  "jdistill.testing.toy:VowelEnv"`, turns ending at a vowel: `episode.stop_strings=("a", "e",
  "i", "o", "u")`): the first turn is answered with the observation " now a: ", the second
  ends the episode with reward 1 if its text ends in "a", else 0. A random student earns ~1/5."""

  def reset(self, record: dict) -> dict:
    del record
    return {"turns": 0}

  def step(self, state: dict, turn_text: str) -> tuple[str | None, bool, float | None]:
    state["turns"] += 1
    if state["turns"] == 1:
      return " now a: ", False, None
    return None, True, float(turn_text.endswith("a"))


def random_model_dir(
  out_dir: str,
  cfg: ModelConfig,
  seed: int,
  tokenizer,
  *,
  unembed_scale: float = 1.0,
  preferred_ids=(),
  preference: float = 0.0,
) -> str:
  """Random jdistill model exported as HF.

  `unembed_scale` sharpens its next-token distributions. With `preference > 0` the model is
  a "specialist": every token embedding gets a shared offset on hidden unit 0, whose
  unembedding row favours `preferred_ids`, so the model leans towards those tokens in
  every context (on top of its random, context-dependent part).
  """
  if cfg.tie_word_embeddings:
    raise ValueError("toy models use untied embeddings")
  model = Transformer(cfg, nnx.Rngs(seed))
  head = model.lm_head[...] * unembed_scale
  if preference:
    model.embed[...] = model.embed[...].at[:, 0].add(0.1)
    row = jnp.zeros((cfg.vocab_size,)).at[jnp.asarray(list(preferred_ids))].set(preference)
    head = head.at[0].set(row)
  model.lm_head[...] = head
  hf.to_hf(model, out_dir, tokenizer=tokenizer)
  return out_dir


def _token_ids(tokenizer, words: str) -> list[int]:
  return sorted(
    {i for w in words.split() for i in tokenizer.encode(" " + w)}
    | {i for w in words.split() for i in tokenizer.encode(w)}
  )


def make_toy_world(
  root: str,
  *,
  hidden: int = 64,
  layers: int = 2,
  n_train: int = 64,
  n_eval: int = 16,
  seed: int = 0,
) -> dict[str, str]:
  """Writes tokenizer, prompt files, two teachers and a student under `root`; returns paths."""
  os.makedirs(root, exist_ok=True)
  rng = random.Random(seed)
  texts = [make(rng) for _ in range(300) for make in PROMPTS.values()]
  texts += ["the student samples and the teacher grades every token of the rollout."] * 10
  tok_dir = os.path.join(root, "tokenizer")
  tokenizer = train_tiny_tokenizer(tok_dir, texts, vocab_size=384)
  vocab = len(tokenizer)
  base = dict(
    vocab_size=vocab,
    hidden_size=hidden,
    intermediate_size=2 * hidden,
    num_layers=layers,
    num_heads=4,
    num_kv_heads=2,
    head_dim=hidden // 4,
  )
  math_ids = _token_ids(tokenizer, "0 1 2 3 4 5 6 7 8 9 + - * = compute steps")
  code_ids = _token_ids(tokenizer, "def return python function sort parse list string tree")
  teachers = {
    "math": random_model_dir(
      os.path.join(root, "teacher_math"),
      ModelConfig(model_type="llama", **base),
      seed + 1,
      tokenizer,
      unembed_scale=15.0,
      preferred_ids=math_ids,
      preference=2.0,
    ),
    "code": random_model_dir(
      os.path.join(root, "teacher_code"),
      ModelConfig(model_type="qwen3", qk_norm=True, **base),
      seed + 2,
      tokenizer,
      unembed_scale=15.0,
      preferred_ids=code_ids,
      preference=2.0,
    ),
  }
  student = random_model_dir(
    os.path.join(root, "student"), ModelConfig(model_type="llama", **base), seed + 3, tokenizer
  )
  return {
    "tokenizer": tok_dir,
    "student": student,
    "teacher_math": teachers["math"],
    "teacher_code": teachers["code"],
    "train": write_prompts(os.path.join(root, "train.jsonl"), n_train, seed),
    "eval": write_prompts(os.path.join(root, "eval.jsonl"), n_eval, seed + 100),
  }


def load_or_make_world(root: str) -> dict[str, str]:
  """The toy world under `root`, written on first use (configs call this)."""
  if not os.path.exists(os.path.join(root, "eval.jsonl")):
    return make_toy_world(root)
  names = ("tokenizer", "student", "teacher_math", "teacher_code")
  return {
    **{k: os.path.join(root, k) for k in names},
    "train": os.path.join(root, "train.jsonl"),
    "eval": os.path.join(root, "eval.jsonl"),
  }


def tiny_config(paths: dict[str, str]):
  """The embedded CPU config: two teachers on a toy world.

  math: reverse KL (a Llama teacher); code: sampled-token (a Qwen3 teacher).
  """
  c = base_config()
  c.output_dir = "runs/opd_tiny"
  c.student.path = paths["student"]
  c.tokenizer = paths["tokenizer"]
  c.teachers = ml_collections.ConfigDict(
    {
      "math": teacher_config(paths["teacher_math"], "math", loss="reverse_kl", weight=1.0),
      "code": teacher_config(paths["teacher_code"], "code", loss="sampled_token", weight=1.0),
    }
  )
  c.data.train_files = paths["train"]
  c.data.eval_files = paths["eval"]
  c.data.max_prompt_len = 32
  c.data.slots_per_teacher = 8
  c.sampling.max_new_tokens = 16
  c.sampling.prompt_buckets = (32,)
  c.sampling.stop_at_eos = False
  c.loss.chunk_size = 16
  c.optimizer.lr = 1e-2
  c.optimizer.warmup_steps = 5
  c.optimizer.b2 = 0.99
  c.train.steps = 60
  c.train.log_every = 5
  c.train.eval_every = 50
  c.checkpoint.every = 20
  # no sample rollouts (each recording compiles one more function: the tests' time budget);
  # `--config.train.sample_rows=2` records them for the report
  c.train.sample_rows = 0
  return c


def short_run_config(paths: dict[str, str], output_dir: str, *, max_new_tokens: int = 8, **train):
  """`tiny_config` for the tests' short runs: 4 rows per teacher, `max_new_tokens` new tokens,
  loss chunks of 8, one warmup step, output in `output_dir`; `train` sets `config.train`
  fields (e.g. `steps=4, eval_every=0`)."""
  c = tiny_config(paths)
  c.output_dir = str(output_dir)
  c.data.slots_per_teacher = 4
  c.sampling.max_new_tokens = max_new_tokens
  c.loss.chunk_size = 8
  c.optimizer.warmup_steps = 1
  for key, value in train.items():
    c.train[key] = value
  return c

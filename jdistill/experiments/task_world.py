"""The task world: a tokenizer, a weak base, and strong teachers of two lineages, built once.

  python -m jdistill task_world --root=runs/task_world      # builds what is missing
  python -m jdistill task_world --root=runs/task_world --commit   # ... and replaces the
                                                    # committed copy in jdistill/experiments/assets/

On first use (no download) it writes under `root`:

  tokenizer/            character-level (the byte alphabet, no merges): digits stay digits
  eval.jsonl            held-out prompts, `WorldSpec.eval_per_domain` per domain (+ answers)
  train.jsonl           OPD / RL prompts, none of them held out
  data/*.jsonl          SFT examples: the base's plain mixture, plain and external per domain
  base/                 a tiny decoder pretrained briefly on the plain mixture: weak at each
  lineage_<domain>/     forks of the base, each fine-tuned on its domain (DeepSeek-V4 style)
  external_<domain>/    other random inits trained on the external style (Ultra style)
  world.json            every model's greedy accuracy per domain, and the spec

Every model directory carries `artifact.json` with a hash of the spec and of what it was
built from, so a re-run skips finished work and a changed spec rebuilds only what changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time

import jax
import ml_collections

from jdistill.config import base_config, teacher_config
from jdistill.experiments import tasks
from jdistill.models import ModelConfig
from jdistill.runtime.io import write_json_atomic

log = logging.getLogger("jdistill")


@dataclasses.dataclass(frozen=True)
class WorldSpec:
  """Sizes of the world. The defaults give teachers >= 0.9 on their domain on 2 CPU cores."""

  hidden: int = 64
  layers: int = 2
  heads: int = 4
  kv_heads: int = 2
  mlp: int = 256
  base_steps: int = 300  # plain mixture: format and a little skill
  teacher_steps: int = 500  # per teacher, on its own domain
  examples_per_domain: int = 4000
  eval_per_domain: int = 64
  train_prompts_per_domain: int = 256
  rows_per_step: int = 32
  lr: float = 3e-3
  max_new_tokens: int = 48
  seed: int = 0

  def model_config(self, vocab: int) -> ModelConfig:
    return ModelConfig(
      model_type="llama",
      vocab_size=vocab,
      hidden_size=self.hidden,
      intermediate_size=self.mlp,
      num_layers=self.layers,
      num_heads=self.heads,
      num_kv_heads=self.kv_heads,
      head_dim=self.hidden // self.heads,
    )


def _hash(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _done(path: str, digest: str) -> bool:
  marker = os.path.join(path, "artifact.json")
  if not os.path.exists(marker):
    return False
  with open(marker) as f:
    return json.load(f).get("hash") == digest


def _read_hash(path: str) -> str | None:
  with open(os.path.join(path, "artifact.json")) as f:
    return json.load(f).get("hash")


def _mark(path: str, digest: str, **info) -> None:
  write_json_atomic(os.path.join(path, "artifact.json"), {"hash": digest, **info}, indent=1)


# The devices each stage of the task-world experiments runs on (`num_devices`: 0 = all). The
# tests set 1: their tiny worlds compile and run fastest unsharded (no hash includes it).
NUM_DEVICES = 0


def sft_config(root: str, name: str, init: str, data: str, steps: int, spec: WorldSpec):
  """The SFT stage config that trains model `name` from `init` on `data`."""
  c = base_config()
  c.stage = "sft"
  c.num_devices = NUM_DEVICES
  c.run_mode = "new"
  c.seed = spec.seed
  c.output_dir = os.path.join(root, "train", name)
  c.student.path = init
  c.tokenizer = os.path.join(root, "tokenizer")
  c.data.use_chat_template = False
  c.sft.train_files = data
  c.sft.max_len = 96
  c.sft.rows_per_step = spec.rows_per_step
  c.loss.chunk_size = 32
  c.optimizer.lr = spec.lr
  c.optimizer.warmup_steps = min(20, steps)
  c.optimizer.b2 = 0.99
  c.train.steps = steps
  c.train.log_every = max(steps // 5, 1)
  c.train.eval_every = 0
  return c


def _train(root, name, init, data, steps, spec, log) -> None:
  from jdistill.stages.sft import SFTTrainer

  trainer = SFTTrainer(sft_config(root, name, init, data, steps, spec))
  trainer.run()
  trainer.export(os.path.join(root, name))
  log(f"task world: trained {name} ({steps} steps)")


# The default world, trained once and committed (a few MB of safetensors), so `make demo` and
# the experiment skip the ~6 minutes of building it; `python -m jdistill task_world --commit`
# regenerates it (tests/experiments/test_task_world.py checks that a smaller rebuild lands in
# the same accuracy bands, and that the committed models still score what world.json says).
COMMITTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "task_world")
COMMITTED_FILES = ("tokenizer", "eval.jsonl", "train.jsonl", "artifact.json", "world.json")
VERIFIER = "jdistill.experiments.tasks:verify"


def recipe_config(teachers: str, loss: str, world: str = COMMITTED):
  """What the recipes (configs/recipes/) share on a task world: its base as the student, its
  tokenizer and prompts, the sampling and logging settings, and one teacher of kind
  `teachers` (lineage | external) per domain with `loss`."""
  c = base_config()
  c.num_devices = NUM_DEVICES
  c.student.path = os.path.join(world, "base")
  c.tokenizer = os.path.join(world, "tokenizer")
  c.teachers = ml_collections.ConfigDict(
    {
      d: teacher_config(os.path.join(world, f"{teachers}_{d}"), d, loss=loss, param_dtype="float32")
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


def eval_records(root: str) -> list[dict]:
  with open(os.path.join(root, "eval.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


KINDS = ("lineage", "external")


def model_names(domains=tasks.DOMAINS, kinds=KINDS) -> list[str]:
  return ["base"] + [f"{kind}_{d}" for kind in kinds for d in domains]


def build(
  root: str, spec: WorldSpec = WorldSpec(), log=log.info, domains=None,
  world_domains=tasks.DOMAINS, kinds=KINDS,
) -> dict:  # fmt: skip
  """Builds what is missing under `root` (see the module docstring) → world.json's content.
  `world_domains`: the world's domains (its prompts, the base's mixture, the SFT data);
  `domains`: those of them whose teachers of `kinds` are built (default: all of them)."""
  world_domains = tuple(world_domains)
  domains = world_domains if domains is None else tuple(domains)
  if unknown := set(world_domains) - set(tasks.ALL_DOMAINS):
    raise ValueError(f"world_domains {sorted(unknown)} invalid; allowed: {list(tasks.ALL_DOMAINS)}")
  if not set(domains) <= set(world_domains):
    raise ValueError(f"domains {list(domains)} must be among world_domains {list(world_domains)}")
  if unknown := set(kinds) - set(KINDS):
    raise ValueError(f"kinds {sorted(unknown)} invalid; allowed: {list(KINDS)}")
  from jdistill.data.tokenizer import train_tiny_tokenizer
  from jdistill.eval.accuracy import model_accuracy
  from jdistill.testing.toy import random_model_dir

  t0 = time.time()
  # Another world's domains join the hash; the default world's hash stays what its committed
  # artifacts carry (they are not rebuilt).
  other = () if world_domains == tasks.DOMAINS else (list(world_domains),)
  data_hash = _hash(
    spec.examples_per_domain, spec.eval_per_domain, spec.train_prompts_per_domain, spec.seed,
    "data-v1", *other,
  )  # fmt: skip
  arch = (spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.mlp)
  training = (spec.rows_per_step, spec.lr)
  tok_dir = os.path.join(root, "tokenizer")
  if not _done(root, data_hash):
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    # The byte alphabet and no merges (vocab_size 261): one token per character.
    train_tiny_tokenizer(tok_dir, ["add 12 34\n"], vocab_size=261)
    s = spec.seed
    tasks.write_prompts(os.path.join(root, "eval.jsonl"), world_domains, spec.eval_per_domain, s)
    held_out = {r["prompt"] for r in eval_records(root)}
    train = tasks.write_prompts(
      os.path.join(root, "train_all.jsonl"), world_domains, spec.train_prompts_per_domain, s + 1
    )
    with open(train) as f, open(os.path.join(root, "train.jsonl"), "w") as out:
      out.writelines(line for line in f if json.loads(line)["prompt"] not in held_out)
    os.remove(train)
    n = spec.examples_per_domain
    tasks.write_examples(
      os.path.join(root, "data", "base_plain.jsonl"), world_domains, n // 8, s + 2, "plain",
      exclude=held_out,
    )  # fmt: skip
    for k, domain in enumerate(world_domains):
      for style in tasks.STYLES:
        tasks.write_examples(
          os.path.join(root, "data", f"{style}_{domain}.jsonl"), [domain], n, s + 10 + k,
          style, exclude=held_out,
        )  # fmt: skip
    _mark(root, data_hash, what="tokenizer, prompts and SFT data")
  from jdistill.data.tokenizer import load_tokenizer

  tokenizer = load_tokenizer(tok_dir)
  cfg = spec.model_config(len(tokenizer))

  def init(name: str, seed: int) -> str:
    path = os.path.join(root, "init", name)
    digest = _hash(data_hash, arch, name, seed)
    if not _done(path, digest):
      random_model_dir(path, cfg, seed, tokenizer)
      _mark(path, digest)
    return path

  base_hash = _hash(data_hash, arch, training, spec.base_steps, "base")
  base = os.path.join(root, "base")
  if not _done(base, base_hash):
    data = os.path.join(root, "data", "base_plain.jsonl")
    _train(root, "base", init("base", spec.seed + 100), data, spec.base_steps, spec, log)
    _mark(base, base_hash)
  for k, domain in enumerate(world_domains):
    if domain not in domains:
      continue
    for kind, start in (("lineage", base), ("external", None)):
      if kind not in kinds:
        continue
      name = f"{kind}_{domain}"
      start_hash = base_hash if kind == "lineage" else _hash(data_hash, arch)
      digest = _hash(start_hash, training, spec.teacher_steps, name)
      if _done(os.path.join(root, name), digest):
        continue
      style = "plain" if kind == "lineage" else "external"
      data = os.path.join(root, "data", f"{style}_{domain}.jsonl")
      start = start or init(name, spec.seed + 200 + k)
      _train(root, name, start, data, spec.teacher_steps, spec, log)
      _mark(os.path.join(root, name), digest)

  world_hash = _hash(
    [_read_hash(os.path.join(root, n)) for n in model_names(domains, kinds)], spec.eval_per_domain,
    spec.max_new_tokens,
  )  # fmt: skip
  summary_path = os.path.join(root, "world.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
    if summary.get("hash") == world_hash:
      return summary
  records = eval_records(root)
  accuracy = {
    name: model_accuracy(
      os.path.join(root, name), records, max_new_tokens=spec.max_new_tokens,
      verifier="jdistill.experiments.tasks:verify", tokenizer=tokenizer,
    )
    for name in model_names(domains, kinds)
  }  # fmt: skip
  summary = {
    "hash": world_hash,
    "spec": dataclasses.asdict(spec),
    "accuracy": {n: {d: v["accuracy"] for d, v in a.items()} for n, a in accuracy.items()},
    "build_seconds": time.time() - t0,
    "devices": jax.device_count(),
  }
  write_json_atomic(summary_path, summary, indent=1)
  return summary


def main(argv):
  del argv
  from absl import flags

  from jdistill.eval.accuracy import format_table

  summary = build(flags.FLAGS.root)
  if flags.FLAGS.commit:
    commit(flags.FLAGS.root)
    log.info("copied the world to %s", COMMITTED)
  table = {n: {d: {"accuracy": v} for d, v in a.items()} for n, a in summary["accuracy"].items()}
  print(format_table(table))
  print(f"built in {summary['build_seconds']:.0f} s")


def cli():
  from absl import app, flags

  flags.DEFINE_string("root", "runs/task_world", "Where the world lives (built on first use).")
  flags.DEFINE_bool(
    "commit", False, "Copy the built world into jdistill/experiments/assets/task_world."
  )
  app.run(main)


if __name__ == "__main__":
  cli()


def usable_world(fallback: str, spec: WorldSpec = WorldSpec(), log=log.info) -> str:
  """The committed world when it was built with `spec`, else `fallback` (built if needed)."""
  summary = os.path.join(COMMITTED, "world.json")
  if os.path.exists(summary):
    with open(summary) as f:
      if json.load(f).get("spec") == dataclasses.asdict(spec):
        return COMMITTED
  log(f"task world: building {fallback} (the committed world has another spec)")
  build(fallback, spec, log)
  return fallback


def commit(root: str, dest: str = COMMITTED) -> None:
  """Copies the world's deliverables (no SFT data, run folders or random inits) to `dest`."""
  import shutil

  if os.path.exists(dest):
    shutil.rmtree(dest)
  os.makedirs(dest)
  for name in COMMITTED_FILES + tuple(model_names()):
    src = os.path.join(root, name)
    if os.path.isdir(src):
      shutil.copytree(src, os.path.join(dest, name))
    else:
      shutil.copy(src, os.path.join(dest, name))

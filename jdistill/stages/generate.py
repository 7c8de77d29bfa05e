"""Teacher-data generation: a model samples n completions per prompt into JSONL, exactly once.

  python -m jdistill generate --config=configs/generate_tiny.py

Any model (a teacher, or the student) runs the jitted sampler over a prompt file. Each record
carries the domain, the model's name, the prompt, the completion, the sampling settings and,
where the prompt has an `answer` and `generate.verifier` is set, the verifier's score
(`jdistill.eval.verifiers`); `generate.keep="verified"` writes only completions scoring 1
(rejection sampling). The records are what warmup SFT reads (`prompt` + `completion`).

With `episode.environment` each sample is a multi-turn episode (`jdistill.sampling.episodes`):
its record holds `turns` (each `{"origin", "text"}`; multi-turn SFT reads them, loss on the
model's turns) in place of `completion`, the episode's `reward` as its score, and why it
`ended`. A turn's stop token is not in its text (a stop string is).

Exactly once, across kills: process p of P handles prompts p, p + P, ... and writes
`<out_dir>/part-<p>-of-<P>.jsonl`. After each batch its records are appended and synced,
then `part-...progress.json` is replaced atomically with the next prompt position and the
file's committed size. A restarted run truncates the file to that size (dropping a batch
written after the last commit) and goes on from there; sampling keys depend only on the
seed and the batch, so the output equals an uninterrupted run's. A full or unwritable disk
stops the run with `io.WriteFailed` (one line) at the batch it hit; a rerun resumes the same
way.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax

from jdistill import config as config_lib
from jdistill.data import prompts as data_lib
from jdistill.eval import verifiers
from jdistill.runtime import build
from jdistill.runtime.io import write_json_atomic, writing
from jdistill.sampling import Sampler
from jdistill.sampling.episodes import run_episodes

log = logging.getLogger("jdistill")


class Generator:
  """Builds the model, sampler and prompts from a config with `stage="generate"`."""

  def __init__(self, config, domains=None):
    """`domains`: only prompts of these domains (default: all)."""
    config_lib.validate(config)
    self.config = c = config
    g = c.generate
    self.mesh = build.mesh(c)
    self.tokenizer = build.tokenizer(c)
    path = g.model or c.student.path
    model = build.load_model(path, self.mesh, param_dtype=g.param_dtype, dtype=g.param_dtype)
    from flax import nnx

    self.graphdef, self.params = nnx.split(model)
    self.model_name = g.model_name or os.path.basename(os.path.normpath(path))
    self.sampler = Sampler(self.graphdef, self.mesh)
    self.sampling = build.sampling_params(c, self.tokenizer)
    records, _ = build.read_records(g.prompt_files or c.data.train_files, c)
    if domains is not None:
      records = [r for r in records if r["domain"] in domains]
      if not records:
        raise ValueError(
          f"no prompts of domains {sorted(domains)} in {g.prompt_files or c.data.train_files}"
        )
    p, n_proc = jax.process_index(), jax.process_count()
    self.records = records[p::n_proc]
    self.scorer = verifiers.Scorer(verifiers.get(g.verifier)) if g.verifier else None
    self.environment, self.episode_params = build.episodes(c)
    os.makedirs(g.out_dir, exist_ok=True)
    stem = os.path.join(g.out_dir, f"part-{p:05d}-of-{n_proc:05d}")
    self.out_path, self.progress_path = stem + ".jsonl", stem + ".progress.json"
    self.kept = self.written = 0

  def _progress(self) -> dict:
    if not os.path.exists(self.progress_path):
      return {"next": 0, "bytes": 0, "kept": 0, "sampled": 0, "verifier_errors": 0}
    with open(self.progress_path) as f:
      return json.load(f)

  def _commit(self, progress: dict) -> None:
    write_json_atomic(self.progress_path, progress)

  def _encode(self, record) -> list[int]:
    d = self.config.data
    ids = data_lib.encode_prompt(
      record,
      self.tokenizer,
      use_chat_template=d.use_chat_template,
      max_prompt_len=d.max_prompt_len,
      overlong="truncate_left",
    )
    return ids

  def run(self) -> dict:
    """Generates from the committed position to the end; returns the final progress."""
    g, s = self.config.generate, self.config.sampling
    progress = self._progress()
    reopen_part(self.out_path, progress["bytes"])
    n = g.samples_per_prompt
    dp = self.sampler.data_parallel_size()
    settings = {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p,
                "max_new_tokens": s.max_new_tokens}  # fmt: skip
    t0, sampled_here = time.time(), 0
    while progress["next"] < len(self.records):
      start = progress["next"]
      batch = self.records[start : start + g.prompts_per_batch]
      unique = [self._encode(r) for r in batch]
      ids = [p for p in unique for _ in range(n)]
      if jax.process_count() > 1:  # each process's rows must divide over its data shards
        unique += [unique[-1]] * (-len(unique) % dp)
      key = jax.random.fold_in(jax.random.key(self.config.seed), start)
      if self.environment is not None:
        episodes = run_episodes(
          self.sampler, self.params, self.environment, [batch[i // n] for i in range(len(ids))],
          ids, key, self.sampling, self.episode_params, self.tokenizer,
        )  # fmt: skip
      else:
        out = self.sampler.generate(self.params, unique, key, self.sampling, group_size=n)
        out = jax.device_get(out)
      lines = []
      for i in range(len(ids)):
        record = batch[i // n]
        line = {"domain": record["domain"], "teacher": self.model_name, "sample": i % n}
        if self.environment is not None:
          # special tokens kept: a model turn's stop token and a chat template's tool-message
          # wrapper are part of what SFT must reproduce (`jdistill.data.packing` reads them)
          decode = lambda t: self.tokenizer.decode(t, skip_special_tokens=False)  # noqa: E731
          line["turns"] = episodes.turn_texts(i, decode)
          if not any(t["origin"] == "model" and t["text"] for t in line["turns"]):
            progress["sampled"] += 1  # nothing of the model's to learn from (its reset failed)
            sampled_here += 1
            continue
          line["score"] = float(episodes.rewards[i])
          line["ended"] = episodes.reasons[i]
        else:
          p0, m = int(out.prompt_lengths[i]), int(out.completion_lengths[i])
          tokens = out.tokens[i, p0 : p0 + m]
          line["completion"] = self.tokenizer.decode(tokens, skip_special_tokens=True)
        line.update(sampling=settings, source=record["where"])
        line.update({k: record[k] for k in ("prompt", "messages", "answer") if k in record})
        if self.scorer is not None and "answer" in record and "completion" in line:
          line["score"] = self.scorer(line["completion"], record["answer"])
        progress["sampled"] += 1
        sampled_here += 1
        if g.keep == "verified" and line.get("score", 0.0) < 1.0:
          continue
        lines.append(json.dumps(line) + "\n")
      size = append_part(self.out_path, lines)
      progress.update(
        next=start + len(batch),
        bytes=size,
        kept=progress["kept"] + len(lines),
        verifier_errors=progress["verifier_errors"] + (self.scorer.errors if self.scorer else 0),
      )
      if self.scorer is not None:
        self.scorer.errors = 0
      self._commit(progress)
      done, total = progress["next"], len(self.records)
      rate = sampled_here / max(time.time() - t0, 1e-9)
      print(f"generate {done}/{total} prompts | {progress['kept']} kept of "
            f"{progress['sampled']} sampled | {rate:,.1f} samples/s", flush=True)  # fmt: skip
    return progress


def reopen_part(path: str, committed: int) -> None:
  """Cuts part file `path` back to its `committed` size (drops a batch written after the last
  commit), creating it if missing."""
  with writing(path), open(path, "ab") as f:
    f.truncate(committed)


def append_part(path: str, lines: list[str]) -> int:
  """Appends `lines` to part file `path` and syncs it → the file's size. A failed write (a full
  disk) raises `io.WriteFailed`; what it left after the committed size is cut on resume."""
  with writing(path):
    with open(path, "a") as f:
      f.writelines(lines)
      f.flush()
      os.fsync(f.fileno())
    return os.path.getsize(path)


def teacher_configs(config) -> list[tuple[object, list[str]]]:
  """`generate.model="teachers"`: one generation config per teacher (its model, its name,
  `<out_dir>/<teacher>`) with the domains it owns; otherwise the config itself, all domains."""
  g = config.generate
  if g.model != "teachers":
    return [(config, None)]
  out = []
  for name, domains in config_lib.teacher_domains(config).items():
    c = config.copy_and_resolve_references()
    c.generate.model = config.teachers[name].path
    c.generate.model_name = name
    c.generate.param_dtype = config.teachers[name].param_dtype
    c.generate.out_dir = os.path.join(g.out_dir, name)
    out.append((c, domains))
  return out


def output_files(config) -> list[str]:
  """The JSONL files generation with `config` writes: one per process (and per teacher)."""
  n = jax.process_count()
  return [
    os.path.join(c.generate.out_dir, f"part-{p:05d}-of-{n:05d}.jsonl")
    for c, _ in teacher_configs(config)
    for p in range(n)
  ]


def generate_all(config) -> dict:
  """Runs generation (each teacher in turn with `generate.model="teachers"`) → the summed
  progress counts."""
  total = {"kept": 0, "sampled": 0, "verifier_errors": 0}
  for c, domains in teacher_configs(config):
    progress = Generator(c, domains).run()
    for key in total:
      total[key] += progress[key]
  return total


def run(config) -> dict:
  """The generate stage from `config` → {"generated": the summed progress counts}."""
  from jdistill.stages.base import InputError

  try:
    progress = generate_all(config)
  except (ValueError, FileNotFoundError) as e:
    raise InputError(str(e)) from e
  log.info(
    "generate: %d records of %d samples in %s; %d verifier errors",
    progress["kept"], progress["sampled"], config.generate.out_dir, progress["verifier_errors"],
  )  # fmt: skip
  return {"generated": progress}

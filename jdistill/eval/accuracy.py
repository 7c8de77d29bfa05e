"""What a model can do: greedy exact-match accuracy and pass@k per domain on held-out prompts.

  python -m jdistill evaluate --model=runs/task_world/base --prompts=runs/task_world/eval.jsonl \
      [--model=... more] [--verifier=jdistill.experiments.tasks:verify] [--pass_k=4]
  python -m jdistill evaluate --model=runs/agentic/lineage_lookup \
      --prompts=runs/agentic/test.jsonl --environment=jdistill.experiments.agentic:world_env \
      --stop_strings=']',')' --max_new_tokens=16 --max_total_tokens=40 --pass_k=4

Each prompt record needs `domain` and `answer`. Accuracy is the mean verifier score of one
greedy completion per prompt; pass@k the share of prompts where at least one of k samples at
temperature 1 scores 1 (n = k samples: the plain estimator). Stages call `accuracy` as their
per-step hook (`eval_every`); the experiment calls it for teachers, base and student alike.
With an environment (`episode_accuracy`) a prompt is a multi-turn episode and its score the
environment's reward.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from jdistill.eval import verifiers
from jdistill.sampling import Sampler, SamplingParams


def completions(
  sampler: Sampler, params, tokenizer, prompts: list[list[int]], sampling, key, group_size: int = 1
):
  """Decoded completions (special tokens dropped) of token-id `prompts`, in order; with
  `group_size` G, G of every prompt (consecutive, the prompt prefilled once)."""
  out = sampler.generate(params, prompts, key, sampling, group_size=group_size)
  arrays = (out.tokens, out.prompt_lengths, out.completion_lengths)
  return decode_completions(tokenizer, *(local_rows(a) for a in arrays))


def local_rows(x) -> np.ndarray:
  """This process's rows of a global, batch-sharded array (all rows with one process)."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, parts = set(), []
  for s in shards:  # replicas over non-data axes hold the same rows: keep one
    start = s.index[0].start or 0
    if start not in seen:
      seen.add(start)
      parts.append(np.asarray(s.data))
  return np.concatenate(parts)


def decode_completions(tokenizer, tokens, prompt_lengths, completion_lengths) -> list[str]:
  """The completions of sampled rows (host arrays `[rows, width]`, `[rows]`, `[rows]`) as
  text, special tokens dropped."""
  return [
    tokenizer.decode(row[int(start) : int(start) + int(n)], skip_special_tokens=True)
    for row, start, n in zip(tokens, prompt_lengths, completion_lengths)
  ]


def accuracy(
  sampler: Sampler,
  params,
  tokenizer,
  records: list[dict],
  *,
  encode,
  max_new_tokens: int,
  verifier: str | Mapping[str, str] = "exact_match",
  pass_k: int = 0,
  batch_rows: int = 64,
  prompt_buckets=(16, 32, 64, 128, 256),
  seed: int = 0,
  stop_token_ids: Sequence[int] | None = None,
) -> dict[str, dict[str, float]]:
  """{domain: {"accuracy", "pass@k" (with pass_k > 0), "prompts"}} over `records` (this
  process's prompts).

  `encode(record) -> token ids` renders a prompt as the model sees it; `verifier` names the
  verifier (`jdistill.eval.verifiers`), or one per domain; generation stops at
  `stop_token_ids` (default: the tokenizer's end-of-sequence token)."""
  scorers: dict[str, verifiers.Scorer] = {}

  def score(text: str, record: dict) -> float:
    name = verifier[record["domain"]] if isinstance(verifier, Mapping) else verifier
    if name not in scorers:
      scorers[name] = verifiers.Scorer(verifiers.get(name))
    return scorers[name](text, str(record["answer"]))

  if stop_token_ids is None:
    stop_token_ids = (tokenizer.eos_token_id,)
  stop = tuple(i for i in stop_token_ids if i is not None)
  base = dict(
    max_new_tokens=max_new_tokens,
    stop_token_ids=stop,
    prompt_buckets=tuple(prompt_buckets),
    pad_id=tokenizer.pad_token_id or 0,
  )
  greedy = SamplingParams(temperature=0.0, **base)
  sampled = SamplingParams(temperature=1.0, **base)
  ids = [encode(r) for r in records]
  greedy_scores = []
  for start in range(0, len(records), batch_rows):
    texts = completions(
      sampler, params, tokenizer, ids[start : start + batch_rows], greedy, jax.random.key(0)
    )
    for record, text in zip(records[start : start + batch_rows], texts):
      greedy_scores.append(score(text, record))
  passed = []
  if pass_k:
    per_call = max(1, batch_rows // pass_k)
    for start in range(0, len(records), per_call):
      chunk = records[start : start + per_call]
      key = jax.random.key(seed + start)
      texts = completions(
        sampler, params, tokenizer, ids[start : start + len(chunk)], sampled, key, pass_k
      )
      for j, record in enumerate(chunk):
        hits = [score(t, record) >= 1.0 for t in texts[j * pass_k : (j + 1) * pass_k]]
        passed.append(float(any(hits)))
  by_domain: dict[str, dict[str, list[float]]] = collections.defaultdict(
    lambda: {"accuracy": [], "pass": []}
  )
  for i, record in enumerate(records):
    by_domain[record["domain"]]["accuracy"].append(greedy_scores[i])
    if passed:
      by_domain[record["domain"]]["pass"].append(passed[i])
  out = {}
  for domain in sorted(by_domain):
    values = by_domain[domain]
    out[domain] = {
      "accuracy": float(np.mean(values["accuracy"])),
      "prompts": len(values["accuracy"]),
    }
    if passed:
      out[domain][f"pass@{pass_k}"] = float(np.mean(values["pass"]))
  return out


def episode_accuracy(
  sampler: Sampler,
  params,
  tokenizer,
  records: list[dict],
  *,
  encode,
  environment,
  episode,
  pass_k: int = 0,
  batch_rows: int = 64,
  prompt_buckets=(16, 32, 64, 128, 256),
  seed: int = 0,
  stop_token_ids: Sequence[int] | None = None,
) -> dict[str, dict[str, float]]:
  """{domain: {"accuracy", "pass@k" (with pass_k > 0), "prompts", "turns"}} of multi-turn
  episodes (`jdistill.sampling.episodes`) on `records`: accuracy is the mean reward of one
  greedy episode per prompt (the environment's; 0 for an episode a fault ended), pass@k the
  share of prompts where one of k episodes at temperature 1 earns reward 1, turns the greedy
  episodes' mean model turns.

  `environment`: an environment object (`jdistill.sampling.environment`); `episode`: the
  episodes' limits (`EpisodeParams`); the rest as `accuracy`."""
  from jdistill.sampling.episodes import run_episodes

  if stop_token_ids is None:
    stop_token_ids = (tokenizer.eos_token_id,)
  base = dict(
    max_new_tokens=episode.max_turn_tokens,
    stop_token_ids=tuple(i for i in stop_token_ids if i is not None),
    prompt_buckets=tuple(prompt_buckets),
    pad_id=tokenizer.pad_token_id or 0,
  )
  ids = [encode(r) for r in records]

  def rewards(rows: list[int], params_: SamplingParams, key) -> tuple[np.ndarray, np.ndarray]:
    out = run_episodes(
      sampler, params, environment, [records[i] for i in rows], [ids[i] for i in rows], key,
      params_, episode, tokenizer,
    )  # fmt: skip
    return np.asarray(out.rewards, np.float64), np.asarray(out.turns, np.float64)

  greedy, turns = np.zeros(len(records)), np.zeros(len(records))
  for start in range(0, len(records), batch_rows):
    rows = list(range(start, min(start + batch_rows, len(records))))
    greedy[rows], turns[rows] = rewards(
      rows, SamplingParams(temperature=0.0, **base), jax.random.key(0)
    )
  passed = np.zeros(len(records))
  if pass_k:
    per_call = max(1, batch_rows // pass_k)
    for start in range(0, len(records), per_call):
      chunk = list(range(start, min(start + per_call, len(records))))
      repeated = [i for i in chunk for _ in range(pass_k)]
      r, _ = rewards(
        repeated, SamplingParams(temperature=1.0, **base), jax.random.key(seed + start)
      )
      passed[chunk] = (r.reshape(len(chunk), pass_k) >= 1.0).any(axis=1)
  out = {}
  for domain in sorted({r["domain"] for r in records}):
    rows = [i for i, r in enumerate(records) if r["domain"] == domain]
    out[domain] = {
      "accuracy": float(greedy[rows].mean()),
      "prompts": len(rows),
      "turns": float(turns[rows].mean()),
    }
    if pass_k:
      out[domain][f"pass@{pass_k}"] = float(passed[rows].mean())
  return out


def model_accuracy(model_dir: str, records: list[dict], **kw) -> dict[str, dict[str, float]]:
  """`accuracy` of the HF (or jdistill checkpoint) model in `model_dir` on one device; with
  `environment=` and `episode=`, `episode_accuracy`."""
  from flax import nnx

  from jdistill.data.tokenizer import load_tokenizer
  from jdistill.data.user_text import encode_text
  from jdistill.runtime import build
  from jdistill.runtime import sharding as shd

  mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
  model = build.load_model(model_dir, mesh, param_dtype="float32", dtype="float32")
  tokenizer = kw.pop("tokenizer", None) or load_tokenizer(model_dir)
  graphdef, params = nnx.split(model)
  encode = kw.pop("encode", None) or (
    lambda r: encode_text(tokenizer, r["prompt"], add_special_tokens=True)
  )
  if "environment" in kw:
    return episode_accuracy(
      Sampler(graphdef, mesh), params, tokenizer, records, encode=encode, **kw
    )
  return accuracy(Sampler(graphdef, mesh), params, tokenizer, records, encode=encode, **kw)


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
  """A markdown table: one row per model, one column per domain's accuracy (pass@k)."""
  domains = sorted({d for r in results.values() for d in r})
  lines = ["| model | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
  for name, per_domain in results.items():
    cells = []
    for d in domains:
      v = per_domain.get(d, {})
      extra = "".join(f" ({v[k]:.2f} {k})" for k in v if k.startswith("pass@"))
      cells.append(f"{v['accuracy']:.2f}{extra}" if v else "—")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  import json

  from absl import flags

  f = flags.FLAGS
  with open(f.prompts) as fh:
    records = [json.loads(line) for line in fh if line.strip()]
  if f.environment:  # multi-turn episodes: the environment scores them, no verifier
    from jdistill.sampling.environment import load_environment
    from jdistill.sampling.episodes import EpisodeParams

    limits = EpisodeParams(
      max_turns=f.max_turns, max_turn_tokens=f.max_new_tokens,
      max_total_tokens=f.max_total_tokens, stop_strings=tuple(f.stop_strings or ()),
    )  # fmt: skip
    kw = dict(environment=load_environment(f.environment, "--environment"), episode=limits)
  else:
    kw = dict(max_new_tokens=f.max_new_tokens, verifier=f.verifier)
  results = {path: model_accuracy(path, records, pass_k=f.pass_k, **kw) for path in f.model}
  print(format_table(results))


def cli():
  from absl import app, flags

  flags.DEFINE_multi_string("model", None, "HF model directory (repeat for several).")
  flags.DEFINE_string("prompts", None, "JSONL of {domain, prompt, answer}.")
  flags.DEFINE_string(
    "verifier", "jdistill.experiments.tasks:verify", "Verifier name (jdistill.eval.verifiers)."
  )
  flags.DEFINE_integer("pass_k", 0, "k of pass@k (0: greedy accuracy only).")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per completion (per turn).")
  flags.DEFINE_string(
    "environment", "", "Multi-turn episodes: the environment, 'module:Class' or 'module:function'."
  )
  flags.DEFINE_integer("max_turns", 4, "With --environment: model turns per episode.")
  flags.DEFINE_integer("max_total_tokens", 256, "With --environment: tokens after the prompt.")
  flags.DEFINE_list("stop_strings", [], "With --environment: strings that end a model turn.")
  flags.mark_flags_as_required(["model", "prompts"])
  app.run(main)


if __name__ == "__main__":
  cli()

"""RLVR: GRPO with verifiable rewards, optionally unified with on-policy distillation.

  python -m jdistill rlvr --config=configs/rlvr_tiny.py

Per step: `data.slots_per_teacher` prompts per group (per teacher, or one "policy" group
when no teachers are configured), each sampled `rl.group_size` = G times by the jitted
sampler from the current params. On the host a verifier scores each completion against the
prompt's `answer` (`rl.verifier`, or `rl.verifiers.<domain>`); a verifier that raises scores
0 and is counted. With `episode.environment` each sample is a multi-turn episode
(`jdistill.sampling.episodes`) and its reward is the environment's; the environment's tokens
carry no loss. Rewards become group advantages (`losses.group_advantages`). Then one
compiled step (explicit shardings, donated state; teachers and reference are arguments)
minimises, per completion token t of row b,

  −r_bt · A_bt,  r_bt = q(x_t) / π(x_t),  A_bt = w_R · A_reward[b] + λ · (log p_T(x_t) − log q(x_t))

(PPO-clipped with `loss.clip_eps`), plus `rl.kl_coef` × k3(q, ref) and `rl.dense_weight` × the
full-vocab reverse KL to the row's teacher, reduced by `loss.normalize` ("constant" is Dr.
GRPO's). π is the distribution the token was sampled from, q the student, p_T the teacher of
the row's domain, λ = `loss.kl_weight`, w_R = `rl.reward_weight`. λ = 0 (or no teachers) is
pure GRPO; w_R = 0 is pure sampled-token OPD. Expected gradients (tested by enumeration,
docs/design.md): the GRPO term without std normalisation is −(G−1)/G · ∇E_q[R]; the λ term
λ · ∇KL(q‖p_T); the k3 term ∇KL(ref‖q) — the forward KL, as the k3 estimator used as a loss
gives.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jdistill import losses
from jdistill.eval import accuracy, verifiers
from jdistill.eval.accuracy import decode_completions, local_rows
from jdistill.runtime import build, plots
from jdistill.runtime import sharding as shd
from jdistill.sampling import Sampler, precision
from jdistill.sampling.episodes import Episodes, run_episodes
from jdistill.stages.base import TrainingStage, run_training, shardings
from jdistill.step import common
from jdistill.step.rlvr import RLSettings, rl_step

log = logging.getLogger("jdistill")


def reward_stats(rewards, domains, domain_names, group_size: int) -> dict:
  """Host metrics of one step's rewards `[B]` (groups of `group_size` consecutive rows):
  mean and std per domain and overall, and the shares of groups that are all correct
  (every reward ≥ 1) or all wrong (every reward ≤ 0) — groups that teach nothing."""
  rewards, domains = np.asarray(rewards, np.float64), np.asarray(domains)
  groups = rewards.reshape(-1, group_size)
  out = {
    "reward_mean": float(rewards.mean()),
    "reward_std": float(rewards.std()),
    "all_correct_groups": float(np.mean(np.all(groups >= 1.0, axis=1))),
    "all_wrong_groups": float(np.mean(np.all(groups <= 0.0, axis=1))),
    "domains": {},
  }
  for k, name in enumerate(domain_names):
    sel = rewards[domains == k]
    if sel.size:
      out["domains"][name] = {"reward_mean": float(sel.mean()), "reward_std": float(sel.std())}
  return out


class RLVRTrainer(TrainingStage):
  """The RLVR stage for `loop.Loop`; built from a validated config with `stage="rlvr"`."""

  curve = staticmethod(plots.rl_curve)

  def build_data(self) -> None:
    c = self.config
    self.group_size = g = c.rl.group_size
    self.batcher = build.prompt_batcher(c, self.tokenizer, c.data.train_files, seed=c.seed)
    self.eval_batcher = None
    if c.data.eval_files:
      self.eval_batcher = build.prompt_batcher(
        c, self.tokenizer, c.data.eval_files, seed=c.seed + 1
      )
    # with an environment the episodes' rewards are its own: no answer needed
    checked = () if c.episode.environment else (self.batcher, self.eval_batcher)
    for batcher in filter(None, checked):
      missing = [r for r in batcher.records if "answer" not in r]
      if missing:
        raise ValueError(
          f"{missing[0]['where']}: no 'answer' field; stage rlvr scores every prompt's "
          f"completions against it ({len(missing)} prompts lack one)"
        )
    self.rows = self.batcher.rows_per_batch * g
    dp = shd.data_parallel_size(self.mesh)
    if self.rows % dp:
      raise ValueError(
        f"config.data.slots_per_teacher={c.data.slots_per_teacher} x rl.group_size={g} x "
        f"{len(self.batcher.teacher_names)} groups = {self.rows} rows do not divide over "
        f"the {dp} data-parallel shards of mesh {dict(self.mesh.shape)}"
      )
    self.scorers = {
      d: verifiers.Scorer(verifiers.get(c.rl.verifiers.get(d, c.rl.verifier)))
      for d in self.batcher.domains
    }
    self.verifier_errors = 0
    self.data_iter = self.batcher.iterator()

  def build_models(self, student):
    """The teachers (if any) and, with `rl.kl_coef`, the reference → a copy of the student's
    params to train (the reference keeps the originals)."""
    c = self.config
    if c.teachers.keys():
      self.teachers = build.teachers(
        c, self.mesh, student.cfg.vocab_size,
        rows_per_teacher=c.data.slots_per_teacher * self.group_size,
      )  # fmt: skip
    else:
      self.teachers = build.Teachers([], (), (), (), ())
    # The reference of the k3 penalty: the model this stage starts from (never updated).
    self.reference = student.params if c.rl.kl_coef else None
    if self.reference is None:
      return student.params
    return jax.tree.map(jnp.copy, student.params)

  def build_step(self) -> None:
    c, t = self.config, self.teachers
    self.sampling = build.sampling_params(c, self.tokenizer)
    self.greedy = dataclasses.replace(self.sampling, temperature=0.0)
    self.sampler = Sampler(self.graphdef, self.mesh)
    self.batch_shardings = dict(
      build.batch_shardings(self.mesh), advantages=shd.batch_sharding(self.mesh, 1)
    )
    # multi-turn rollouts (`episode.environment`): the reward is the episode's
    self.environment, self.episode_params = build.episodes(c)
    if self.environment is not None:
      self.batch_shardings["model_mask"] = self.batch_shardings["completion_mask"]
    self.settings = RLSettings(
      chunk_size=c.loss.chunk_size,
      normalize=c.loss.normalize,
      clip_eps=c.loss.clip_eps or None,
      icepop_c=c.loss.icepop_c or None,
      reward_weight=c.rl.reward_weight,
      kl_weight=c.loss.kl_weight if c.teachers.keys() else 0.0,
      kl_coef=c.rl.kl_coef,
      dense_weight=c.rl.dense_weight,
    )
    step = functools.partial(
      rl_step,
      optimizer=self.optimizer,
      schedule=self.schedule,
      student_graphdef=self.graphdef,
      teacher_graphdefs=t.graphdefs,
      specs=t.specs,
      groups=t.groups,
      reference_graphdef=self.graphdef,
      settings=self.settings,
    )
    self.train_step = self.jit_step(
      step, shardings(t.states), shardings(self.reference), self.batch_shardings
    )

  # --- rollouts and rewards ------------------------------------------------------------

  def sample_groups(self, prompts: dict, key, sampling) -> tuple:
    """G samples of every prompt (consecutive rows) → (sampler output, host rows, rewards).

    With `episode.environment` the output is `Episodes` and the rewards are theirs."""
    g = self.group_size
    rows = {k: np.repeat(v, g, axis=0) for k, v in prompts.items()}
    if self.environment is not None:
      out = self.episodes(self.batcher, rows, key, sampling, self.rollout_params())
      return out, rows, out.rewards.copy()
    out = self.sampler.generate(  # each prompt prefilled once (a shared prefix)
      self.rollout_params(),
      (prompts["prompt_tokens"], prompts["prompt_lengths"]),
      key,
      sampling,
      group_size=g,
    )
    texts = self.local_completions(out)
    rewards = np.zeros(len(texts), np.float32)
    for i, completion in enumerate(texts):
      record = self.batcher.records[rows["record_index"][i]]
      rewards[i] = self.scorers[record["domain"]](completion, str(record["answer"]))
    return out, rows, rewards

  def episodes(self, batcher, rows: dict, key, sampling, params) -> Episodes:
    """Multi-turn episodes of the student's `params` on prompt rows (`prompt_tokens`,
    `prompt_lengths`, `record_index` of `batcher`'s records)."""
    tokens, lengths = rows["prompt_tokens"], rows["prompt_lengths"]
    return run_episodes(
      self.sampler, params, self.environment,
      [batcher.records[int(r)] for r in rows["record_index"]],
      [row[:n].tolist() for row, n in zip(tokens, lengths)], key, sampling, self.episode_params,
      self.tokenizer, prompt_width=tokens.shape[1],
    )  # fmt: skip

  def rollout_params(self):
    """The student params the training rollouts sample from, in `rollout.param_dtype`
    (`sampling.rollout_params`: a bf16 copy cast per call, one per step)."""
    return precision.rollout_params(self.state["params"], self.config.rollout.param_dtype)

  def local_completions(self, out) -> list[str]:
    """This process's rows of a sampler output, decoded."""
    arrays = (out.tokens, out.prompt_lengths, out.completion_lengths)
    return decode_completions(self.tokenizer, *(local_rows(a) for a in arrays))

  def train_one(self, diagnostics: bool = True) -> dict:
    del diagnostics  # the RL step's metrics are cheap
    prompts = next(self.data_iter)
    out, rows, rewards = self.sample_groups(prompts, self.rollout_key(self.step), self.sampling)
    advantages = np.asarray(
      losses.group_advantages(rewards, self.group_size, normalize_std=self.config.rl.normalize_std)
    )
    if isinstance(out, Episodes):
      batch = {k: jax.device_put(v, self.batch_shardings[k]) for k, v in out.batch().items()}
    else:
      batch = common.rollout_batch(out, self.batch_shardings)
    batch["advantages"] = jax.make_array_from_process_local_data(
      self.batch_shardings["advantages"], advantages
    )
    self.state, metrics = self.train_step(self.state, self.teachers.states, self.reference, batch)
    self.step += 1
    errors = sum(s.errors for s in self.scorers.values())
    metrics["verifier_errors"] = errors - self.verifier_errors
    self.verifier_errors = errors
    metrics["rewards"] = reward_stats(
      rewards, rows["domain_index"], self.batcher.domains, self.group_size
    )
    if isinstance(out, Episodes):
      metrics["episodes"] = out.metrics()
    return metrics

  # --- the loop's Stage protocol ------------------------------------------------------

  def step_tokens(self, metrics: dict) -> dict:
    completion = metrics["response_length"] * self.rows
    return {"generated": completion, "total": metrics["tokens"]}

  def log_record(self, metrics: dict) -> dict:
    record = jax.tree.map(float, jax.device_get(metrics))
    if record["verifier_errors"]:
      last = [s.last_error for s in self.scorers.values() if s.last_error]
      log.warning("%d verifier errors; last: %s", int(record["verifier_errors"]), last[-1])
    return record

  def progress(self, record: dict) -> str:
    r = record["rewards"]
    per_domain = " ".join(f"{d} {v['reward_mean']:.2f}" for d, v in r["domains"].items())
    return (
      f"reward {r['reward_mean']:.3f} ({per_domain}) | all-correct {r['all_correct_groups']:.2f}"
      f" all-wrong {r['all_wrong_groups']:.2f} | length {record['response_length']:.1f}"
    )

  def evaluate(self) -> dict:
    """Greedy accuracy (mean verifier score, `eval.accuracy.accuracy`) per domain on
    `rl.eval_prompts` held-out prompts per group (`data.eval_files`, else a far-away batch of
    the training stream), each domain scored by its `rl.verifiers` entry (else `rl.verifier`)."""
    c = self.config
    batcher = self.eval_batcher or self.batcher
    n = max(1, c.rl.eval_prompts // c.data.slots_per_teacher)
    if self.environment is not None:
      return self.episode_success(batcher, n)
    records = [
      batcher.records[r]
      for k in range(n)
      for r in batcher.batch(k if self.eval_batcher else 10**6 + k)["record_index"]
    ]
    per_domain = accuracy.accuracy(
      self.sampler, self.params, self.tokenizer, records, encode=self.encode_prompt,
      max_new_tokens=c.sampling.max_new_tokens,
      verifier={d: c.rl.verifiers.get(d, c.rl.verifier) for d in self.batcher.domains},
      batch_rows=batcher.local_rows, prompt_buckets=c.sampling.prompt_buckets,
      stop_token_ids=self.greedy.stop_token_ids,
    )  # fmt: skip
    return {d: per_domain[d] for d in batcher.domains if d in per_domain}

  def episode_success(self, batcher, n_batches: int) -> dict:
    """Greedy episodes on `n_batches` held-out prompt batches → per domain, the mean episode
    reward as `accuracy` (its success rate with 0/1 rewards) and the `prompts` scored."""
    rewards: dict[str, list[float]] = {}
    for k in range(n_batches):
      rows = batcher.batch(k if self.eval_batcher else 10**6 + k)
      out = self.episodes(batcher, rows, jax.random.key(0), self.greedy, self.state["params"])
      for r, reward in zip(rows["record_index"], out.rewards):
        rewards.setdefault(batcher.records[int(r)]["domain"], []).append(float(reward))
    return {
      d: {"accuracy": float(np.mean(v)), "prompts": len(v)}
      for d, v in rewards.items()
      if d in batcher.domains
    }

  def describe_eval(self, results: dict) -> str:
    return " ".join(f"{d} accuracy {v['accuracy']:.3f}" for d, v in results.items())

  def describe_change(self, before: dict, after: dict) -> str:
    return "\n".join(
      f"{d}: greedy accuracy {before[d]['accuracy']:.3f} -> {after[d]['accuracy']:.3f}"
      for d in after
    )


def run(config) -> dict:
  """The RLVR stage from `config`, trained to its end (`base.run_training`)."""
  return run_training(RLVRTrainer, config)

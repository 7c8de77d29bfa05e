"""Multi-turn episodes: the student's turns decoded by the jitted sampler, an environment
(`jdistill.sampling.environment`) answering each finished turn on the host.

Each episode is one row. A row decodes its turn until a stop token, a stop string (e.g. the
close of a tool call) or the per-turn limit; the environment then steps that row with the
turn's text, its observation is tokenised and appended, and the row decodes its next turn;
until the environment says done, `max_turns` turns, or the total token limit.

Rows advance independently, in *waves*. A wave is one `Sampler.generate` call over the
episodes in flight (at most `EpisodeParams.slots`, padded with dummy rows to that static
batch), each row decoding at most `wave_tokens` tokens of its own current turn from its own
context, whatever turn it is in. After the wave, the rows whose turn ended are stepped by
their environment, finished episodes leave, and queued episodes take their places (as
continuous batching refills a slot), so an episode never waits for another one's turns or
episode to end: only for the wave it is in, at most `wave_tokens` decode steps. The price of
this host-side scheme: each wave prefills a row's whole context again (no KV cache is kept
between waves), and tokens decoded past a stop string within a wave are discarded.

Every token carries its origin: the output's `model_mask` is 1 on the model's tokens and 0
on the prompt, the environment's tokens and padding. Environment tokens are context for
everyone and a target for no one (see `jdistill.step.common.shifted_inputs`).

Faults end only their episode, with reward 0 and a counted, logged reason:
  malformed    the environment raised `MalformedTurn` on a turn
  env_error    the environment raised anything else, or returned something malformed
  turn_limit   a turn reached `max_turn_tokens` without a stop
  total_limit  the episode reached `max_total_tokens` (model and environment tokens)
  max_turns    `max_turns` model turns without the environment saying done
An episode the environment ends has reason "done" and the environment's reward.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jdistill.sampling.environment import Environment, MalformedTurn
from jdistill.sampling.params import SamplingParams, _is_int

log = logging.getLogger("jdistill")

REASONS = ("done", "max_turns", "malformed", "env_error", "turn_limit", "total_limit")


@dataclasses.dataclass(frozen=True)
class EpisodeParams:
  """The limits of a multi-turn episode.

  max_turns: model turns per episode.
  max_turn_tokens: tokens per model turn; a turn that reaches it without a stop token or stop
    string is a fault ("turn_limit").
  max_total_tokens: tokens after the prompt, model and environment together ("total_limit").
  stop_strings: a model turn also ends once its text contains one of these (kept in the turn).
  wave_tokens: the most tokens a row decodes per wave (None: `max_turn_tokens`); smaller
    hands control back to the host sooner, at the cost of more prefills.
  slots: episodes in flight at once, the static batch of every wave (None: all of them).
  env_workers: environments stepped at once on host threads (1: one after another); the
    answers are applied in row order, so the episodes are the same for any value (the
    environment must allow `step` on different episodes' states at once).
  observation_role: the chat template's tool role (`jdistill.data.chat.tool_role`) that wraps
    each observation before it is tokenised (None: the observation's text as it is).
  """

  max_turns: int
  max_turn_tokens: int
  max_total_tokens: int
  stop_strings: tuple[str, ...] = ()
  wave_tokens: int | None = None
  slots: int | None = None
  env_workers: int = 1
  observation_role: Any = None

  def __post_init__(self):
    object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
    for field in ("max_turns", "max_turn_tokens", "max_total_tokens", "env_workers"):
      value = getattr(self, field)
      if not _is_int(value) or value < 1:
        raise ValueError(f"EpisodeParams.{field}={value!r} is invalid; allowed: an integer >= 1")
    for field in ("wave_tokens", "slots"):
      value = getattr(self, field)
      if value is not None and (not _is_int(value) or value < 1):
        raise ValueError(
          f"EpisodeParams.{field}={value!r} is invalid; allowed: None or an integer >= 1"
        )
    if not all(isinstance(s, str) and s for s in self.stop_strings):
      raise ValueError(
        f"EpisodeParams.stop_strings={self.stop_strings!r} is invalid; allowed: non-empty strings"
      )


@dataclasses.dataclass(frozen=True)
class Episodes:
  """Finished episodes, right-padded as the trainer reads them (`L = prompt_width +
  max_total_tokens`, `run_episodes`), rows in the order of the prompts.

  tokens             int32 `[N, L]`  prompt, then model and environment turns, then pad_id
  prompt_lengths     int32 `[N]`
  lengths            int32 `[N]`     prompt + every turn
  completion_mask    f32   `[N, L]`  1 on every token after the prompt (model and environment)
  model_mask         f32   `[N, L]`  1 on the model's tokens only (incl. each turn's stop token)
  logprobs           f32   `[N, L]`  log p(token) under the raw softmax; 0 off `model_mask`
  sampling_logprobs  f32   `[N, L]`  log p(token) under the distribution sampled from; 0 off it
  rewards            f32   `[N]`     the environment's reward at done; 0 for every other reason
  turns              int32 `[N]`     model turns the environment stepped
  reasons            tuple[str]      why each episode ended (one of `REASONS`)
  start_wave, end_wave int32 `[N]`   the first and last wave each episode was in flight
  decode_waves       int32 `[N]`     the waves each episode decoded in
  waves              int             waves in all
  """

  tokens: np.ndarray
  prompt_lengths: np.ndarray
  lengths: np.ndarray
  completion_mask: np.ndarray
  model_mask: np.ndarray
  logprobs: np.ndarray
  sampling_logprobs: np.ndarray
  rewards: np.ndarray
  turns: np.ndarray
  reasons: tuple[str, ...]
  start_wave: np.ndarray
  end_wave: np.ndarray
  decode_waves: np.ndarray
  waves: int

  def reason_counts(self) -> dict[str, int]:
    """Episodes per end reason, every reason of `REASONS` present (0 if none)."""
    counts = collections.Counter(self.reasons)
    return {r: counts[r] for r in REASONS}

  def metrics(self) -> dict[str, float]:
    """Host metrics of the batch: mean reward, turns, model and environment tokens per
    episode, and `ended_<reason>` counts for every reason of `REASONS`."""
    environment = self.completion_mask - self.model_mask
    return {
      "reward": float(self.rewards.mean()),
      "turns": float(self.turns.mean()),
      "model_tokens": float(self.model_mask.sum(axis=1).mean()),
      "environment_tokens": float(environment.sum(axis=1).mean()),
      **{f"ended_{r}": float(n) for r, n in self.reason_counts().items()},
    }

  def turn_texts(self, row: int, decode) -> list[dict]:
    """Row `row`'s turns after the prompt as `{"origin": "model" | "environment", "text"}`,
    maximal runs of one origin, each decoded by `decode(ids) -> str` (what multi-turn SFT
    examples hold, `jdistill.data.packing`)."""
    start, end = int(self.prompt_lengths[row]), int(self.lengths[row])
    model = self.model_mask[row, start:end] > 0
    out, begin = [], 0
    for t in range(1, end - start + 1):
      if t == end - start or model[t] != model[t - 1]:
        origin = "model" if model[begin] else "environment"
        out.append({"origin": origin, "text": decode(self.tokens[row, start + begin : start + t])})
        begin = t
    return out

  def batch(self) -> dict:
    """The train step's rollout batch (`jdistill.step.common`), with `model_mask`."""
    return {
      "tokens": self.tokens,
      "completion_mask": self.completion_mask,
      "model_mask": self.model_mask,
      "logprobs": self.logprobs,
      "sampling_logprobs": self.sampling_logprobs,
      "lengths": self.lengths,
    }


@dataclasses.dataclass
class _Row:
  """One episode's host-side state while in flight."""

  tokens: list[int]
  prompt_length: int
  start_wave: int
  model: list[int] = dataclasses.field(init=False)  # per token: 1 the model's, 0 otherwise
  logprobs: list[float] = dataclasses.field(init=False)
  sampling_logprobs: list[float] = dataclasses.field(init=False)
  turn_start: int = dataclasses.field(init=False)  # where in `tokens` the current turn began
  env_state: Any = None
  turns: int = 0
  decode_waves: int = 0
  end_wave: int = -1
  reward: float = 0.0
  reason: str | None = None

  def __post_init__(self):
    n = len(self.tokens)
    self.model, self.logprobs, self.sampling_logprobs = [0] * n, [0.0] * n, [0.0] * n
    self.turn_start = n

  def used(self) -> int:
    return len(self.tokens) - self.prompt_length

  def append(self, tokens, model: bool, logprobs=None, sampling_logprobs=None) -> None:
    tokens = [int(t) for t in tokens]
    zeros = [0.0] * len(tokens)
    self.tokens += tokens
    self.model += [int(model)] * len(tokens)
    self.logprobs += zeros if logprobs is None else [float(x) for x in logprobs]
    self.sampling_logprobs += (
      zeros if sampling_logprobs is None else [float(x) for x in sampling_logprobs]
    )


def run_episodes(
  sampler,
  state,
  env: Environment,
  records: Sequence[dict],
  prompts: Sequence[Sequence[int]],
  rng: jax.Array,
  params: SamplingParams,
  episode: EpisodeParams,
  tokenizer,
  *,
  prompt_width: int | None = None,
) -> Episodes:
  """Runs one multi-turn episode per prompt with the student `state` on `sampler`.

  Args:
    sampler: a `jdistill.sampling.Sampler` of the student's architecture.
    state: the student's model state (`nnx.split(model)[1]`).
    env: the environment (`jdistill.sampling.environment.load_environment`).
    records: `[N]` prompt records, each handed to `env.reset`.
    prompts: `[N]` token-id lists, the episodes' prompts.
    rng: PRNG key; wave w samples with `fold_in(rng, w)` under the "prompt" key schedule,
      so the episodes are a function of the seed.
    params: how to sample (temperature, top-k/top-p, stop ids, buckets, pad id); its
      `max_new_tokens` and `key_schedule` are replaced by the wave's.
    episode: the episodes' limits.
    tokenizer: `encode(text, add_special_tokens=False) -> ids` for observations and
      `decode(ids) -> text` for the turns handed to the environment (stop ids left out).
    prompt_width: the output's prompt width (default: the longest prompt), so that batches of
      one data pipeline share one width `L = prompt_width + max_total_tokens`.
  Returns:
    Episodes, rows in the order of `prompts`.
  """
  n = len(prompts)
  if len(records) != n:
    raise ValueError(f"records: expected {n} records, one per prompt; got {len(records)}")
  if n == 0:
    raise ValueError("prompts: the batch is empty")
  longest = max(len(p) for p in prompts)
  if prompt_width is not None and prompt_width < longest:
    raise ValueError(f"prompt_width={prompt_width} is shorter than the longest prompt ({longest})")
  wave_tokens = min(episode.wave_tokens or episode.max_turn_tokens, episode.max_turn_tokens)
  slots = min(episode.slots or n, n)
  params = dataclasses.replace(params, max_new_tokens=wave_tokens, key_schedule="prompt")
  stop_ids = set(params.stop_token_ids)
  rows: list[_Row | None] = [None] * n
  queue = collections.deque(range(n))
  active: list[int] = []
  wave = 0

  def finish(i: int, reason: str, detail: str = "") -> None:
    row = rows[i]
    row.reason, row.end_wave = reason, wave
    if reason != "done":
      row.reward = 0.0
      # an environment error needs its author; the other reasons are the policy's, counted
      # per step in the metrics (`Episodes.metrics`), one line each only when debugging
      level = logging.WARNING if reason == "env_error" else logging.DEBUG
      log.log(level, "episode %d ended early: %s%s", i, reason, f" ({detail})" if detail else "")

  def admit() -> None:
    while queue and len(active) < slots:
      i = queue.popleft()
      rows[i] = _Row(tokens=[int(t) for t in prompts[i]], prompt_length=len(prompts[i]),
                     start_wave=wave)  # fmt: skip
      try:
        rows[i].env_state = env.reset(records[i])
      except Exception as e:  # noqa: BLE001  (user code: any error ends only this episode)
        finish(i, "env_error", f"reset raised {type(e).__name__}: {e}")
        continue
      active.append(i)

  def ended_turn(i: int) -> tuple[str, bool]:
    """Row i's finished turn as the environment reads it (its stop token left out), and
    whether the model's stop token closed it."""
    turn = rows[i].tokens[rows[i].turn_start :]
    closed = bool(turn) and turn[-1] in stop_ids
    return tokenizer.decode(turn[:-1] if closed else turn), closed

  def call_env(i: int, text: str):
    """env.step on row i's turn → ("ok", result) or ("malformed" | "error", exception)."""
    try:
      return "ok", _check_step(env.step(rows[i].env_state, text))
    except MalformedTurn as e:
      return "malformed", e
    except Exception as e:  # noqa: BLE001  (user code: any error ends only this episode)
      return "error", e

  def step_env(i: int, outcome, closed: bool) -> None:
    """Applies the environment's answer to row i's finished turn: appends it, or ends the
    episode."""
    row = rows[i]
    row.turns += 1
    kind, value = outcome
    if kind == "malformed":
      return finish(i, "malformed", str(value))
    if kind == "error":
      return finish(i, "env_error", f"step raised {type(value).__name__}: {value}")
    observation, done, reward = value
    if done:
      row.reward = 0.0 if reward is None else float(reward)
      return finish(i, "done")
    if row.turns >= episode.max_turns:
      return finish(i, "max_turns")
    if observation and episode.observation_role is not None:  # a chat format's tool message
      observation = episode.observation_role.render(observation, closed)
    try:  # the environment's text: a tokenizer that cannot read it ends only this episode
      ids = tokenizer.encode(observation, add_special_tokens=False) if observation else []
    except Exception as e:  # noqa: BLE001
      return finish(i, "env_error", f"observation not tokenisable: {type(e).__name__}: {e}")
    room = episode.max_total_tokens - row.used()
    row.append(ids[:room], model=False)
    row.turn_start = len(row.tokens)
    if row.used() >= episode.max_total_tokens:
      finish(i, "total_limit", f"observation of {len(ids)} tokens, {room} left")

  def step_envs(ended: list[int]) -> None:
    """Steps the environments of the rows whose turn ended: the calls at once on up to
    `env_workers` threads (the wave waits for the slowest call, not their sum), answers applied
    in row order, so the episodes do not depend on which call returns first."""
    turns = [ended_turn(i) for i in ended]
    calls = [(i, text) for i, (text, _) in zip(ended, turns)]
    if pool is None or len(calls) < 2:
      outcomes = [call_env(i, text) for i, text in calls]
    else:
      outcomes = list(pool.map(lambda c: call_env(*c), calls))
    for i, (_, closed), outcome in zip(ended, turns, outcomes):
      step_env(i, outcome, closed)

  pool = None
  if episode.env_workers > 1:
    pool = concurrent.futures.ThreadPoolExecutor(episode.env_workers, "jdistill-env")
  try:
    admit()
    while active:
      contexts = [rows[i].tokens for i in active] + [[params.pad_id]] * (slots - len(active))
      limits = [
        min(wave_tokens, episode.max_turn_tokens - (len(r.tokens) - r.turn_start),
            episode.max_total_tokens - r.used())
        for r in (rows[i] for i in active)
      ] + [1] * (slots - len(active))  # fmt: skip
      out = sampler.generate(
        state, contexts, jax.random.fold_in(rng, wave), params, max_new_per_prompt=limits
      )
      out = jax.device_get(out)
      turn_ended = []
      for k, i in enumerate(active):
        row = rows[i]
        row.decode_waves += 1
        start = len(row.tokens)
        span = slice(start, start + int(out.completion_lengths[k]))
        new = [int(t) for t in out.tokens[k, span]]
        cut = _stop_string_cut(tokenizer, row.tokens[row.turn_start :], new, episode.stop_strings)
        keep = len(new) if cut is None else cut
        row.append(new[:keep], True, out.logprobs[k, span][:keep],
                   out.sampling_logprobs[k, span][:keep])  # fmt: skip
        if cut is not None or (keep and new[keep - 1] in stop_ids):
          turn_ended.append(i)
        elif len(row.tokens) - row.turn_start >= episode.max_turn_tokens:
          finish(i, "turn_limit", f"{episode.max_turn_tokens} tokens without a stop")
        elif row.used() >= episode.max_total_tokens:
          finish(i, "total_limit", f"{episode.max_total_tokens} tokens")
      step_envs(turn_ended)
      active = [i for i in active if rows[i].reason is None]
      wave += 1
      admit()
  finally:
    if pool is not None:
      pool.shutdown()
  width = (prompt_width or longest) + episode.max_total_tokens
  return _assemble(rows, width, params.pad_id, wave)


def _check_step(result) -> tuple[str | None, bool, float | None]:
  """`env.step`'s result, checked: `(observation str or None, done bool, reward or None)`."""
  if not isinstance(result, tuple) or len(result) != 3:
    raise TypeError(f"step returned {result!r}; expected (observation, done, reward)")
  observation, done, reward = result
  if observation is not None and not isinstance(observation, str):
    raise TypeError(f"step's observation is a {type(observation).__name__}; expected str or None")
  if reward is not None and (
    not isinstance(reward, (int, float, np.number)) or not math.isfinite(float(reward))
  ):
    raise TypeError(f"step's reward is {reward!r}; expected a finite number or None")
  return observation, bool(done), reward


def _stop_string_cut(tokenizer, turn: list[int], new: list[int], stops: tuple[str, ...]):
  """The number of `new` tokens after which the turn's text first contains a stop string
  (None: it never does). `turn`: the turn's tokens before `new`, whose text has none."""
  if not stops or not new or not any(s in tokenizer.decode(turn + new) for s in stops):
    return None
  for k in range(1, len(new) + 1):
    if any(s in tokenizer.decode(turn + new[:k]) for s in stops):
      return k
  return len(new)


def _assemble(rows: list[_Row], width: int, pad_id: int, waves: int) -> Episodes:
  n = len(rows)
  tokens = np.full((n, width), pad_id, np.int32)
  floats = {k: np.zeros((n, width), np.float32) for k in ("completion", "model", "lp", "slp")}
  for b, r in enumerate(rows):
    m = len(r.tokens)
    tokens[b, :m] = r.tokens
    floats["completion"][b, r.prompt_length : m] = 1.0
    floats["model"][b, :m] = r.model
    floats["lp"][b, :m] = r.logprobs
    floats["slp"][b, :m] = r.sampling_logprobs
  ints = lambda f: np.asarray([f(r) for r in rows], np.int32)  # noqa: E731
  return Episodes(
    tokens=tokens,
    prompt_lengths=ints(lambda r: r.prompt_length),
    lengths=ints(lambda r: len(r.tokens)),
    completion_mask=floats["completion"],
    model_mask=floats["model"],
    logprobs=floats["lp"],
    sampling_logprobs=floats["slp"],
    rewards=np.asarray([r.reward for r in rows], np.float32),
    turns=ints(lambda r: r.turns),
    reasons=tuple(r.reason for r in rows),
    start_wave=ints(lambda r: r.start_wave),
    end_wave=ints(lambda r: r.end_wave),
    decode_waves=ints(lambda r: r.decode_waves),
    waves=waves,
  )

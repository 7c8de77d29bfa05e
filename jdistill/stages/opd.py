"""The OPD stage: multi-teacher on-policy distillation.

  python -m jdistill opd --config=configs/opd_tiny.py \
      --config.optimizer.lr=3e-6 --config.teachers.math.weight=2

Per step: the jitted sampler draws rollouts from the current student params, then
one compiled `train_step` (explicit in/out shardings, donated state) runs the
teachers on their slots, the student, the chunked loss kernels and the optax
update. With `rollout.devices` = n > 0 the sampler has its own mesh of n devices and
samples step t's batch from the params after update t − `rollout.staleness`, while the
training mesh runs the earlier steps (see `OPDTrainer.sample_ahead` and docs/design.md).
With `episode.environment` set, each rollout is a multi-turn episode
(`jdistill.sampling.episodes`): the environment's tokens are context, never a target.
Progress goes to the console; metrics to `<output_dir>/metrics.jsonl`, TensorBoard
(`<output_dir>/tb`) and a learning-curve PNG.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import logging
from typing import NamedTuple

import jax

from jdistill import config as config_lib
from jdistill import overlap
from jdistill.report.samples import SampleRecorder
from jdistill.runtime import build
from jdistill.runtime import sharding as shd
from jdistill.runtime.sharding import move_rows  # noqa: F401  (tests: train.move_rows)
from jdistill.sampling import Sampler, precision
from jdistill.sampling.episodes import run_episodes
from jdistill.stages.base import TrainingStage, run_training, shardings
from jdistill.step import common, cross_tokenizer, own_devices, streaming
from jdistill.step import opd as ts

log = logging.getLogger("jdistill")

# Entries of a pending batch that a checkpoint leaves out: made again from the rest on restore.
_MADE_AGAIN = ("teacher_layouts", "own_devices_hidden")


def to_float(tree):
  return jax.tree.map(float, jax.device_get(tree))


class Pending(NamedTuple):
  """A rollout batch sampled ahead of its step (disaggregated rollouts)."""

  step: int  # the step that trains on it
  version: int  # the params it was sampled with: those after `version` updates
  data_state: dict  # the data iterator's state before its prompts were drawn
  batch: dict  # the train step's batch, on the training mesh
  episodes: dict  # multi-turn rollouts: the episodes' host metrics (`Episodes.metrics`); {}
  record_index: list  # the prompts' records (`batcher.records`), one per row


class OPDTrainer(TrainingStage):
  """The OPD stage: student rollouts → one compiled step. `run()` trains.

  Built by `TrainingStage` (the contract: `jdistill.stages.base`) from `jdistill.runtime.build`'s
  parts; the loop (`jdistill.runtime.loop`) drives it through `train_one`, `step_tokens`,
  `log_record`, `progress`, `evaluate` and `save`.
  """

  def build_mesh(self) -> None:
    self.mesh, self.rollout_mesh = build.meshes(self.config)

  def build_data(self) -> None:
    c = self.config
    self.batcher = build.prompt_batcher(c, self.tokenizer, c.data.train_files, seed=c.seed)
    build.check_rows_divide(c, self.batcher.rows_per_batch, self.mesh)
    self.eval_batcher = None
    if c.data.eval_files:
      self.eval_batcher = build.prompt_batcher(
        c, self.tokenizer, c.data.eval_files, seed=c.seed + 1
      )
    n = self.batcher.prompt_counts
    log.info(
      "training prompts: %d checked, %d truncated and %d dropped (data.overlong=%r), %d "
      "malformed lines skipped",
      n["checked"], n["truncated"], n["dropped"], c.data.overlong, n["malformed_skipped"],
    )  # fmt: skip
    # scored by the verifier, or with an environment by the episodes' rewards
    scored = c.eval.verifier or c.episode.environment
    self.accuracy_records = self._accuracy_records() if scored else None
    self.data_iter = self.batcher.iterator()
    self.pending: collections.deque[Pending] = collections.deque()  # batches sampled ahead

  def build_models(self, student):
    self.teachers = build.teachers(
      self.config, self.mesh, student.cfg.vocab_size, student_tokenizer=self.tokenizer
    )
    return student.params

  def build_step(self) -> None:
    """The sampler, the jitted train step (explicit shardings, donated state) and eval
    objective."""
    c, t = self.config, self.teachers
    self.sampling = build.sampling_params(c, self.tokenizer)
    self.sampler = Sampler(self.graphdef, self.rollout_mesh or self.mesh)
    # colocated (rollout.devices = 0): step t's batch always uses the params after update t
    self.staleness = c.rollout.staleness if self.rollout_mesh is not None else 0
    self.rollout_shardings = None
    if self.rollout_mesh is not None:
      self.rollout_shardings = shd.value_shardings(self.params, self.rollout_mesh)
    self._rollout_params = None  # (version, params on the sampler's mesh)
    self.batch_shardings = build.batch_shardings(self.mesh)
    self.build_episodes()
    self.alarms = overlap.AlarmTracker(c.overlap)
    structure = dict(
      student_graphdef=self.graphdef,
      teacher_graphdefs=t.graphdefs,
      specs=t.specs,
      groups=t.groups,
      # the loss skips the prompt positions
      loss_window=c.episode.max_total_tokens if self.environment else c.sampling.max_new_tokens,
    )
    cache_shardings = {
      s.index: (streaming.hidden_sharding(self.mesh, len(s.rows)), s.unembed.sharding)
      for s in t.cached
    }
    cache_shardings.update(cross_tokenizer.cache_shardings(t.cross, self.mesh))
    speed = c.student.score_bias_update_speed
    if speed and self.model_cfg.model_type != "deepseek_v3":
      raise ValueError(
        f"config.student.score_bias_update_speed={speed!r} is invalid for this "
        f"{self.model_cfg.model_type!r} student; allowed: 0 (a deepseek_v3 student has the "
        "score-correction bias it moves)"
      )
    step_fn = functools.partial(
      ts.train_step, optimizer=self.optimizer, schedule=self.schedule,
      score_bias_speed=float(speed), **structure,
    )  # fmt: skip
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.train_step = self.jit_step(
      lambda state, teachers, cache, batch, diagnostics: step_fn(
        state, teachers, batch, diagnostics=diagnostics, teacher_cache=cache
      ),
      shardings(t.states),
      cache_shardings,
      self.batch_shardings,
      replicated,
    )
    self.samples = None  # the rollouts recorded token by token on logging steps
    self.recorded: list[dict] = []  # their records since the loop last took them (W&B)
    if c.train.sample_rows:
      self.samples = SampleRecorder(
        out_dir=c.output_dir, tokenizer=self.tokenizer, student_graphdef=self.graphdef,
        teachers=t, rows=c.train.sample_rows, topk=c.train.sample_topk, top_p=c.overlap.top_p,
        vocab=self.model_cfg.vocab_size, mesh=self.mesh,
      )  # fmt: skip
    objective = functools.partial(ts.distill_objective, **structure)
    self.eval_objective = jax.jit(
      lambda p, s, c, b: objective(p, teacher_states=s, batch=b, teacher_cache=c)[1]
    )

  def build_episodes(self) -> None:
    """With `episode.environment`: the environment, the episodes' limits and the model mask's
    placement (`self.environment` is None for single-turn rollouts)."""
    self.environment, self.episode_params = build.episodes(self.config)
    if self.environment is not None:
      self.batch_shardings["model_mask"] = self.batch_shardings["completion_mask"]

  def started(self) -> None:
    if self.samples is not None:  # a resumed run records its later logging steps again
      self.samples.truncate(self.step)

  def data_state(self) -> dict:
    """Where the data stream stands for the next step to train: batches sampled ahead have
    drawn their prompts already, so a checkpoint records the state before the first one."""
    return self.pending[0].data_state if self.pending else self.data_iter.get_state()

  def set_data_state(self, data_state: dict) -> None:
    self.pending.clear()  # sampled from the data and params this replaces
    self._rollout_params = None
    super().set_data_state(data_state)

  def teacher_cache(self, batch: dict) -> dict:
    """The streamed teachers' hidden states on `batch`, one teacher after another, those of
    the teachers on their own devices (dispatched when the batch was sampled, else now), and the
    span log-probs of the teachers of another tokenizer (`{}` when every teacher is resident
    on the training mesh and shares the student's tokenizer). Takes `batch["teacher_layouts"]`
    and `batch["own_devices_hidden"]` out of `batch`."""
    layouts = batch.pop("teacher_layouts", {})
    if isinstance(layouts, concurrent.futures.Future):
      layouts = layouts.result()
    placed = batch.pop("own_devices_hidden", None)
    if placed is None:
      placed = own_devices.teacher_cache(self.teachers.own_devices, batch, self.mesh)
    cache = streaming.teacher_cache(self.teachers.streamed, batch, self.batch_shardings, self.mesh)
    cache.update(placed)
    shardings = cross_tokenizer.cache_shardings(self.teachers.cross, self.mesh)
    for t in self.teachers.cross:
      settings = self.teachers.specs[t.index].settings
      cache[t.index] = cross_tokenizer.teacher_cache(
        t, layouts[t.index], shardings[t.index], settings
      )
    return cache

  def with_teacher_layouts(self, batch: dict, prompts: dict, batcher, ahead: bool = False):
    """`batch` with `teacher_layouts`, `{index: layout}` of the teachers of another tokenizer
    (host NumPy, `cross_tokenizer.layouts`; built once the rollouts are on the host), if any.

    `ahead` (a batch sampled for a later step): a `Future` of that dict instead, built on a
    host thread, so that waiting for the rollouts and aligning them overlaps the steps
    dispatched meanwhile; `teacher_cache` waits for it."""
    if not self.teachers.cross:
      return batch
    arrays = {k: batch[k] for k in ("tokens", "lengths", "completion_mask")}
    records = [batcher.records[int(r)] for r in prompts["record_index"]]
    chat = self.config.data.use_chat_template

    def build_layouts():
      host = jax.device_get(arrays)
      return {
        t.index: cross_tokenizer.layouts(
          t,
          host["tokens"],
          host["lengths"],
          host["completion_mask"],
          [records[r] for r in t.rows],
          chat=chat,
        )  # fmt: skip
        for t in self.teachers.cross
      }

    if not ahead:
      batch["teacher_layouts"] = build_layouts()
      return batch
    if getattr(self, "_host_thread", None) is None:  # one: the layouts stay in step order
      self._host_thread = concurrent.futures.ThreadPoolExecutor(1, "teacher-layouts")
    batch["teacher_layouts"] = self._host_thread.submit(build_layouts)
    return batch

  def _accuracy_records(self) -> list[dict]:
    """The held-out prompts (`data.eval_files`) whose answers `evaluate` checks."""
    if self.eval_batcher is None:
      if not self.config.eval.verifier:  # episodes: accuracy only where there are prompts
        return []
      raise ValueError("config.eval.verifier needs held-out prompts in config.data.eval_files")
    records = self.eval_batcher.records
    missing = [r["where"] for r in records if "answer" not in r]
    if missing and self.config.eval.verifier:  # an environment needs no answer field
      raise ValueError(
        f"{missing[0]}: no 'answer' field, which config.eval.verifier scores against"
      )
    return records

  def accuracy(self) -> dict[str, dict[str, float]]:
    """Per-domain greedy accuracy (and pass@k) of the student on the held-out prompts; with
    an environment, of its multi-turn episodes (the mean reward)."""
    from jdistill.eval import accuracy as evaluate

    c = self.config
    if self.environment is not None:
      return evaluate.episode_accuracy(
        self.sampler, self.eval_params(), self.tokenizer, self.accuracy_records,
        encode=self.encode_prompt, environment=self.environment, episode=self.episode_params,
        pass_k=c.eval.pass_k, prompt_buckets=c.sampling.prompt_buckets,
        batch_rows=self.batcher.rows_per_batch,
      )  # fmt: skip
    return evaluate.accuracy(
      self.sampler, self.eval_params(), self.tokenizer, self.accuracy_records,
      encode=self.encode_prompt, max_new_tokens=c.sampling.max_new_tokens, verifier=c.eval.verifier,
      pass_k=c.eval.pass_k, prompt_buckets=c.sampling.prompt_buckets,
      batch_rows=self.batcher.rows_per_batch,
    )  # fmt: skip

  @property
  def names(self) -> list[str]:
    return self.teachers.names

  # --- one step ------------------------------------------------------------------------

  def rollout_params(self):
    """The current student params (after `step` updates) the training rollouts sample from,
    where the sampler runs: in `rollout.param_dtype` (`sampling.rollout_params`), and when
    disaggregated, copied to the sampler's mesh once per update (cast before the copy).

    Colocated, a bf16 copy is cast at every call (one per step) and not kept, so it does not
    sit beside the train step's state."""
    dtype = self.config.rollout.param_dtype
    if self.rollout_mesh is None:
      return precision.rollout_params(self.state["params"], dtype)
    if self._rollout_params is None or self._rollout_params[0] != self.step:
      params = precision.rollout_params(self.state["params"], dtype)
      self._rollout_params = (self.step, jax.device_put(params, self.rollout_shardings))
    return self._rollout_params[1]

  def eval_params(self):
    """The params evaluation samples from: the student's as they are (never
    `rollout.param_dtype`: evaluation measures the trained model), where the sampler runs."""
    if not self.config.rollout.param_dtype:
      return self.rollout_params()
    if self.rollout_mesh is None:
      return self.state["params"]
    return jax.device_put(self.state["params"], self.rollout_shardings)

  def rollouts(self, prompts: dict, rng, batcher=None, params=None) -> dict:
    """Student rollouts of `params` (default: the training rollouts' `rollout_params`) on a
    prompt batch → the train step's batch (right-padded, on the training mesh).

    With `sampling.continuous_slots`, each teacher's rows share that many refilling decode
    slots (continuous batching); the batch layout is the same. With `episode.environment`,
    multi-turn episodes (`episodes`) on the records of `batcher` (default: training's)."""
    return self.sample(prompts, rng, batcher, params)[0]

  def sample(
    self, prompts: dict, rng, batcher=None, params=None, ahead: bool = False
  ) -> tuple[dict, dict]:
    """`rollouts`, and the episodes' host metrics (`{}` for single-turn rollouts); `ahead`:
    the teachers' layouts as a `Future` (`with_teacher_layouts`)."""
    params = self.rollout_params() if params is None else params
    if self.environment is not None:
      return self.episodes(prompts, rng, batcher or self.batcher, params)
    prompt = (prompts["prompt_tokens"], prompts["prompt_lengths"])
    slots = self.config.sampling.continuous_slots
    if slots:
      out, _ = self.sampler.generate_continuous(
        params,
        prompt,
        rng,
        dataclasses.replace(self.sampling, key_schedule="prompt"),
        slots_per_group=slots,
        groups=prompts["teacher_index"],
      )
    else:
      out = self.sampler.generate(params, prompt, rng, self.sampling)
    if self.rollout_mesh is None:
      batch = common.rollout_batch(out, self.batch_shardings)
    else:
      batch = common.rollout_batch(out)  # still on the sampler's mesh
      batch = {k: move_rows(v, self.batch_shardings[k]) for k, v in batch.items()}
    return self.with_teacher_layouts(batch, prompts, batcher or self.batcher, ahead), {}

  def episodes(self, prompts: dict, rng, batcher, params) -> tuple[dict, dict]:
    """Multi-turn episodes of `params` on a prompt batch → (the train step's batch with
    `model_mask`, the episodes' host metrics). Each row's environment resets on its prompt
    record."""
    records = [batcher.records[int(r)] for r in prompts["record_index"]]
    tokens, lengths = prompts["prompt_tokens"], prompts["prompt_lengths"]
    out = run_episodes(
      self.sampler, params, self.environment, records,
      [row[:n].tolist() for row, n in zip(tokens, lengths)], rng, self.sampling,
      self.episode_params, self.tokenizer, prompt_width=tokens.shape[1],
    )  # fmt: skip
    batch = {k: jax.device_put(v, self.batch_shardings[k]) for k, v in out.batch().items()}
    return batch, out.metrics()

  def sample_ahead(self) -> None:
    """Samples every batch up to step `step + staleness` (at most the last step of
    `train.steps`) not yet sampled, from the current params.

    Step t's batch thus uses the params after update max(t − k, s) (k = staleness, s = the
    step this session started or restored at). The sampler only dispatches device work
    (prompt padding is host work on a few small arrays), so the batch of step t + k is
    computed on the sampler's mesh while the training mesh runs step t.
    """
    last = max(self.step, min(self.step + self.staleness, self.config.train.steps - 1))
    first = self.pending[-1].step + 1 if self.pending else self.step
    for t in range(first, last + 1):
      data_state = self.data_iter.get_state()
      prompts = next(self.data_iter)
      # a batch for a later step aligns on a host thread while this step's work is dispatched
      batch, episodes = self.sample(prompts, self.rollout_key(t), ahead=t > self.step)
      records = [int(r) for r in prompts["record_index"]]
      batch = self.with_own_devices(batch)
      self.pending.append(Pending(t, self.step, data_state, batch, episodes, records))

  def with_own_devices(self, batch: dict) -> dict:
    """`batch` with the hidden states of the teachers on their own devices: their forwards
    start now, beside the step before."""
    if self.teachers.own_devices:
      arrays = {k: v for k, v in batch.items() if k not in _MADE_AGAIN}
      batch["own_devices_hidden"] = own_devices.teacher_cache(
        self.teachers.own_devices, arrays, self.mesh
      )
    return batch

  def pending_state(self) -> tuple[dict, dict] | None:
    """The batches sampled ahead (`sample_ahead`), for the checkpoint: their arrays `{"0":
    batch, ...}` on the host (the teachers' layouts of another tokenizer are made again from
    the records, and the hidden states of teachers on their own devices from the batch), and
    the step, params version, data state, episodes' metrics and records of each, with the
    data state after the last. Saving the batches, not the k older params they were sampled
    from, is exact without sampling again and costs `[B, L]` arrays, not k copies of the
    student (docs/design.md, Disaggregated rollouts)."""
    if not self.pending:
      return None
    arrays = {
      str(i): jax.device_get({k: v for k, v in p.batch.items() if k not in _MADE_AGAIN})
      for i, p in enumerate(self.pending)
    }
    batches = [
      dict(step=p.step, version=p.version, data_state=p.data_state,
           episodes=to_float(p.episodes), record_index=p.record_index)
      for p in self.pending
    ]  # fmt: skip
    return arrays, dict(
      staleness=self.staleness, data_after=self.data_iter.get_state(), batches=batches
    )

  def set_pending_state(self, saved: dict | None) -> None:
    """Puts the saved batches sampled ahead back (on the training mesh) and the data stream
    after them, so the next steps train on what an uninterrupted run would. A checkpoint
    without them (older than this, or of another `rollout.staleness`) resumes the way a new
    run starts: its first k batches are sampled from the restored params (a warning)."""
    description = (saved or {}).get("description") or {}
    if saved is not None and not description:
      return  # nothing was pending
    if saved is None or description["staleness"] != self.staleness:
      if self.staleness:
        why = (
          "was written before batches sampled ahead were saved" if saved is None
          else f"holds batches sampled ahead at rollout.staleness={description['staleness']}"
        )  # fmt: skip
        log.warning(
          "checkpoint step %d %s: steps %d..%d are sampled again from the restored params, so "
          "this run differs from an uninterrupted one in their staleness",
          self.step, why, self.step, self.step + self.staleness - 1,
        )  # fmt: skip
      return
    for i, b in enumerate(description["batches"]):
      host = saved["arrays"][str(i)]
      batch = {k: jax.device_put(v, self.batch_shardings[k]) for k, v in host.items()}
      prompts = {"record_index": b["record_index"]}
      batch = self.with_own_devices(self.with_teacher_layouts(batch, prompts, self.batcher))
      self.pending.append(
        Pending(b["step"], b["version"], b["data_state"], batch, b["episodes"], b["record_index"])
      )
    self.data_iter.set_state(description["data_after"])

  def train_one(self, diagnostics: bool = True) -> dict:
    """One OPD step; `diagnostics`: compute the overlap diagnostics (logging steps).

    Metrics gain `rollout_staleness`: the step minus the params version its batch used, and
    with multi-turn rollouts `episodes` (`Episodes.metrics`)."""
    self.sample_ahead()
    pending = self.pending.popleft()
    batch, t = pending.batch, self.step
    flag = jax.numpy.asarray(diagnostics)
    cache = self.teacher_cache(batch)
    if diagnostics and self.samples is not None:  # before the update: the params that scored
      self.recorded += self.samples.record(t + 1, self.state["params"], batch)
    self.state, metrics = self.train_step(self.state, self.teachers.states, cache, batch, flag)
    self.step += 1
    if self.rollout_mesh is not None:
      self.rollout_params()  # the copy to the sampler's mesh starts as soon as the step ends
    episodes = {"episodes": pending.episodes} if pending.episodes else {}
    return dict(metrics, rollout_staleness=t - pending.version, **episodes)

  def take_samples(self) -> list[dict]:
    """The sample records of the logging steps since the last call (the run log's W&B
    table)."""
    recorded, self.recorded = self.recorded, []
    return recorded

  def step_tokens(self, metrics: dict) -> dict:
    generated = sum(t["tokens"] for t in metrics["teachers"].values())
    return {"generated": generated, "total": metrics["tokens"]}

  def log_record(self, metrics: dict) -> dict:
    record = to_float(metrics)
    for name, alarm in self.alarms.update(self.step, record["teachers"]).items():
      record["teachers"][name]["overlap_alarm"] = float(alarm)
    return record

  def progress(self, record: dict) -> str:
    """Per-teacher full-vocab reverse KL: a divergence that reaches 0 at the teacher (never
    the optimisation surrogate, whose value for sampled estimators is no divergence)."""
    line = " ".join(f"{n} rkl {t['reverse_kl']:.3f}" for n, t in record["teachers"].items())
    if self.rollout_mesh is not None:
      line += f" | staleness {record['rollout_staleness']:.0f}"
    if "episodes" in record:
      e = record["episodes"]
      line += f" | episode reward {e['reward']:.2f} turns {e['turns']:.1f}"
    return line

  # --- evaluation ----------------------------------------------------------------------

  def evaluate(self, seed: int = 1234) -> dict[str, dict]:
    """Per-teacher metrics (full-vocab reverse KL etc.) on held-out student rollouts.

    One batch of `eval_files` prompts (else a far-away batch of the training stream),
    sampled with a fixed key, so evaluations at different steps are comparable."""
    batcher = self.eval_batcher or self.batcher
    prompts = batcher.batch(10**6 if batcher is self.batcher else 0)
    batch = self.rollouts(prompts, jax.random.key(seed), batcher, self.eval_params())
    results = to_float(
      self.eval_objective(
        self.state["params"], self.teachers.states, self.teacher_cache(batch), batch
      )
    )
    if self.accuracy_records:  # each teacher: the accuracy over the domains it owns
      per_domain = self.accuracy()
      owners = config_lib.teacher_domains(self.config)
      for name in results:
        mine = [per_domain[d] for d in owners[name] if d in per_domain]
        total = sum(v["prompts"] for v in mine)
        for key in {k for v in mine for k in v if k != "prompts"}:
          results[name][key] = sum(v[key] * v["prompts"] for v in mine) / max(total, 1)
    return results

  def describe_eval(self, results: dict) -> str:
    return " ".join(
      f"{n} rkl {v['reverse_kl']:.3f}" + (f" acc {v['accuracy']:.2f}" if "accuracy" in v else "")
      for n, v in results.items()
    )

  def describe_change(self, before: dict, after: dict) -> str:
    """Per teacher: full-vocab reverse KL and teacher log-prob, before → after training."""
    lines = [
      f"{'teacher':<14}{'reverse KL before':>19}{'after':>10}"
      f"{'teacher logp before':>21}{'after':>10}"
    ]
    for name in before:
      b, a = before[name], after[name]
      lines.append(
        f"{name:<14}{b['reverse_kl']:>19.4f}{a['reverse_kl']:>10.4f}"
        f"{b['teacher_logp']:>21.4f}{a['teacher_logp']:>10.4f}"
      )
    return "\n".join(lines)


def run(config) -> dict:
  """The OPD stage from `config`, trained to its end (`base.run_training`)."""
  return run_training(OPDTrainer, config)

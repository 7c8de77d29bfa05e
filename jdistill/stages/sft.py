"""Warmup SFT: masked cross-entropy on completions, packed rows, the shared loop and machinery.

  python -m jdistill sft --config=configs/sft_tiny.py

The student learns a teacher's (or any) completions before on-policy distillation, to pull
its rollouts onto the teacher's support. Prompts carry no loss, only the completion and its
end-of-sequence token (`jdistill.data.packing`). The step is one pure jitted function
(`jdistill.step.sft`; explicit shardings, donated state) ending in the same optax update as OPD
(`jdistill.step.common.apply_gradients`); the loop, progress line, metrics, checkpoints
(verified, resumable), signals and run directories are the OPD stage's.

Overlap-triggered warmup (`sft.until_overlap` > 0): instead of a fixed length, every
`sft.overlap_every` steps each teacher's calibrated overlap (1 − TV, token mean) with the
student's own rollouts on its prompts is measured (`overlap.OverlapProbe`). A teacher whose
overlap reaches the threshold switches to OPD: the switch is logged and written to
`<output_dir>/switches.json` with the measured value, and its examples (packed per domain)
leave the main SFT mix; a share `sft.replay_share` of every later step's rows is replayed
from the switched teachers' examples, so a domain that switched early does not erode while
the others train on. The stage ends when every teacher has switched (or at `train.steps`); the
next pipeline stage distils from all of them. (Teachers that switched wait for the others:
one step mixing SFT rows and OPD rows is not built.)
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import numpy as np

from jdistill import config as config_lib
from jdistill import overlap
from jdistill.data import packing
from jdistill.runtime import build, plots
from jdistill.runtime import sharding as shd
from jdistill.runtime.io import write_json_atomic
from jdistill.stages.base import TrainingStage, run_training, shardings
from jdistill.step.sft import BATCH_KEYS, sft_loss, sft_step

log = logging.getLogger("jdistill")


def read_files(files: str, **kw) -> list:
  """Examples of comma-separated JSONL `files` (`packing.read_examples`). An empty file (say
  a generation part whose samples all failed verification) adds nothing; all empty is an
  error."""
  paths = [p.strip() for p in str(files).split(",") if p.strip()]
  filled = [p for p in paths if not os.path.exists(p) or os.path.getsize(p) > 0]
  if not filled:
    raise ValueError(f"{files}: every file is empty (no examples to train on)")
  return [e for path in filled for e in packing.read_examples(path, **kw)]


class SFTTrainer(TrainingStage):
  """The SFT stage for `loop.Loop`; built from a validated config with `stage="sft"`."""

  token_label = "completion"  # the progress line's first tokens/s: tokens that carry loss
  curve = staticmethod(plots.sft_curve)

  def build_data(self) -> None:
    c, s = self.config, self.config.sft
    read = functools.partial(
      read_files,
      tokenizer=self.tokenizer,
      use_chat_template=c.data.use_chat_template,
      max_len=s.max_len,
    )
    examples = read(s.train_files)
    self.switches: dict[str, dict] = {}  # teacher → {"step", "overlap"} once it crossed
    self.phase_start = 0  # the step of the last switch: the row order restarts there
    if s.until_overlap:
      self.owner = {d: name for name, doms in config_lib.teacher_domains(c).items() for d in doms}
      unowned = sorted({str(e[2]) for e in examples if e[2] not in self.owner})
      if unowned:
        raise ValueError(
          f"sft.until_overlap: examples of domains {unowned} in {s.train_files} belong to no "
          "teacher (each example needs a 'domain' a teacher owns)"
        )
      parts = {d: [e for e in examples if e[2] == d] for d in sorted({e[2] for e in examples})}
      packed = {d: packing.pack(exs, s.max_len, pack_rows=s.pack) for d, exs in parts.items()}
      self.rows = {k: np.concatenate([p[k] for p in packed.values()]) for k in BATCH_KEYS}
      self.row_teacher = np.asarray(
        [self.owner[d] for d, p in packed.items() for _ in range(len(p["tokens"]))]
      )
    else:
      self.rows = packing.pack(examples, s.max_len, pack_rows=s.pack)
      self.row_teacher = None
    self.eval_rows = packing.pack(read(s.eval_files), s.max_len) if s.eval_files else None
    n_rows = len(self.rows["tokens"])
    log.info(
      "sft: %d rows of %d tokens, %d completion tokens",
      n_rows, s.max_len, int(self.rows["loss_mask"].sum()),
    )  # fmt: skip

  def build_models(self, student):
    """The teachers of the overlap probe (`sft.until_overlap`), if any."""
    c = self.config
    self.probe = None
    if c.sft.until_overlap:
      teachers = build.teachers(c, self.mesh, student.cfg.vocab_size)
      self.probe = overlap.OverlapProbe(
        c, self.mesh, self.tokenizer, self.graphdef, teachers, c.sft.overlap_rows
      )
    return student.params

  def build_step(self) -> None:
    c = self.config
    self.shardings = {k: shd.batch_sharding(self.mesh, 2) for k in BATCH_KEYS}
    step = functools.partial(
      sft_step,
      graphdef=self.graphdef,
      optimizer=self.optimizer,
      schedule=self.schedule,
      chunk_size=c.loss.chunk_size,
    )
    self.train_step = self.jit_step(step, self.shardings)
    self.eval_loss = jax.jit(
      lambda p, b: sft_loss(p, self.graphdef, b, c.loss.chunk_size)[0],
      in_shardings=(shardings(self.params), self.shardings),
    )

  def started(self) -> None:
    if self.probe is not None and self.step == 0:
      # A teacher the student already overlaps switches before any SFT step: training first
      # and probing after would move the student off a support it already had.
      self.probe_overlap()

  # --- data: row order is a pure function of (seed, phase, epoch), so resume needs only the
  # step and the switches so far

  def active_rows(self) -> np.ndarray:
    """Rows still trained on: all, or those of teachers that have not switched to OPD."""
    if self.row_teacher is None:
      return np.arange(len(self.rows["tokens"]))
    return np.flatnonzero(~np.isin(self.row_teacher, list(self.switches)))

  def replay_rows(self) -> np.ndarray:
    """Rows of the teachers that have switched to OPD (replayed at `sft.replay_share`)."""
    if self.row_teacher is None:
      return np.arange(0)
    return np.flatnonzero(np.isin(self.row_teacher, list(self.switches)))

  def batch(self, step: int) -> dict:
    """Rows of step `step`: epochs of a seeded permutation of the active rows, restarting
    at each teacher's switch (phase), and once a teacher has switched, round(replay_share ·
    rows_per_step) rows drawn (seeded by step) from the switched teachers' rows."""
    active, replay = self.active_rows(), self.replay_rows()
    rows_per_step = self.config.sft.rows_per_step
    replayed = round(self.config.sft.replay_share * rows_per_step) if len(replay) else 0
    replayed = min(replayed, rows_per_step - 1) if len(active) else rows_per_step
    k = rows_per_step - replayed
    n, phase, local = len(active), len(self.switches), step - self.phase_start
    order = []
    epoch = (local * k) // max(n, 1)
    while n and len(order) < (local * k) % n + k:
      order.extend(np.random.default_rng([self.config.seed, phase, epoch]).permutation(n))
      epoch += 1
    first = (local * k) % max(n, 1)
    picked = active[np.asarray(order[first : first + k], dtype=np.int64)]
    if replayed:
      rng = np.random.default_rng([self.config.seed, phase, step, 1])
      extra = rng.choice(replay, replayed, replace=len(replay) < replayed)
      picked = np.concatenate([picked, extra])
    return {
      name: jax.device_put(self.rows[name][picked], self.shardings[name]) for name in BATCH_KEYS
    }

  @property
  def done(self) -> bool:
    """The overlap-triggered warmup is over: every teacher has crossed its threshold."""
    return self.probe is not None and len(self.switches) == len(self.probe.teachers.names)

  def probe_overlap(self) -> dict[str, float]:
    """Measures each teacher's overlap; a teacher crossing `sft.until_overlap` switches to
    OPD: logged with the measured value, its rows leave the SFT mix."""
    readings = self.probe.measure(self.state["params"])
    threshold = self.config.sft.until_overlap
    line = " ".join(f"{n} {v:.3f}" for n, v in readings.items())
    log.info("sft step %d: overlap %s (switch at >= %s)", self.step, line, threshold)
    for name, value in readings.items():
      if name not in self.switches and value >= threshold:
        self.switches[name] = {"step": self.step, "overlap": value, "threshold": threshold}
        self.phase_start = self.step
        log.info(
          "sft: teacher %r switches to OPD at step %d: overlap %.3f >= %s",
          name, self.step, value, threshold,
        )  # fmt: skip
    path = os.path.join(self.config.output_dir, "switches.json")
    write_json_atomic(path, self.switches, indent=1)
    return readings

  # --- the loop's Stage protocol ------------------------------------------------------

  def train_one(self, diagnostics: bool = True) -> dict:
    del diagnostics  # SFT has no costly diagnostics
    self.state, metrics = self.train_step(self.state, self.batch(self.step))
    self.step += 1
    if self.probe is not None and self.step % self.config.sft.overlap_every == 0:
      metrics = dict(metrics, overlap=self.probe_overlap(), switched=len(self.switches))
    return metrics

  def step_tokens(self, metrics: dict) -> dict:
    return {"generated": metrics["completion_tokens"], "total": metrics["tokens"]}

  def log_record(self, metrics: dict) -> dict:
    return jax.tree.map(float, jax.device_get(metrics))

  def progress(self, record: dict) -> str:
    return f"completion cross-entropy {record['loss']:.4f}"

  def evaluate(self) -> dict:
    """Held-out completion cross-entropy (`sft.eval_files`, else the training rows)."""
    rows = self.eval_rows or self.rows
    n = self.config.sft.rows_per_step
    losses_ = []
    for start in range(0, len(rows["tokens"]) - n + 1, n):
      b = {k: jax.device_put(rows[k][start : start + n], self.shardings[k]) for k in BATCH_KEYS}
      losses_.append(float(self.eval_loss(self.state["params"], b)))
    return {"cross_entropy": float(np.mean(losses_)) if losses_ else float("nan")}

  def describe_eval(self, results: dict) -> str:
    return f"held-out completion cross-entropy {results['cross_entropy']:.4f}"

  def data_state(self) -> dict:
    return {"step": self.step, "switches": self.switches, "phase_start": self.phase_start}

  def set_data_state(self, data_state: dict) -> None:
    self.switches = dict(data_state.get("switches", {}))
    self.phase_start = int(data_state.get("phase_start", 0))

  def describe_change(self, before: dict, after: dict) -> str:
    return (
      f"held-out completion cross-entropy {before['cross_entropy']:.4f} -> "
      f"{after['cross_entropy']:.4f}"
    )


def run(config) -> dict:
  """The SFT stage from `config`, trained to its end (`base.run_training`)."""
  return run_training(SFTTrainer, config)

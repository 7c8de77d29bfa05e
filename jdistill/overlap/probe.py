"""The overlap probe and the `overlap` command: student rollouts scored by each teacher.

  python -m jdistill overlap --config=configs/opd_tiny.py [--out=DIR] [--rows_per_domain=N]

samples ``rows_per_domain`` student rollouts per domain (prompts from
``data.eval_files``, else ``data.train_files``; sampling settings from
``config.sampling``), scores each domain's rollouts with the teacher that owns the
domain, and writes ``overlap.json`` (per teacher and per domain aggregates, the
coverage-vs-k curve, readings and alarms), ``teacher_logp_hist.png`` and
``topk_coverage.png`` to ``--out`` (default ``<output_dir>/overlap``), and a table to
stdout. The student is ``config.student.path`` (an HF or a jdistill checkpoint
directory); ``--use_checkpoint`` instead restores the latest checkpoint of
``config.checkpoint.dir``.

A teacher of another tokenizer (``config.teachers.<name>.tokenizer``) is read on its own
tokens (the host alignment and the dense loss's scorer, `step.cross_tokenizer`): the same
metrics on the student tokens whose span is single (one token per side, equal bytes), on
the matched vocabulary plus one tail bucket (`metrics.matched_overlap_metrics`), with
``single_span_share``, ``dropped_share`` and the span log-ratio ``span_reverse_kl``
(`metrics.span_log_ratio`) beside them; its entry says ``"measured_on": "single spans"``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import types
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from jdistill.overlap.metrics import (
  aggregate,
  chunked_matched_overlap_metrics,
  chunked_overlap_metrics,
  overlap_alarms,
  reading,
  span_log_ratio,
  thresholds_from_config,
)

log = logging.getLogger("jdistill")


def coverage_ks(vocab: int) -> list[int]:
  """1, 2, 4, ..., 256, capped at (and ending with) the vocabulary size."""
  ks = [k for k in (2**i for i in range(8)) if k < min(256, vocab)]
  return ks + [min(256, vocab)]


def _prompt_rows(config, tokenizer, records, domains: Sequence[str], rows_per_domain: int):
  """(domain, token ids, record) of the first ``rows_per_domain`` prompts of each domain
  (cycled if fewer)."""
  from jdistill.data import prompts as data_lib

  d = config.data
  out = []
  for domain in domains:
    recs = [r for r in records if r["domain"] == domain]
    ids = []
    for rec in recs:
      if len(ids) == rows_per_domain:
        break
      enc = data_lib.encode_prompt(
        rec,
        tokenizer,
        use_chat_template=d.use_chat_template,
        max_prompt_len=d.max_prompt_len,
        overlong=d.overlong,
      )
      if enc is not None:
        ids.append((enc, rec))
    if not ids:
      raise ValueError(f"domain {domain!r} has no usable prompts")
    out += [(domain, *ids[i % len(ids)]) for i in range(rows_per_domain)]
  return out


def _score_fn(student_graphdef, teacher_graphdef, chunk_size: int, metric_kw: dict):
  from jdistill.step import common

  @jax.jit
  def score(student_params, teacher_state, batch):
    x = common.shifted_inputs(batch)
    student = nnx.merge(student_graphdef, student_params)
    hidden, _ = student(x["inputs"], x["positions"], kv_mask=x["kv_mask"])
    rows = tuple(range(x["inputs"].shape[0]))
    t_hidden, t_unembed = common.teacher_hidden(teacher_graphdef, teacher_state, x, rows)
    per_token = chunked_overlap_metrics(
      hidden,
      student.unembedding(),
      t_hidden,
      t_unembed,
      x["targets"],
      chunk_size=chunk_size,
      **metric_kw,
    )
    return per_token, x["mask"]

  return score


def _cross_scores(config, mesh, teacher, rows, sel, batch: dict, vocab: int) -> dict:
  """A teacher of another tokenizer (`cross_tokenizer.CrossTeacher`) on the student's rollouts
  `batch` rows `sel` (`rows[r][2]` their prompt records): laid out for it on the host
  (`cross_tokenizer.layouts`) and scored on its own tokens by the dense loss's scorer
  (`cross_tokenizer.teacher_cache` → `dense_scores`, at temperature 1), with its vocabulary
  map over all `vocab` ids of the student (ids past the student's tokenizer: unmatched)."""
  from jdistill.step import cross_tokenizer

  vocab_map = cross_tokenizer.model_vocab_map(teacher.student, teacher.teacher, vocab)
  # read by token whatever its `dense_match` (the metrics are those of the matched ids)
  teacher = dataclasses.replace(
    teacher, rows=tuple(int(r) for r in sel), vocab_map=vocab_map, groups=None, marginal=False
  )
  layout = cross_tokenizer.layouts(
    teacher, batch["tokens"], batch["lengths"], batch["completion_mask"],
    [rows[r][2] for r in sel], chat=config.data.use_chat_template,
  )  # fmt: skip
  shardings = cross_tokenizer.cache_shardings([teacher], mesh)[teacher.index]
  settings = types.SimpleNamespace(temperature=1.0, chunk_size=int(config.loss.chunk_size))
  return cross_tokenizer.teacher_cache(teacher, layout, shardings, settings)


def _cross_score_fn(student_graphdef, chunk_size: int, metric_kw: dict):
  """The student's side against a teacher of another tokenizer's `teacher_cache` entry →
  (metrics on the single spans' coarsened vocabularies, the span log-ratio, the shares, and
  the masks `single`, `span`, `completion` they are read under), all `[S, L-1]`."""
  import jax.numpy as jnp

  from jdistill.step import common

  @jax.jit
  def score(student_params, batch, entry):
    x = common.shifted_inputs(batch)
    student = nnx.merge(student_graphdef, student_params)
    hidden, _ = student(x["inputs"], x["positions"], kv_mask=x["kv_mask"])
    per_token, logq = chunked_matched_overlap_metrics(
      hidden, student.unembedding(), entry["hidden"], entry["unembed"], entry["tail_logp"],
      entry["matched"], x["targets"], chunk_size=chunk_size, **metric_kw,
    )  # fmt: skip
    span = span_log_ratio(logq, entry["span_logp"], entry["student_span"], x["mask"])
    has = (entry["student_span"] >= 0).astype(jnp.float32)
    shares = dict(single_span_share=entry["gate"], dropped_share=1.0 - has)
    masks = dict(single=x["mask"] * entry["gate"], span=x["mask"] * has, completion=x["mask"])
    return per_token, span, shares, masks

  return score


def _cross_aggregate(per_token, span, shares, masks, group, n_groups: int) -> dict[int, dict]:
  """`aggregate` for a teacher of another tokenizer: the metrics over its single-span tokens
  (`tokens`, `sequences` and the quantiles count those), the span log-ratio over the tokens
  with a span (`span_tokens`), the shares over the completion's (`completion_tokens`)."""
  single = aggregate(per_token, masks["single"], group, n_groups)
  spans = aggregate(span, masks["span"], group, n_groups)
  whole = aggregate(shares, masks["completion"], group, n_groups)
  out = {}
  for g in range(n_groups):
    agg = single[g]
    for part in (spans[g], whole[g]):
      agg["token_mean"].update(part["token_mean"])
      agg["sequence_mean"].update(part["sequence_mean"])
    agg.update(
      span_tokens=spans[g]["tokens"], completion_tokens=whole[g]["tokens"],
      measured_on="single spans",
    )  # fmt: skip
    out[g] = agg
  return out


def _nan_to_none(tree):
  if isinstance(tree, dict):
    return {str(k): _nan_to_none(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_nan_to_none(v) for v in tree]
  if isinstance(tree, float) and not math.isfinite(tree):
    return None
  return tree


def _student_and_teachers(config, mesh, use_checkpoint: bool, tokenizer=None):
  """The student (`config.student.path`, or the latest checkpoint of `config.checkpoint.dir`
  with `use_checkpoint`) and the teachers, built as the trainer builds them (`tokenizer` the
  student's, which a teacher of another tokenizer is aligned with)."""
  from jdistill.runtime import build
  from jdistill.runtime import checkpoint as ckpt

  student = build.student(config, mesh)
  if use_checkpoint:
    ckpt_dir = config.checkpoint.dir
    if not ckpt_dir or not ckpt.is_checkpoint_dir(ckpt_dir):
      raise FileNotFoundError(
        f"--use_checkpoint: config.checkpoint.dir={ckpt_dir!r} is not a jdistill checkpoint "
        "directory"
      )
    s = config.student
    trained = ckpt.load_model_from_checkpoint(
      ckpt_dir, mesh, param_dtype=s.param_dtype, dtype=s.dtype
    )
    student.params = nnx.state(trained)
    student.step = ckpt.latest_step(ckpt_dir)
  return student, build.teachers(config, mesh, student.cfg.vocab_size, student_tokenizer=tokenizer)


def _rollouts(config, student, tokenizer, mesh, rows, seed: int, sampler=None) -> dict:
  """One batch of student rollouts for `rows` [(domain, prompt ids, record)] → numpy
  `[len(rows), L]` (padded to the data-parallel size for sampling, then cut back). With
  `episode.environment` each row is a multi-turn episode and the batch carries its
  `model_mask`: the metrics weigh the student's tokens only, never the environment's."""
  from jdistill.runtime import build
  from jdistill.sampling import Sampler
  from jdistill.sampling.episodes import run_episodes
  from jdistill.step import common

  sampler = sampler or Sampler(student.graphdef, mesh)
  n_real = len(rows)
  padded = rows + [rows[-1]] * (-n_real % sampler.data_parallel_size())
  sampling = build.sampling_params(config, tokenizer)
  ids, key = [r[1] for r in padded], jax.random.key(seed)
  environment, limits = build.episodes(config)
  if environment is not None:
    records = [r[2] for r in padded]
    out = run_episodes(
      sampler, student.params, environment, records, ids, key, sampling, limits, tokenizer
    )
    return {k: np.asarray(v)[:n_real] for k, v in out.batch().items()}
  out = sampler.generate(student.params, ids, key, sampling)
  batch = jax.device_get(common.rollout_batch(out, build.batch_shardings(mesh)))
  return {k: np.asarray(v)[:n_real] for k, v in batch.items()}


class OverlapProbe:
  """Each teacher's calibrated overlap (1 − TV, token mean) with a student's own rollouts,
  measured in-process on fixed prompts and a fixed key, so readings at different steps are
  comparable. The overlap-triggered warmup of the SFT stage uses it.

  `rows_per_domain` prompts of each of a teacher's domains (from `data.eval_files`, else
  `data.train_files`) are sampled once per `measure(params)`.
  """

  def __init__(self, config, mesh, tokenizer, student_graphdef, teachers, rows_per_domain: int):
    from jdistill import config as config_lib
    from jdistill.runtime import build
    from jdistill.sampling import Sampler

    self.config, self.mesh, self.tokenizer = config, mesh, tokenizer
    self.teachers = teachers
    files = config.data.eval_files or config.data.train_files
    records, _ = build.read_records(files, config)
    owners = config_lib.teacher_domains(config)
    present = {r["domain"] for r in records}
    self.domains = [d for name in teachers.names for d in owners[name] if d in present]
    self.rows = _prompt_rows(config, tokenizer, records, self.domains, rows_per_domain)
    row_domain = [self.domains.index(r[0]) for r in self.rows]
    self.teacher_rows = {
      name: np.flatnonzero(np.isin(row_domain, [self.domains.index(d) for d in owners[name]]))
      for name in teachers.names
    }
    self.student = types.SimpleNamespace(graphdef=student_graphdef, params=None)
    self.sampler = Sampler(student_graphdef, mesh)
    kw = dict(topks=(1,), top_p=float(config.overlap.top_p), floor_prob=1e-3, student_topks=(1,))
    self.scores = [
      _score_fn(student_graphdef, teachers.member(i)[0], int(config.loss.chunk_size), kw)
      for i in range(len(teachers.names))
    ]

  def measure(self, params) -> dict[str, float]:
    """{teacher: token-mean overlap of the student with `params` on that teacher's rows}."""
    self.student.params = params
    batch = _rollouts(
      self.config, self.student, self.tokenizer, self.mesh, self.rows, self.config.seed,
      sampler=self.sampler,
    )  # fmt: skip
    out = {}
    for i, name in enumerate(self.teachers.names):
      sel = self.teacher_rows[name]
      if sel.size == 0:
        continue
      sub = {k: v[sel] for k, v in batch.items()}
      per_token, mask = jax.device_get(self.scores[i](params, self.teachers.member(i)[1], sub))
      mask = np.asarray(mask, np.float64)
      out[name] = float((np.asarray(per_token["overlap"]) * mask).sum() / max(mask.sum(), 1.0))
    return out


def measure(
  config, *, rows_per_domain: int = 16, use_checkpoint: bool = False, seed: int | None = None
) -> dict:
  """Samples student rollouts per domain and scores them with the owning teachers.

  Returns the report written to ``overlap.json`` plus ``"_teacher_logp"`` (per teacher,
  the masked teacher log-probs, for the histogram). A teacher of another tokenizer is read on
  its single spans, with the span log-ratio and the shares beside them (module docstring).
  """
  from jdistill import config as config_lib
  from jdistill.runtime import build

  if rows_per_domain < 1:
    raise ValueError(f"rows_per_domain must be >= 1, got {rows_per_domain}")
  config_lib.validate(config)
  build.check_cross_processes(config)  # before anything loads
  mesh = build.mesh(config)
  tokenizer = build.tokenizer(config)
  student, teachers = _student_and_teachers(config, mesh, use_checkpoint, tokenizer)
  thresholds = thresholds_from_config(config)
  curve_ks = coverage_ks(student.cfg.vocab_size)
  metric_kw = dict(
    topks=tuple(sorted({int(k) for k in config.overlap.topks} | set(curve_ks))),
    top_p=float(config.overlap.top_p),
    floor_prob=float(config.overlap.floor_prob),
    student_topks=tuple(int(k) for k in config.overlap.topks),
  )

  files = config.data.eval_files or config.data.train_files
  records, _ = build.read_records(files, config)
  owners = config_lib.teacher_domains(config)
  present = {r["domain"] for r in records}
  domains = [d for name in teachers.names for d in owners[name] if d in present]
  rows = _prompt_rows(config, tokenizer, records, domains, rows_per_domain)
  batch = _rollouts(config, student, tokenizer, mesh, rows, config.seed if seed is None else seed)
  row_domain = np.asarray([domains.index(r[0]) for r in rows], np.int32)

  report = {
    "source": files,
    "student": config.checkpoint.dir if use_checkpoint else config.student.path,
    "student_step": student.step,
    "rows_per_domain": rows_per_domain,
    "max_new_tokens": int(config.sampling.max_new_tokens),
    "vocab": student.cfg.vocab_size,
    "thresholds": dict(thresholds, floor_prob=metric_kw["floor_prob"], top_p=metric_kw["top_p"]),
    "coverage_ks": curve_ks,
    "teachers": {},
    "domains": {},
    "_teacher_logp": {},
  }
  cross = {t.index: t for t in teachers.cross}
  chunk_size = int(config.loss.chunk_size)
  for i, name in enumerate(teachers.names):
    own = [domains.index(d) for d in owners[name] if d in domains]
    sel = np.flatnonzero(np.isin(row_domain, own))
    if sel.size == 0:
      continue
    sub = {k: v[sel] for k, v in batch.items()}
    if i in cross:  # its own tokens: single spans, the span log-ratio
      entry = _cross_scores(config, mesh, cross[i], rows, sel, batch, student.cfg.vocab_size)
      score = _cross_score_fn(student.graphdef, chunk_size, metric_kw)
      parts = jax.device_get(score(student.params, sub, entry))
      parts = [{k: np.asarray(v) for k, v in p.items()} for p in parts]
      per_token, mask = parts[0], parts[3]["single"]
      agg = lambda group, n, parts=parts: _cross_aggregate(*parts, group, n)  # noqa: E731
    else:
      teacher_graphdef, teacher_state = teachers.member(i)
      score = _score_fn(student.graphdef, teacher_graphdef, chunk_size, metric_kw)
      per_token, mask = jax.device_get(score(student.params, teacher_state, sub))
      per_token, mask = {k: np.asarray(v) for k, v in per_token.items()}, np.asarray(mask)
      agg = lambda group, n, p=per_token, m=mask: aggregate(p, m, group, n)  # noqa: E731
    whole = agg(np.zeros(sel.size, np.int32), 1)[0]
    whole["domains"] = list(owners[name])
    whole["coverage_curve"] = {str(k): whole["token_mean"][f"in_teacher_top{k}"] for k in curve_ks}
    whole["reading"] = reading(whole["token_mean"], **thresholds)
    if i in cross:
      whole["tokenizer"] = config.teachers[name].tokenizer
      whole["reading"]["measured_on"] = "single spans"
    report["teachers"][name] = whole
    report["_teacher_logp"][name] = per_token["teacher_logp"][mask != 0]
    local = np.asarray([own.index(g) for g in row_domain[sel]], np.int32)
    for j, a in agg(local, len(own)).items():
      report["domains"][domains[own[j]]] = dict(a, teacher=name)
  report["alarms"] = []
  for name, t in report["teachers"].items():
    alarms = overlap_alarms(
      {name: t["token_mean"]},
      min_overlap=thresholds["min_overlap"],
      min_nucleus_coverage=thresholds["min_nucleus_coverage"],
    )
    if "measured_on" in t:
      share = t["token_mean"]["single_span_share"]
      alarms = [f"{a} (on its single spans, {share:.0%} of the student's tokens)" for a in alarms]
    report["alarms"] += alarms
  return report


_TABLE_KEYS = (
  ("overlap", "overlap", "{:>8.1%}"),
  ("nucleus_coverage", "nucleus", "{:>8.1%}"),
  ("excess_xent", "xs-xent", "{:>8.3f}"),
  ("teacher_logp", "logp", "{:>8.3f}"),
  ("in_teacher_top1", "top1", "{:>7.1%}"),
  ("in_teacher_top8", "top8", "{:>7.1%}"),
  ("in_teacher_top32", "top32", "{:>7.1%}"),
  ("in_teacher_top_p", "top-p", "{:>7.1%}"),
  ("off_support", "off", "{:>7.1%}"),
  ("reverse_kl", "RKL", "{:>8.3f}"),
  ("forward_kl", "FKL", "{:>8.3f}"),
  ("tv", "TV", "{:>7.3f}"),
  ("teacher_mass_on_student_top8", "mass@s8", "{:>8.1%}"),
  ("single_span_share", "single", "{:>7.1%}"),
  ("span_reverse_kl", "spanRKL", "{:>8.3f}"),
)


def format_table(report: dict) -> str:
  """The stdout table: one line per teacher, then per domain, then readings and alarms."""
  keys = [
    (k, h, f)
    for k, h, f in _TABLE_KEYS
    if any(k in t["token_mean"] for t in report["teachers"].values())
  ]
  head = f"{'':<16}{'tokens':>7}" + "".join(
    f"{h:>8}" if f.startswith("{:>8") else f"{h:>7}" for _, h, f in keys
  )

  def line(label, agg):
    cells = "".join(
      f.format(agg["token_mean"][k]) if k in agg["token_mean"] else " " * 8 for k, _, f in keys
    )
    label += "*" if "measured_on" in agg else ""
    return f"{label:<16}{agg['tokens']:>7}" + cells

  out = [
    f"support overlap: {report['rows_per_domain']} rollouts/domain, "
    f"{report['max_new_tokens']} new tokens, prompts from {report['source']}",
    "token means over student rollouts. Calibrated (1 = student equals teacher, at any "
    "entropy): overlap = 1 - TV, nucleus = student mass on the teacher's top-p nucleus / "
    "the teacher's own; xs-xent = teacher log-loss of student tokens beyond its entropy "
    "(0 = equal).",
    "Detail, entropy- and vocabulary-dependent: logp = teacher log-prob of the sampled "
    "token; topk / top-p = share inside the teacher's top-k / nucleus; off = below the floor "
    "prob; mass@s8 = teacher mass on the student's top-8.",
    "",
    "per teacher",
    head,
  ]
  out += [line(name, t) for name, t in report["teachers"].items()]
  out += ["", "per domain", head]
  out += [line(f"{d} ({agg['teacher']})", agg) for d, agg in report["domains"].items()]
  if any("measured_on" in t for t in report["teachers"].values()):
    out += [
      "",
      "* a teacher of another tokenizer: tokens and every metric but the last two are on the "
      "student tokens whose span is one equal token per side (single = their share of the "
      "student's tokens), the vocabularies coarsened to the matched ids plus one tail bucket; "
      "spanRKL = log q(span) - log p_T(span), each span's share per student token with a span.",
    ]
  out += ["", "reading"]
  for name, t in report["teachers"].items():
    r = t["reading"]
    scope = " (on its single spans)" if "measured_on" in r else ""
    out.append(f"  {name}: {r['verdict']}{scope} — {r['recommendation']}")
  out += ["", "alarms"] + ([f"  WARNING {a}" for a in report["alarms"]] or ["  none"])
  return "\n".join(out)


def plot(report: dict, out_dir: str) -> tuple[str, str]:
  """``teacher_logp_hist.png`` and ``topk_coverage.png`` under ``out_dir``."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  hist_path = os.path.join(out_dir, "teacher_logp_hist.png")
  values = report["_teacher_logp"]
  fig, ax = plt.subplots(figsize=(7, 4))
  finite = [v[np.isfinite(v)] for v in values.values() if v.size]
  lo = min([float(v.min()) for v in finite if v.size] + [-1.0])
  bins = np.linspace(lo, 0.0, 41)
  for name, v in values.items():
    ax.hist(np.clip(v, lo, 0.0), bins=bins, alpha=0.5, label=f"{name} (n={v.size})")
  floor = report["thresholds"].get("floor_prob")
  if floor:
    ax.axvline(math.log(floor), color="red", ls="--", lw=1, label=f"floor log({floor:g})")
  ax.set_xlabel("teacher log-prob of the student's sampled token")
  ax.set_ylabel("tokens")
  ax.set_title("teacher log-prob of student tokens")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(hist_path, dpi=100)
  plt.close(fig)

  cov_path = os.path.join(out_dir, "topk_coverage.png")
  fig, ax = plt.subplots(figsize=(7, 4))
  ks = report["coverage_ks"]
  for name, t in report["teachers"].items():
    ax.plot(ks, [t["coverage_curve"][str(k)] for k in ks], marker="o", label=name)
  ax.set_xscale("log", base=2)
  ax.set_xticks(ks, [str(k) for k in ks])
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("k")
  ax.set_ylabel("share of student tokens in teacher top-k")
  ax.set_title("raw teacher top-k coverage of student tokens (falls with teacher entropy)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(cov_path, dpi=100)
  plt.close(fig)
  return hist_path, cov_path


def run(
  config, *, out_dir: str | None = None, rows_per_domain: int = 16, use_checkpoint: bool = False
) -> dict:
  """The command: measure, write overlap.json + PNGs, print the table. Returns the report."""
  out_dir = out_dir or os.path.join(config.output_dir, "overlap")
  os.makedirs(out_dir, exist_ok=True)
  report = measure(config, rows_per_domain=rows_per_domain, use_checkpoint=use_checkpoint)
  plot(report, out_dir)
  public = {k: v for k, v in report.items() if not k.startswith("_")}
  with open(os.path.join(out_dir, "overlap.json"), "w") as f:
    json.dump(_nan_to_none(public), f, indent=2)
  print(format_table(report), flush=True)
  log.info("wrote %s/overlap.json, teacher_logp_hist.png, topk_coverage.png", out_dir)
  return public


def main(argv):
  del argv
  from absl import flags

  from jdistill import config as config_lib
  from jdistill.runtime import distributed

  fl = flags.FLAGS
  config = fl.config
  try:
    config_lib.validate(config)
  except ValueError as e:
    sys.exit(f"jdistill overlap: bad config: {e}")
  distributed.initialize(config.peer_timeout_s, config.checkpoint.dir)
  run(config, out_dir=fl.out, rows_per_domain=fl.rows_per_domain, use_checkpoint=fl.use_checkpoint)


def cli():
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.", lock_config=True)
  flags.mark_flag_as_required("config")
  flags.DEFINE_string("out", None, "Output directory (default <output_dir>/overlap).")
  flags.DEFINE_integer("rows_per_domain", 16, "Student rollouts per domain.")
  flags.DEFINE_bool(
    "use_checkpoint",
    False,
    "Restore the latest checkpoint of config.checkpoint.dir as the student.",
  )
  app.run(main)

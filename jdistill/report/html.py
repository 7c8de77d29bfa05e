"""The run report: one self-contained HTML file of a run directory (`python -m jdistill report`).

  python -m jdistill report runs/opd            → runs/opd/report.html

No server, no network, no external asset: CSS inline, plots as inline SVG, PNGs of the run dir
as data URIs. Its sections (each a `<section id=...>`):

  curves       learning curves from metrics.jsonl (loss, divergence, per-teacher reverse KL
               and teacher log-prob, RLVR's reward per domain)
  accuracy     held-out accuracy over steps (metrics.jsonl's eval records: per teacher's
               domains in OPD, per domain in RLVR)
  overlap      per-teacher calibrated overlap and nucleus coverage over steps
  samples      the rollouts of samples.jsonl (`jdistill.report.samples`): every token coloured
               by log p_teacher − log q_student (`log_ratio_colour`), marks for tokens outside the
               teacher's nucleus, IcePop-masked and PPO-clipped, environment turns apart; hovering
               a token shows both log-probs and the teacher's top alternatives
  experiment   an experiment directory's answer.md / table.md and its PNG plots

A section without data says what is missing. Every training stage writes the report at its end
(`jdistill.stages.base.run_training`).
"""

from __future__ import annotations

import base64
import glob
import html
import json
import os
import sys

from jdistill.report.samples import read_samples
from jdistill.runtime.run_log import read_records

REPORT = "report.html"
SECTIONS = ("curves", "accuracy", "overlap", "samples", "experiment")
COLOUR_SCALE = 4.0  # nats of |log p_teacher − log q_student| drawn at full colour
NEGATIVE = (214, 39, 40)  # the student likes the token more than the teacher: red
POSITIVE = (31, 119, 180)  # the teacher likes it more than the student: blue
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
MAX_SAMPLE_STEPS = 6  # logging steps shown in the samples section (first, last, evenly between)


def log_ratio_colour(log_ratio: float, scale: float = COLOUR_SCALE) -> str:
  """`log p_teacher − log q_student` of a token → its background, `rgb(r, g, b)`: white at 0,
  `POSITIVE` at ≥ +scale, `NEGATIVE` at ≤ −scale, linear in between."""
  t = max(-1.0, min(1.0, log_ratio / scale))
  end = POSITIVE if t > 0 else NEGATIVE
  r, g, b = (round(255 + (c - 255) * abs(t)) for c in end)
  return f"rgb({r}, {g}, {b})"


# --- plots ------------------------------------------------------------------------------


def svg_chart(title: str, series: dict[str, list[tuple[float, float]]], width=420, height=220):
  """Line chart of `series` ({label: [(step, value), ...]}) as an inline `<svg>`."""
  points = [p for values in series.values() for p in values if p[1] == p[1]]  # drop NaN
  if not points:
    return ""
  x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
  y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
  x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
  left, right, top, bottom = 52, 10, 24, 30
  sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
  sy = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
  parts = [
    f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
    f'xmlns="http://www.w3.org/2000/svg" role="img"><title>{html.escape(title)}</title>',
    f'<text x="{left}" y="14" class="ct">{html.escape(title)}</text>',
    f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" '
    'stroke="#999"/>',
    f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#999"/>',
  ]
  for y in (y0, (y0 + y1) / 2, y1):
    parts.append(
      f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" class="ax" text-anchor="end">{y:.3g}</text>'
    )
  for x in (x0, x1):
    parts.append(
      f'<text x="{sx(x):.1f}" y="{height - 12}" class="ax" text-anchor="middle">{x:g}</text>'
    )
  for i, (label, values) in enumerate(series.items()):
    values = [p for p in values if p[1] == p[1]]
    if not values:
      continue
    colour = PALETTE[i % len(PALETTE)]
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
    parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{path}"/>')
    for x, y in values if len(values) == 1 else ():
      parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>')
    parts.append(
      f'<text x="{width - right - 4}" y="{top + 12 * (i + 1)}" class="ax" text-anchor="end" '
      f'fill="{colour}">{html.escape(label)}</text>'
    )
  parts.append("</svg>")
  return "".join(parts)


def _teacher_series(records: list[dict], key: str) -> dict[str, list[tuple[float, float]]]:
  series: dict[str, list] = {}
  for r in records:
    for name, m in (r.get("teachers") or {}).items():
      if key in m:
        series.setdefault(name, []).append((r["step"], float(m[key])))
  return series


def _scalar_series(records: list[dict], key: str) -> dict[str, list[tuple[float, float]]]:
  values = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
  return {key: values} if values else {}


def _reward_series(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
  """RLVR's mean verifier reward per domain."""
  series: dict[str, list] = {}
  for r in records:
    for domain, m in (r.get("rewards") or {}).get("domains", {}).items():
      series.setdefault(domain, []).append((r["step"], float(m["reward_mean"])))
  return series


def _eval_series(evals: list[dict], key: str) -> dict[str, list[tuple[float, float]]]:
  series: dict[str, list] = {}
  for r in evals:
    for name, m in r["eval"].items():
      if isinstance(m, dict) and key in m:
        series.setdefault(name, []).append((r["step"], float(m[key])))
  return series


def _charts(specs) -> str:
  charts = [svg_chart(title, series) for title, series in specs if series]
  return "".join(charts)


# --- samples ----------------------------------------------------------------------------


def visible(text: str) -> str:
  """A token's text as drawn: control characters as `\\xNN` (newlines and tabs kept)."""
  return "".join(ch if ch.isprintable() or ch in "\n\t" else f"\\x{ord(ch):02x}" for ch in text)


def token_span(token: dict) -> str:
  """One sampled token as a `<span>`: background `log_ratio_colour` of its log-ratio, classes
  for its marks, a title with both log-probs and the teacher's alternatives."""
  ratio = token["teacher_logp"] - token["student_logp"]
  classes = ["tok"] + [
    name
    for name, key in (("nuc", "outside_nucleus"), ("ice", "icepop_masked"), ("clip", "clipped"))
    if token.get(key)
  ]
  alternatives = ", ".join(f"{t!r} {lp:.2f}" for t, lp in token.get("top", []))
  marks = [
    what
    for key, what in (
      ("outside_nucleus", "outside the teacher's nucleus"),
      ("icepop_masked", "IcePop-masked"),
      ("clipped", "PPO-clipped"),
      ("environment", "environment token"),
    )
    if token.get(key)
  ]
  tip = (
    f"{token['text']!r}  log p_teacher {token['teacher_logp']:.3f}  "
    f"log q_student {token['student_logp']:.3f}  (diff {ratio:+.3f})"
    + (f"\n{'; '.join(marks)}" if marks else "")
    + (f"\nteacher top: {alternatives}" if alternatives else "")
  )
  text = html.escape(visible(token["text"]))
  return (
    f'<span class="{" ".join(classes)}" style="background:{log_ratio_colour(ratio)}" '
    f'data-log-ratio="{ratio:.4f}" title="{html.escape(tip)}">{text}</span>'
  )


def rollout_html(record: dict) -> str:
  """A recorded rollout: its prompt, then its turns, the model's and the environment's apart."""
  turns: list[tuple[bool, list[dict]]] = []  # (environment?, tokens)
  for token in record["tokens"]:
    env = bool(token.get("environment"))
    if not turns or turns[-1][0] != env:
      turns.append((env, []))
    turns[-1][1].append(token)
  body = "".join(
    f'<div class="{"env" if env else "model"}"><span class="who">'
    f"{'environment' if env else 'student'}</span>{''.join(token_span(t) for t in tokens)}</div>"
    for env, tokens in turns
  )
  return (
    f'<div class="rollout"><div class="meta">teacher <b>{html.escape(record["teacher"])}</b>, '
    f'row {record["row"]}</div><pre class="prompt">{html.escape(record["prompt"])}</pre>{body}'
    "</div>"
  )


def _chosen_steps(steps: list[int]) -> list[int]:
  if len(steps) <= MAX_SAMPLE_STEPS:
    return steps
  n = MAX_SAMPLE_STEPS - 1
  return sorted({steps[round(i * (len(steps) - 1) / n)] for i in range(n + 1)})


def samples_html(samples: list[dict]) -> str:
  steps = sorted({r["step"] for r in samples})
  chosen = _chosen_steps(steps)
  parts = [
    '<p class="legend">Background: log p<sub>teacher</sub> − log q<sub>student</sub> of each '
    f'token (<span class="sw" style="background:{log_ratio_colour(-COLOUR_SCALE)}">student '
    f"favours, −{COLOUR_SCALE:g}</span> … white 0 … "
    f'<span class="sw" style="background:{log_ratio_colour(COLOUR_SCALE)}">teacher favours, '
    f'+{COLOUR_SCALE:g}</span> nats). <span class="tok nuc">outside the teacher\'s nucleus'
    '</span> <span class="tok ice">IcePop-masked</span> <span class="tok clip">PPO-clipped</span>'
    ' <span class="env inline">environment</span>. Hover a token for both log-probs and the '
    f"teacher's top alternatives. Steps shown: {', '.join(map(str, chosen))} of "
    f"{len(steps)} recorded.</p>"
  ]
  for step in chosen:
    rows = [r for r in samples if r["step"] == step]
    opened = " open" if step == chosen[-1] else ""
    parts.append(f"<details{opened}><summary>step {step}</summary>")
    parts += [rollout_html(r) for r in rows]
    parts.append("</details>")
  return "".join(parts)


# --- the page ---------------------------------------------------------------------------


def _section(key: str, title: str, body: str, missing: str) -> str:
  body = body or f'<p class="none">{html.escape(missing)}</p>'
  return f'<section id="{key}"><h2>{html.escape(title)}</h2>{body}</section>'


def _experiment_html(run_dir: str) -> str:
  parts = []
  for name in ("answer.md", "table.md"):
    path = os.path.join(run_dir, name)
    if os.path.exists(path):
      with open(path) as f:
        parts.append(f'<h3>{name}</h3><pre class="md">{html.escape(f.read())}</pre>')
  if not parts:
    return ""
  for path in sorted(glob.glob(os.path.join(run_dir, "*.png"))):
    with open(path, "rb") as f:
      data = base64.b64encode(f.read()).decode()
    parts.append(
      f'<figure><img alt="{html.escape(os.path.basename(path))}" '
      f'src="data:image/png;base64,{data}"><figcaption>{html.escape(os.path.basename(path))}'
      "</figcaption></figure>"
    )
  return "".join(parts)


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222}
h1{font-size:1.4em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}
.chart{margin:.3em;border:1px solid #eee}.ct{font-size:13px;font-weight:600}.ax{font-size:10px}
.rollout{border:1px solid #ddd;border-radius:4px;margin:.6em 0;padding:.5em}
.meta{font-size:12px;color:#555}.prompt{color:#777;white-space:pre-wrap;margin:.2em 0}
.model,.env{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.9;padding:.2em}
.env{background:#eee;border-left:3px solid #888;margin:.3em 0 .3em 1.5em;color:#444}
.env.inline{display:inline;margin:0;padding:0 .3em}
.who{font:10px system-ui;color:#888;margin-right:.5em;text-transform:uppercase}
.tok{border-radius:2px;padding:0 1px}.tok.nuc{border-bottom:2px dashed #000}
.tok.ice{text-decoration:line-through}.tok.clip{outline:1px solid #9467bd}
.sw{padding:0 .3em}.none{color:#888;font-style:italic}
.md{background:#f7f7f7;padding:.5em;white-space:pre-wrap}
figure img{max-width:100%}
"""


def render(run_dir: str) -> str:
  """The report of `run_dir` as one HTML string."""
  records = read_records(os.path.join(run_dir, "metrics.jsonl"))
  train = [r for r in records if "eval" not in r]
  evals = [r for r in records if "eval" in r]
  samples = read_samples(run_dir)
  identity = {}
  if os.path.exists(os.path.join(run_dir, "run.json")):
    with open(os.path.join(run_dir, "run.json")) as f:
      identity = json.load(f)
  config = identity.get("config", {})
  curves = _charts(
    [
      ("objective (loss)", _scalar_series(train, "loss")),
      ("divergence (weighted full-vocab reverse KL)", _scalar_series(train, "divergence")),
      ("reverse KL per teacher", _teacher_series(train, "reverse_kl")),
      ("teacher log-prob of sampled tokens", _teacher_series(train, "teacher_logp")),
      ("eval: reverse KL per teacher", _eval_series(evals, "reverse_kl")),
      ("RLVR: mean verifier reward per domain", _reward_series(train)),
    ]
  )
  accuracy = _charts(
    [("eval: accuracy (OPD: per teacher's domains)", _eval_series(evals, "accuracy"))]
  )
  overlap = _charts(
    [
      ("overlap (1 − TV) per teacher", _teacher_series(train, "overlap")),
      ("nucleus coverage per teacher", _teacher_series(train, "nucleus_coverage")),
    ]
  )
  title = f"jdistill report: {os.path.abspath(run_dir)}"
  head = (
    f"<p>stage <b>{html.escape(str(config.get('stage', '?')))}</b>, config hash "
    f"<code>{html.escape(str(identity.get('config_hash', '?')))}</code>, "
    f"{len(train)} training records, {len(evals)} evals, {len(samples)} sampled rollouts.</p>"
  )
  body = "".join(
    [
      _section("curves", "Learning curves", curves, "no training records in metrics.jsonl"),
      _section(
        "accuracy", "Accuracy per domain", accuracy,
        "no accuracy logged (needs eval.verifier or an environment, and train.eval_every)",
      ),
      _section("overlap", "Overlap per teacher", overlap, "no overlap metrics logged"),
      _section(
        "samples", "Sampled rollouts", samples_html(samples) if samples else "",
        "no samples.jsonl (OPD records it on logging steps when train.sample_rows > 0)",
      ),
      _section("experiment", "Experiment", _experiment_html(run_dir), "not an experiment run"),
    ]
  )  # fmt: skip
  return (
    f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}'
    f"</title><style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{head}{body}"
    "</body></html>\n"
  )


def write_report(run_dir: str, path: str | None = None) -> str:
  """Writes `render(run_dir)` to `path` (default `<run_dir>/report.html`); returns the path."""
  from jdistill.runtime.io import atomic_write

  path = path or os.path.join(run_dir, REPORT)
  with atomic_write(path) as f:
    f.write(render(run_dir))
  return path


def cli() -> None:
  """`python -m jdistill report RUN_DIR [OUT.html]`."""
  args = sys.argv[1:]
  if len(args) not in (1, 2) or args[0] in ("-h", "--help"):
    sys.exit("usage: jdistill report RUN_DIR [OUT.html]   (default OUT: RUN_DIR/report.html)")
  if not os.path.isdir(args[0]):
    sys.exit(f"jdistill report: {args[0]}: no such run directory")
  print(write_report(args[0], args[1] if len(args) == 2 else None))

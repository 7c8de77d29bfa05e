"""The model card of an exported student: `README.md` in the export folder.

It says how the model was made and what was measured: the recipe (stage, loss per teacher,
optimizer, sampling), the teachers, the data, the steps trained, the last held-out evaluation
(accuracy and reverse KL per teacher) and the last logged overlap per teacher, each with where
in the run directory it comes from, and the command that reproduces the run. Written by
`TrainingStage.export` (`jdistill.stages.base`).
"""

from __future__ import annotations

import os
import shlex
import sys

from jdistill.runtime.run_log import read_records

CARD = "README.md"


def reproduce_command(argv: list[str] | None = None) -> str:
  """The command line that ran this process, as `python -m jdistill ...` when it was the
  command line (`jdistill.cli` names its `argv[0]` `jdistill <command>`), else as run."""
  argv = list(sys.argv if argv is None else argv)
  if argv and argv[0].startswith("jdistill "):
    return shlex.join(["python", "-m", *argv[0].split(" "), *argv[1:]])
  return shlex.join(["python", *argv])


def _table(header: list[str], rows: list[list]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return lines


def _fmt(x) -> str:
  return f"{x:.4f}" if isinstance(x, float) else ("—" if x is None else str(x))


def model_card(config, *, step: int, config_hash: str, command: str | None = None) -> str:
  """The card's markdown for a student trained by `config` to `step` (the numbers are read from
  `config.output_dir`'s metrics.jsonl)."""
  c = config
  run_dir = c.output_dir
  records = read_records(os.path.join(run_dir, "metrics.jsonl"))
  train = [r for r in records if "eval" not in r]
  evals = [r for r in records if "eval" in r]
  names = sorted(c.teachers.keys()) if "teachers" in c else []
  lines = [
    f"# jdistill student ({c.stage})",
    "",
    f"Trained by jdistill's `{c.stage}` stage for {step} steps from `{c.student.path}` "
    f"(config hash `{config_hash}`; the whole config is in `{os.path.join(run_dir, 'run.json')}`).",
    "",
    "## Recipe",
    "",
    f"- stage: `{c.stage}`, steps: {c.train.steps} (trained: {step}), seed {c.seed}",
    f"- optimizer: lr {c.optimizer.lr:g}, schedule `{c.optimizer.schedule}`, warmup "
    f"{c.optimizer.warmup_steps} steps",
    f"- rollouts: {c.data.slots_per_teacher} rows per teacher, {c.sampling.max_new_tokens} new "
    f"tokens, temperature {c.sampling.temperature:g}",
    "",
    "## Teachers",
    "",
  ]
  if names:
    lines += _table(
      ["teacher", "path", "domains", "loss", "weight"],
      [
        [n, f"`{c.teachers[n].path}`", c.teachers[n].domains or "—",
         c.teachers[n].loss, f"{c.teachers[n].weight:g}"]
        for n in names
      ],
    )  # fmt: skip
  else:
    lines.append("none")
  data = [("train", c.data.train_files), ("held-out", c.data.eval_files)]
  if c.stage == "sft":
    data.append(("SFT completions", c.sft.train_files))
  lines += ["", "## Data", ""]
  lines += [f"- {what}: `{files}`" for what, files in data if files]
  lines += ["", "## Measured", ""]
  if evals:
    last = evals[-1]
    keys = sorted({k for m in last["eval"].values() if isinstance(m, dict) for k in m})
    keys = [k for k in ("accuracy", "reverse_kl", "teacher_logp") if k in keys]
    lines.append(f"Held-out evaluation at step {last['step']} (`metrics.jsonl`, its eval records):")
    lines.append("")
    lines += _table(
      ["teacher", *keys],
      [
        [n, *(_fmt(m.get(k)) for k in keys)] for n, m in last["eval"].items() if isinstance(m, dict)
      ],
    )
  else:
    lines.append("No held-out evaluation was logged (`train.eval_every`).")
  logged = [r for r in train if r.get("teachers")]
  if logged:
    last = logged[-1]
    lines += [
      "",
      f"Support overlap at step {last['step']} (`metrics.jsonl`, training records):",
      "",
    ]
    keys = ["overlap", "nucleus_coverage", "reverse_kl"]
    lines += _table(
      ["teacher", *keys],
      [[n, *(_fmt(m.get(k)) for k in keys)] for n, m in last["teachers"].items()],
    )
  lines += [
    "",
    f"Learning curves, samples and the rest: `{os.path.join(run_dir, 'report.html')}` "
    f"(`python -m jdistill report {run_dir}`).",
    "",
    "## Reproduce",
    "",
    "```",
    command or reproduce_command(),
    "```",
    "",
  ]
  return "\n".join(lines)


def write_model_card(out_dir: str, config, **kwargs) -> str:
  """Writes `model_card(config, **kwargs)` to `<out_dir>/README.md`; returns its path."""
  from jdistill.runtime.io import atomic_write

  path = os.path.join(out_dir, CARD)
  with atomic_write(path) as f:
    f.write(model_card(config, **kwargs))
  return path

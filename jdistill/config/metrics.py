"""What a run measures besides its loss: eval (verifier accuracy) and overlap (support metrics)."""

from __future__ import annotations

from jdistill.config.fields import fail, field, section

VERIFIERS = "`exact_match`, `numeric`, `boxed`, `regex:<pattern>`, `module:function`"

EVAL = section(
  "eval",
  verifier=field(
    "",
    "when set, the OPD eval adds each teacher's greedy exact-match `accuracy` over its "
    "domains on `data.eval_files` (whose records need an `answer`)",
    f"{VERIFIERS} (e.g. `jdistill.experiments.tasks:verify`) or empty",
  ),
  pass_k=field(
    0,
    "with `eval.verifier`: also `pass@k`, the share of prompts where one of k samples at "
    "temperature 1 is right",
    "an int ≥ 0",
  ),
)

OVERLAP = section(
  "overlap",
  topks=field(
    (1, 8, 32),
    "k of the `in_teacher_top{k}` and `teacher_mass_on_student_top{k}` metrics",
    "a non-empty tuple of positive ints",
  ),
  top_p=field(0.9, "nucleus of the `in_teacher_top_p` metric", "a probability in (0, 1]"),
  floor_prob=field(
    1e-3, "teacher probability floor of the `off_support` metric", "a probability in (0, 1]"
  ),
  min_overlap=field(
    0.5,
    "alarm (and off-support reading) when the overlap coefficient Σ min(p_s, p_t) = 1 − TV "
    "falls below this (calibrated: 1 when student = teacher)",
    "a number in [0, 1]",
  ),
  min_nucleus_coverage=field(
    0.5,
    "alarm (and off-support reading) when nucleus coverage min(1, Q(N)/P(N)) falls below this "
    "(calibrated)",
    "a number in [0, 1]",
  ),
  on_support_overlap=field(0.8, "on-support reading needs overlap ≥ this", "a number in [0, 1]"),
  on_support_nucleus_coverage=field(
    0.9, "on-support reading needs nucleus coverage ≥ this", "a number in [0, 1]"
  ),
)


def check_verifier(field_name: str, name: str) -> None:
  from jdistill.eval import verifiers

  try:
    verifiers.get(name)
  except ValueError as e:
    fail(field_name, name, str(e))


def validate(config) -> None:
  if config.eval.verifier:
    check_verifier("eval.verifier", config.eval.verifier)
  if not (isinstance(config.eval.pass_k, int) and config.eval.pass_k >= 0):
    fail("eval.pass_k", config.eval.pass_k, "an integer >= 0")
  topks = tuple(config.overlap.topks)
  if not topks or any(not isinstance(k, int) or k <= 0 for k in topks):
    fail("overlap.topks", topks, "a non-empty tuple of positive integers")
  for name in ("floor_prob", "top_p"):
    if not 0.0 < config.overlap[name] <= 1.0:
      fail(f"overlap.{name}", config.overlap[name], "a probability in (0, 1]")
  for name in (
    "min_overlap",
    "min_nucleus_coverage",
    "on_support_overlap",
    "on_support_nucleus_coverage",
  ):
    value = config.overlap[name]
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
      fail(f"overlap.{name}", value, "a number in [0, 1]")

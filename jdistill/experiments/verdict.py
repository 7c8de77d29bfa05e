"""The verdict of issue 22, computed: each claim of answer.md from per-seed results.

Results format: a list of cells, one dict per (dial setting, recipe, seed):

  alpha               the dial: share of external-style data in the teachers' training
                      (None for a teacher set off the dial, e.g. other-init teachers)
  setting             optional name of the setting (e.g. "foreign"); default: alpha, else
                      overlap (`budget.setting_of`)
  overlap             measured calibrated overlap (1 - TV) of the *starting* student's rollouts
                      with the teacher set, before any stage: the dial's x-axis (a setting's
                      overlap is the mean over its cells)
  loss                the OPD loss: reverse_kl | forward_kl | sampled_token | topk_teacher | ...
  rl                  student RL: none | rlvr (GRPO before OPD, Ultra) | unified (reward +
                      distillation advantage)
  warmup              none | sft
  seed                int
  accuracy            {domain: held-out greedy accuracy after OPD, ..., "mean": their mean}
  overlap_before      teachers' mean calibrated overlap with the student's rollouts at the start
                      of OPD (after RL and warmup: with rl=rlvr, warmup=none it is the overlap
                      after RLVR)
  overlap_after       the same at the end of OPD
  rl_student_tokens   student tokens sampled in RL (0 without RL)
  opd_student_tokens  student tokens sampled in OPD
  student_tokens      their sum (the budget, `jdistill.experiments.budget`)
  teacher_tokens      tokens scored by the teachers
  wall_s              the cell's wall time

Statistics: a 95% Student-t interval over seeds. A difference between two arms is paired by
seed: for each seed, the mean over the strata (setting, and the recipe fields not compared)
that both arms ran of (arm a - arm b), then the interval of those per-seed differences. With
no seed in common it falls back to Welch's unpaired interval of the arms' per-seed means. One
seed gives an infinite interval, so a one-seed claim is always inconclusive.

Regimes: a setting is *high overlap* when its mean `overlap` >= `high` (0.8), *low overlap*
when <= `low` (0.5); settings between are in neither. A claim pools every cell of its regime.

Decisions (`decide`), with d the difference the claim names and [lo, hi] its interval:

  greater   (d > 0)              supported: lo > 0;        refuted: hi < 0
  less      (d < 0)              supported: hi < 0;        refuted: lo > 0
  not_less  (d >= 0, "matches")  supported: lo > -margin;  refuted: hi < -margin
  not_more  ("adds nothing")     supported: hi < margin;   refuted: lo > margin

else inconclusive. `not_less` and `not_more` are one-sided equivalence (non-inferiority)
tests with `margin` (default 0.05 accuracy) in the claim's units: "full-vocab >= sampled-token"
holds when full-vocab is at most `margin` worse with 95% confidence; "RL adds nothing" when RL
adds less than `margin`; "no-RL matches RL" when no-RL is at most `margin` worse. Claims about
student RL (5, 6, 7) are inconclusive when `budget.check_equal_budget` flags a setting they use.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import numpy as np
from scipy import stats

from jdistill.experiments import budget

SUPPORTED, REFUTED, INCONCLUSIVE = "supported", "refuted", "inconclusive"
FLOOR = "matched at the floor (both arms end below where they started)"
DIRECTIONS = ("greater", "less", "not_less", "not_more")


@dataclasses.dataclass(frozen=True)
class Params:
  """What the verdict depends on besides the results."""

  high: float = 0.8  # a setting with overlap >= high is high-overlap
  low: float = 0.5  # ... <= low is low-overlap
  margin: float = 0.05  # equivalence margin of the not_less / not_more claims
  level: float = 0.95
  full_vocab: str = "reverse_kl"
  sampled: str = "sampled_token"
  rl_arm: str = "rlvr"  # the RL recipe the claims compare with rl="none"
  budget_tolerance: float = 0.05


@dataclasses.dataclass(frozen=True)
class Interval:
  mean: float
  lo: float
  hi: float
  n: int

  def __str__(self) -> str:
    return f"{self.mean:+.3f} [{self.lo:+.3f}, {self.hi:+.3f}] (n={self.n})"


def mean_interval(values, level: float = 0.95) -> Interval:
  """Mean of `values` and its Student-t interval; infinite with fewer than two values."""
  x = np.asarray(values, dtype=float)
  n = len(x)
  if n == 0:
    return Interval(math.nan, -math.inf, math.inf, 0)
  m = float(x.mean())
  if n == 1:
    return Interval(m, -math.inf, math.inf, 1)
  half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
  return Interval(m, m - half, m + half, n)


def difference_interval(a, b, paired: bool, level: float = 0.95) -> Interval:
  """Interval of mean(a) - mean(b): paired (a[i] with b[i], the same seed) or Welch's."""
  a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
  if paired:
    if len(a) != len(b):
      raise ValueError(f"paired difference of {len(a)} and {len(b)} values")
    return mean_interval(a - b, level)
  n = min(len(a), len(b))
  if len(a) < 2 or len(b) < 2:
    m = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    return Interval(m, -math.inf, math.inf, n)
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  m = float(a.mean() - b.mean())
  se = math.sqrt(va + vb)
  if se == 0:
    return Interval(m, m, m, n)
  df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
  half = float(stats.t.ppf(0.5 + level / 2, df) * se)
  return Interval(m, m - half, m + half, n)


def decide(interval: Interval, direction: str, margin: float = 0.0) -> str:
  """supported / refuted / inconclusive for the difference `interval` (module docstring)."""
  lo, hi = interval.lo, interval.hi
  if direction == "greater":
    return SUPPORTED if lo > 0 else REFUTED if hi < 0 else INCONCLUSIVE
  if direction == "less":
    return SUPPORTED if hi < 0 else REFUTED if lo > 0 else INCONCLUSIVE
  if direction == "not_less":
    return SUPPORTED if lo > -margin else REFUTED if hi < -margin else INCONCLUSIVE
  if direction == "not_more":
    return SUPPORTED if hi < margin else REFUTED if lo > margin else INCONCLUSIVE
  raise ValueError(f"direction={direction!r}; allowed: {list(DIRECTIONS)}")


def value(cell: dict, field: str) -> float:
  """`accuracy` (the mean over domains), `accuracy.<domain>`, or a top-level number."""
  if field == "accuracy":
    acc = cell["accuracy"]
    return float(acc["mean"] if "mean" in acc else np.mean(list(acc.values())))
  if field.startswith("accuracy."):
    return float(cell["accuracy"][field.split(".", 1)[1]])
  return float(cell[field])


def setting_overlaps(cells: list[dict]) -> dict:
  """Each dial setting's measured overlap (the mean over its cells)."""
  by = defaultdict(list)
  for c in cells:
    by[budget.setting_of(c)].append(c["overlap"])
  return {s: float(np.mean(v)) for s, v in by.items()}


def regime(cells: list[dict], name: str, p: Params) -> list[dict]:
  """The cells of the high- or low-overlap settings."""
  overlaps = setting_overlaps(cells)
  keep = (lambda o: o >= p.high) if name == "high" else (lambda o: o <= p.low)
  return [c for c in cells if keep(overlaps[budget.setting_of(c)])]


RECIPE = ("loss", "rl", "warmup")
REQUIRED = ("overlap", *RECIPE, "seed", "accuracy", "overlap_before")


def check_cells(cells: list[dict]) -> None:
  """Raises ValueError naming the first cell that lacks a field the claims read."""
  for i, c in enumerate(cells):
    missing = [f for f in REQUIRED if f not in c]
    if missing:
      raise ValueError(f"results cell {i} ({_name(c)}) lacks {missing}; see verdict.py's format")


def _name(c: dict) -> str:
  return ", ".join(f"{f}={c[f]!r}" for f in ("alpha", "setting", *RECIPE, "seed") if f in c)


def compare(cells, field: str, factor: str, a: str, b: str, level: float = 0.95) -> Interval:
  """Interval of (arm factor=a) - (arm factor=b) of `field`, paired by seed over the strata
  both arms ran (module docstring); Welch's over per-seed arm means when no seed pairs."""
  strata = [f for f in RECIPE if f != factor]
  arms = {a: defaultdict(lambda: defaultdict(list)), b: defaultdict(lambda: defaultdict(list))}
  for c in cells:
    if c[factor] in arms:
      key = (budget.setting_of(c), *(c[f] for f in strata))
      arms[c[factor]][c["seed"]][key].append(value(c, field))
  diffs = []
  for seed in sorted(set(arms[a]) & set(arms[b])):
    common = set(arms[a][seed]) & set(arms[b][seed])
    if common:
      diffs.append(np.mean([np.mean(arms[a][seed][k]) - np.mean(arms[b][seed][k]) for k in common]))
  if diffs:
    return mean_interval(diffs, level)

  def seed_means(arm):
    return [np.mean([v for vs in arm[s].values() for v in vs]) for s in sorted(arm)]

  return difference_interval(seed_means(arms[a]), seed_means(arms[b]), False, level)


@dataclasses.dataclass
class Verdict:
  claim: int
  text: str
  verdict: str
  numbers: dict  # name -> Interval or a plain number
  note: str = ""

  def lines(self, label: str = "") -> list[str]:
    out = [f"{self.claim}{label}. **{self.text}**: {self.verdict.upper()}"]
    out += [f"   - {name}: {v}" for name, v in self.numbers.items()]
    if self.note:
      out.append(f"   - {self.note}")
    return out


def _budget_note(cells, p: Params) -> str:
  flags = budget.check_equal_budget(cells, p.budget_tolerance)
  if not flags:
    return ""
  where = ", ".join(f"{f['setting']} ({f['min']}..{f['max']} tokens)" for f in flags)
  return f"budgets differ by more than {p.budget_tolerance:.0%} at {where}"


def _rl_cells(cells, p: Params) -> list[dict]:
  return [c for c in cells if c["rl"] in ("none", p.rl_arm)]


def _equal_budget(v: Verdict, cells, p: Params) -> Verdict:
  note = _budget_note(_rl_cells(cells, p), p)
  if note:
    v.verdict, v.note = INCONCLUSIVE, note + ": not an equal-budget comparison"
  return v


def claim_warmup_overlap(cells, p: Params = Params()) -> Verdict:
  """1: at low overlap, warmup SFT raises the teachers' overlap with the student's rollouts
  at the start of OPD (overlap_before, sft - none)."""
  d = compare(regime(cells, "low", p), "overlap_before", "warmup", "sft", "none", p.level)
  text = "warmup SFT raises overlap with external-data teachers"
  return Verdict(1, text, decide(d, "greater"), {"overlap_before, sft - none (low)": d})


def claim_warmup_accuracy(cells, p: Params = Params()) -> Verdict:
  """2: at low overlap, warmup SFT raises the accuracy after OPD (sft - none)."""
  d = compare(regime(cells, "low", p), "accuracy", "warmup", "sft", "none", p.level)
  text = "warmup SFT raises the accuracy after OPD (external-data teachers)"
  return Verdict(2, text, decide(d, "greater"), {"accuracy, sft - none (low)": d})


def claim_full_vocab_high(cells, p: Params = Params()) -> Verdict:
  """3: at high overlap, full-vocab is at least as accurate as sampled-token (not_less)."""
  d = compare(regime(cells, "high", p), "accuracy", "loss", p.full_vocab, p.sampled, p.level)
  text = f"full-vocab >= sampled-token at high overlap (margin {p.margin})"
  name = f"accuracy, {p.full_vocab} - {p.sampled} (high)"
  return Verdict(3, text, decide(d, "not_less", p.margin), {name: d})


def per_setting(cells, field, factor, a, b, p: Params) -> list[tuple[float, Interval]]:
  """(setting overlap, interval of a - b) per dial setting, by falling overlap."""
  return [(o, d) for o, d, _ in _per_setting(cells, field, factor, a, b, p)]


def _per_setting(cells, field, factor, a, b, p: Params) -> list[tuple]:
  out = []
  for s, o in sorted(setting_overlaps(cells).items(), key=lambda kv: -kv[1]):
    group = [c for c in cells if budget.setting_of(c) == s]
    d = compare(group, field, factor, a, b, p.level)
    if d.n:
      out.append((o, d, group))
  return out


def crossover(points: list[tuple[float, Interval]]) -> float | None:
  """The overlap where the mean difference changes sign (linear between the two settings
  around it; the highest such overlap), or None."""
  pts = sorted(points, key=lambda x: -x[0])
  for (o1, d1), (o2, d2) in zip(pts, pts[1:]):
    if d1.mean == 0:
      return o1
    if d1.mean * d2.mean < 0:
      return o1 + (o2 - o1) * d1.mean / (d1.mean - d2.mean)
  return None


def claim_full_vocab_low(cells, p: Params = Params()) -> Verdict:
  """4: at low overlap, full-vocab is less accurate than sampled-token; and the crossover
  overlap where (full-vocab - sampled-token) changes sign."""
  d = compare(regime(cells, "low", p), "accuracy", "loss", p.full_vocab, p.sampled, p.level)
  points = per_setting(cells, "accuracy", "loss", p.full_vocab, p.sampled, p)
  x = crossover(points)
  numbers = {f"accuracy, {p.full_vocab} - {p.sampled} (low)": d}
  numbers.update({f"at overlap {o:.2f}": i for o, i in points})
  numbers["crossover overlap"] = "none on the dial" if x is None else f"{x:.2f}"
  text = "full-vocab < sampled-token at low overlap (and where the crossover lies)"
  return Verdict(4, text, decide(d, "less"), numbers)


def claim_rl_high(cells, p: Params = Params()) -> Verdict:
  """5: at high overlap, student RL adds nothing at equal budget (rl - none, not_more)."""
  high = regime(cells, "high", p)
  d = compare(high, "accuracy", "rl", p.rl_arm, "none", p.level)
  text = f"at high overlap, student RL adds nothing at equal budget (margin {p.margin})"
  v = Verdict(5, text, decide(d, "not_more", p.margin), {f"accuracy, {p.rl_arm} - none": d})
  return _equal_budget(v, high, p)


def claim_rl_low(cells, p: Params = Params()) -> Verdict:
  """6: at low overlap, RLVR before OPD raises accuracy (rl - none) *and* the overlap with
  the teachers measured after RLVR (overlap_before of the warmup=none cells): supported when
  both are, refuted when either is."""
  low = regime(cells, "low", p)
  acc = compare(low, "accuracy", "rl", p.rl_arm, "none", p.level)
  cold = [c for c in low if c["warmup"] == "none"]
  ovl = compare(cold, "overlap_before", "rl", p.rl_arm, "none", p.level)
  both = decide(acc, "greater"), decide(ovl, "greater")
  verdict = (
    SUPPORTED if both == (SUPPORTED, SUPPORTED) else REFUTED if REFUTED in both else INCONCLUSIVE
  )
  numbers = {
    f"accuracy, {p.rl_arm} - none (low)": acc,
    f"overlap after RL, {p.rl_arm} - none (low, no warmup)": ovl,
  }
  text = "at low overlap, RLVR before OPD helps and moves rollouts toward teacher support"
  return _equal_budget(Verdict(6, text, verdict, numbers), low, p)


def engineered(cells, p: Params) -> list[dict]:
  """Cells whose overlap was engineered: high-overlap settings (lineage teachers) and warmup."""
  high = {id(c) for c in regime(cells, "high", p)}
  return [c for c in cells if id(c) in high or c["warmup"] == "sft"]


def claim_engineered_matches(cells, p: Params = Params()) -> Verdict:
  """7: with engineered overlap the no-RL recipe matches the RL recipe at equal budget
  (none - rl, not_less)."""
  cells_e = engineered(cells, p)
  d = compare(cells_e, "accuracy", "rl", "none", p.rl_arm, p.level)
  text = (
    "engineered overlap (lineage teachers or warmup) lets no-RL match RL at equal budget "
    f"(margin {p.margin})"
  )
  v = Verdict(7, text, decide(d, "not_less", p.margin), {f"accuracy, none - {p.rl_arm}": d})
  return _equal_budget(v, cells_e, p)


CLAIMS = (
  claim_warmup_overlap,
  claim_warmup_accuracy,
  claim_full_vocab_high,
  claim_full_vocab_low,
  claim_rl_high,
  claim_rl_low,
  claim_engineered_matches,
)


def verdicts(cells: list[dict], p: Params = Params()) -> list[Verdict]:
  check_cells(cells)
  return [claim(cells, p) for claim in CLAIMS]


def matching_settings(cells, p: Params = Params()) -> list[tuple[float, Interval, str]]:
  """Per dial setting (by falling overlap): (overlap, interval of no-RL - RL accuracy, its
  not_less decision), skipping settings whose budgets differ. A match where both arms end at
  or below the accuracy they started from (`accuracy_before`, when the cells record it) is
  FLOOR: neither recipe taught anything there, so matching says nothing about RL."""
  out = []
  for o, d, group in _per_setting(_rl_cells(cells, p), "accuracy", "rl", "none", p.rl_arm, p):
    unequal = budget.check_equal_budget(group, p.budget_tolerance)
    decision = INCONCLUSIVE if unequal else decide(d, "not_less", p.margin)
    if decision == SUPPORTED and _at_floor(group, p):
      decision = FLOOR
    out.append((o, d, decision))
  return out


def _at_floor(group: list[dict], p: Params) -> bool:
  """Both arms' mean accuracy at or below the no-RL arm's starting accuracy."""
  start = [c["accuracy_before"]["mean"] for c in group
           if c["rl"] == "none" and "accuracy_before" in c]  # fmt: skip
  if not start:
    return False
  arms = [[value(c, "accuracy") for c in group if c["rl"] == arm] for arm in ("none", p.rl_arm)]
  return all(a and np.mean(a) <= np.mean(start) for a in arms)


def headline(cells, p: Params = Params()) -> str:
  """At which measured overlap, if any, the recipe without student RL matches the one with
  it (no-RL at most `margin` worse, 95% interval, equal budget)."""
  rows = matching_settings(cells, p)
  matched = [o for o, _, v in rows if v == SUPPORTED]
  if not rows:
    return "No dial setting ran both the recipe without student RL and the one with it."
  if not matched:
    return (
      f"At no overlap tested ({', '.join(f'{o:.2f}' for o, _, _ in rows)}) is the recipe "
      f"without student RL shown to match the one with it ({p.rl_arm}) within {p.margin}."
    )
  lowest = len(rows)
  for k, (_, _, v) in enumerate(rows):  # rows by falling overlap: the unbroken run from the top
    if v != SUPPORTED:
      lowest = k
      break
  run = f"; at every setting from overlap {rows[lowest - 1][0]:.2f} up" if lowest else ""
  return (
    f"The recipe without student RL matches the one with it ({p.rl_arm}, equal budget, within "
    f"{p.margin}) at overlap {', '.join(f'{o:.2f}' for o in matched)}{run}."
  )


OTHER_RL_ARMS = ("unified",)  # compared with no RL as the claims compare rl_arm
OTHER_LOSSES = ("forward_kl", "topk_teacher", "sampled_token_baseline")


def rl_arm_lines(cells, arm: str, p: Params = Params()) -> list[str]:
  """answer.md's section on another RL arm: the headline, each setting, and claims 5 and 7
  with `arm` in place of `p.rl_arm` (labelled `5u.`, `7u.`); [] when no cell ran it."""
  if not any(c["rl"] == arm for c in cells):
    return []
  q = dataclasses.replace(p, rl_arm=arm)
  lines = [f"## Against the {arm} arm", "", headline(cells, q), ""]
  for o, d, v in matching_settings(cells, q):
    lines.append(f"- overlap {o:.2f}: no-RL - {arm} accuracy {d}: {v}")
  lines.append("")
  for claim in (claim_rl_high, claim_engineered_matches):
    lines += claim(cells, q).lines(label=arm[0])
  return lines + [""]


def loss_lines(cells, p: Params = Params(), others=OTHER_LOSSES) -> list[str]:
  """answer.md's section on the losses the claims do not name: (loss − full-vocab) accuracy
  per setting without RL or warmup, and whether it is higher, lower or not shown to differ:
  the KL direction (forward_kl), truncation (topk_teacher), a baseline (sampled_token_baseline)."""
  cold = [c for c in cells if c["rl"] == "none" and c["warmup"] == "none"]
  lines = []
  for loss in others:
    for o, d in per_setting(cold, "accuracy", "loss", loss, p.full_vocab, p):
      word = "higher" if d.lo > 0 else "lower" if d.hi < 0 else "no difference shown"
      lines.append(f"- {loss} - {p.full_vocab} at overlap {o:.2f}: {d}: {word}")
  if not lines:
    return []
  head = f"## Other losses against {p.full_vocab} (no RL, no warmup; accuracy)"
  return [head, "", *lines, ""]


def answer(cells: list[dict], p: Params = Params()) -> str:
  check_cells(cells)
  lines = ["# Can engineered support overlap replace student RL?", "", headline(cells, p), ""]
  for o, d, v in matching_settings(cells, p):
    lines.append(f"- overlap {o:.2f}: no-RL - {p.rl_arm} accuracy {d}: {v}")
  lines += ["", "## Claims", ""]
  for v in verdicts(cells, p):
    lines += v.lines()
  lines.append("")
  for arm in OTHER_RL_ARMS:
    lines += rl_arm_lines(cells, arm, p)
  lines += loss_lines(cells, p)
  lines += [
    f"95% Student-t intervals over seeds, paired by seed; high overlap >= {p.high}, low <= "
    f"{p.low}; equivalence margin {p.margin} (see jdistill/experiments/verdict.py).",
  ]
  return "\n".join(lines) + "\n"


def write_answer(cells: list[dict], path: str, p: Params = Params()) -> str:
  """Writes answer.md (headline, then each claim's verdict and numbers) → its text."""
  text = answer(cells, p)
  with open(path, "w") as f:
    f.write(text)
  return text

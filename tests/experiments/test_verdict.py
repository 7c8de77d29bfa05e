"""The verdict of issue 22 on constructed results: intervals, decisions, every claim, the
headline, answer.md, and the equal-budget accounting."""

import math

import pytest

from jdistill.config import base_config, teacher_config
from jdistill.experiments import budget, verdict
from jdistill.experiments.verdict import INCONCLUSIVE, REFUTED, SUPPORTED, Params

SMALL = (-0.01, 0.0, 0.012)  # per-seed noise: a clear difference
LARGE = (-0.3, 0.05, 0.28)  # per-seed noise: an interval that straddles zero


def cell(overlap, loss="reverse_kl", rl="none", warmup="none", seed=0, acc=0.5, **kw):
  c = {
    "alpha": None,
    "overlap": overlap,
    "loss": loss,
    "rl": rl,
    "warmup": warmup,
    "seed": seed,
    "accuracy": {"add": acc, "count": acc, "reverse": acc, "mean": acc},
    "overlap_before": kw.pop("overlap_before", overlap),
    "overlap_after": overlap,
    "rl_student_tokens": 0,
    "opd_student_tokens": 1000,
    "student_tokens": 1000,
    "teacher_tokens": 3000,
    "wall_s": 1.0,
  }
  c.update(kw)
  return c


def two_losses(overlap, full, sampled, noise=SMALL, seeds=3):
  """Cells of one setting: full-vocab at accuracy `full`, sampled-token at `sampled`."""
  return [
    cell(
      overlap, loss, seed=s, acc=base + noise[s % len(noise)] * (1 if loss == "reverse_kl" else -1)
    )
    for s in range(seeds)
    for loss, base in (("reverse_kl", full), ("sampled_token", sampled))
  ]


def test_mean_interval_is_student_t_and_infinite_with_one_seed():
  i = verdict.mean_interval([1.0, 2.0, 3.0])
  assert i.mean == 2.0 and i.n == 3
  assert i.hi - 2.0 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)  # t(0.975, 2) s/√n
  one = verdict.mean_interval([0.7])
  assert (one.lo, one.hi) == (-math.inf, math.inf)
  assert verdict.decide(one, "greater") == INCONCLUSIVE
  paired = verdict.difference_interval([1.0, 2.0, 3.0], [0.0, 1.0, 2.5], paired=True)
  assert paired.mean == pytest.approx(2.5 / 3)
  welch = verdict.difference_interval([1.0, 2.0, 3.0], [0.0, 1.0, 2.5], paired=False)
  assert welch.mean == pytest.approx(2.5 / 3) and welch.lo < paired.lo  # unpaired is wider here
  with pytest.raises(ValueError, match="direction"):
    verdict.decide(i, "bigger")


@pytest.mark.parametrize(
  "lo, hi, direction, expected",
  [
    (0.1, 0.3, "greater", SUPPORTED),
    (-0.1, 0.3, "greater", INCONCLUSIVE),
    (-0.3, -0.1, "greater", REFUTED),
    (-0.3, -0.1, "less", SUPPORTED),
    (0.1, 0.3, "less", REFUTED),
    (-0.04, 0.2, "not_less", SUPPORTED),  # margin 0.05: at most 0.04 worse
    (-0.2, -0.06, "not_less", REFUTED),
    (-0.2, 0.1, "not_less", INCONCLUSIVE),
    (-0.2, 0.04, "not_more", SUPPORTED),
    (0.06, 0.2, "not_more", REFUTED),
    (-0.1, 0.2, "not_more", INCONCLUSIVE),
  ],
)
def test_decide(lo, hi, direction, expected):
  interval = verdict.Interval((lo + hi) / 2, lo, hi, 3)
  assert verdict.decide(interval, direction, margin=0.05) == expected


def test_full_vocab_low_supported_refuted_inconclusive_and_one_seed():
  clear = two_losses(0.3, full=0.2, sampled=0.6)
  v = verdict.claim_full_vocab_low(clear)
  assert v.verdict == SUPPORTED
  d = v.numbers["accuracy, reverse_kl - sampled_token (low)"]
  assert d.mean == pytest.approx(-0.4 + 2 * sum(SMALL) / 3) and d.hi < 0
  assert verdict.claim_full_vocab_low(two_losses(0.3, 0.6, 0.2)).verdict == REFUTED
  straddles = two_losses(0.3, 0.45, 0.4, noise=LARGE)
  v = verdict.claim_full_vocab_low(straddles)
  d = v.numbers["accuracy, reverse_kl - sampled_token (low)"]
  assert d.lo < 0 < d.hi and v.verdict == INCONCLUSIVE
  assert verdict.claim_full_vocab_low(two_losses(0.3, 0.2, 0.6, seeds=1)).verdict == INCONCLUSIVE
  # high-overlap settings are not the low regime's: nothing there to decide
  assert verdict.claim_full_vocab_low(two_losses(0.9, 0.2, 0.6)).verdict == INCONCLUSIVE


def test_full_vocab_high_is_non_inferiority_and_the_crossover_is_interpolated():
  cells = two_losses(0.9, 0.62, 0.6) + two_losses(0.5, 0.3, 0.5)
  assert verdict.claim_full_vocab_high(cells).verdict == SUPPORTED
  assert verdict.claim_full_vocab_high(two_losses(0.9, 0.4, 0.6)).verdict == REFUTED
  v = verdict.claim_full_vocab_low(cells)
  assert v.verdict == SUPPORTED
  # (full - sampled) is +0.02 at 0.9 and -0.2 at 0.5 (+ seed noise): zero near 0.86
  d_hi = v.numbers["at overlap 0.90"].mean
  d_lo = v.numbers["at overlap 0.50"].mean
  expected = 0.9 + (0.5 - 0.9) * d_hi / (d_hi - d_lo)
  assert float(v.numbers["crossover overlap"]) == pytest.approx(expected, abs=0.005)
  assert verdict.claim_full_vocab_low(two_losses(0.5, 0.3, 0.5)).numbers["crossover overlap"] == (
    "none on the dial"
  )


def warmup_cells(overlap, gain_overlap, gain_acc, noise=SMALL):
  return [
    cell(
      overlap, loss, warmup=w, seed=s,
      acc=0.3 + (gain_acc + noise[s] if w == "sft" else 0.0),
      overlap_before=overlap + (gain_overlap + noise[s] if w == "sft" else 0.0),
    )
    for s in range(3) for w in ("none", "sft") for loss in ("reverse_kl", "sampled_token")
  ]  # fmt: skip


def test_warmup_claims():
  cells = warmup_cells(0.3, gain_overlap=0.3, gain_acc=-0.1)
  assert verdict.claim_warmup_overlap(cells).verdict == SUPPORTED
  assert verdict.claim_warmup_accuracy(cells).verdict == REFUTED
  noisy = warmup_cells(0.3, gain_overlap=0.02, gain_acc=0.02, noise=LARGE)
  assert verdict.claim_warmup_overlap(noisy).verdict == INCONCLUSIVE
  assert verdict.claim_warmup_accuracy(noisy).verdict == INCONCLUSIVE


def rl_cells(overlap, rl_gain, overlap_gain=0.0, noise=SMALL, rl_tokens=400, alpha=None):
  """One setting: rl none vs rlvr, seeds 0-2. The RLVR cells sample `rl_tokens` in RL and 600
  in OPD, the no-RL cells 1000 in OPD: equal budget at rl_tokens=400."""
  out = []
  for s in range(3):
    for rl in ("none", "rlvr"):
      gain = rl_gain + noise[s] if rl == "rlvr" else 0.0
      rl_tok = rl_tokens if rl == "rlvr" else 0
      out.append(
        cell(
          overlap, "sampled_token", rl, seed=s, acc=0.5 + gain, alpha=alpha,
          overlap_before=overlap + (overlap_gain + noise[s] if rl == "rlvr" else 0.0),
          rl_student_tokens=rl_tok, opd_student_tokens=1000 - 400 * (rl == "rlvr"),
          student_tokens=rl_tok + 1000 - 400 * (rl == "rlvr"),
        )
      )  # fmt: skip
  return out


def test_rl_claims_equivalence_and_equal_budget():
  assert verdict.claim_rl_high(rl_cells(0.9, rl_gain=0.0)).verdict == SUPPORTED
  assert verdict.claim_rl_high(rl_cells(0.9, rl_gain=0.2)).verdict == REFUTED
  assert verdict.claim_rl_high(rl_cells(0.9, 0.0, noise=LARGE)).verdict == INCONCLUSIVE
  # the RL cells sampled 400 more tokens: not equal budget, whatever the interval says
  unequal = verdict.claim_rl_high(rl_cells(0.9, rl_gain=0.0, rl_tokens=800))
  assert unequal.verdict == INCONCLUSIVE and "budgets differ" in unequal.note
  v = verdict.claim_rl_low(rl_cells(0.3, rl_gain=0.2, overlap_gain=0.2))
  assert v.verdict == SUPPORTED
  # accuracy up, overlap unmoved (its interval straddles zero): the conjunction is open
  assert verdict.claim_rl_low(rl_cells(0.3, 0.2, overlap_gain=0.0)).verdict == INCONCLUSIVE
  assert verdict.claim_rl_low(rl_cells(0.3, rl_gain=0.2, overlap_gain=-0.2)).verdict == REFUTED
  assert verdict.claim_rl_low(rl_cells(0.3, rl_gain=-0.2, overlap_gain=0.2)).verdict == REFUTED


def dial():
  """No-RL matches RL at overlap 0.95 and 0.7, is 0.25 worse at 0.3."""
  return (
    rl_cells(0.95, 0.0, alpha=0.0)
    + rl_cells(0.7, 0.01, alpha=0.5)
    + rl_cells(0.3, 0.25, overlap_gain=0.1, alpha=1.0)
  )


def test_headline_names_the_overlap_where_no_rl_matches_rl(tmp_path):
  cells = dial()
  head = verdict.headline(cells)
  assert "at overlap 0.95, 0.70" in head and "from overlap 0.70 up" in head
  assert "0.30" not in head
  assert verdict.claim_engineered_matches(cells).verdict == SUPPORTED  # 0.95 is engineered
  text = verdict.write_answer(cells, str(tmp_path / "answer.md"))
  assert (tmp_path / "answer.md").read_text() == text
  assert text.splitlines()[2] == head
  for k in range(1, 8):
    assert f"\n{k}. **" in text
  lines = [line for line in text.splitlines() if line.startswith("- overlap 0.30:")]
  assert len(lines) == 1 and lines[0].endswith(": refuted")
  wide = verdict.headline(cells, Params(margin=0.3))  # a 0.3 margin forgives the 0.25 gap
  assert "at overlap 0.95, 0.70, 0.30" in wide and "within 0.3" in wide
  none = rl_cells(0.95, 0.3) + rl_cells(0.3, 0.3)
  assert verdict.headline(none).startswith("At no overlap tested (0.95, 0.30)")
  assert verdict.claim_engineered_matches(none).verdict == REFUTED
  one_seed = [c for c in cells if c["seed"] == 0]
  assert verdict.headline(one_seed).startswith("At no overlap tested")


def test_equal_budget_accounting():
  c = base_config()
  c.teachers.update({d: teacher_config(f"/t/{d}", d) for d in ("add", "count", "reverse")})
  c.data.slots_per_teacher, c.sampling.max_new_tokens, c.rl.group_size = 4, 32, 4
  c.stage = "opd"
  opd = budget.step_tokens(c)
  c.stage = "rlvr"
  rl = budget.step_tokens(c)
  assert (opd, rl) == (4 * 3 * 32, 4 * 4 * 3 * 32)
  rl_steps, opd_steps = 10, 20
  steps = budget.opd_steps_for_budget(rl_steps * rl, opd_steps, opd)
  assert steps == 60
  assert steps * opd == rl_steps * rl + opd_steps * opd  # RL + OPD tokens equal
  with pytest.raises(ValueError, match="not a multiple"):
    budget.opd_steps_for_budget(rl + 1, opd_steps, opd)
  # cells at one setting: RL + OPD equal → no flag; the RL recipe 10% over → flagged
  fair = rl_cells(0.9, 0.0)
  assert budget.check_equal_budget(fair) == []
  over = rl_cells(0.9, 0.0, rl_tokens=500) + rl_cells(0.3, 0.0)
  flags = budget.check_equal_budget(over, tolerance=0.05)
  assert [f["setting"] for f in flags] == [("overlap", 0.9)]
  assert (flags[0]["min"], flags[0]["max"]) == (1000, 1100)
  assert budget.check_equal_budget(over, tolerance=0.2) == []
  bad = dict(fair[1], student_tokens=5)
  with pytest.raises(ValueError, match="student_tokens=5"):
    budget.cell_budget(bad)


def test_named_settings_and_missing_fields():
  # a teacher set off the dial whose measured overlap differs per seed stays one setting
  cells = rl_cells(0.3, rl_gain=0.25)
  for c in cells:
    c["overlap"] += 0.001 * c["seed"]
  assert len(verdict.matching_settings(cells)) == 3  # split by seed: one-seed settings
  for c in cells:
    c["setting"] = "foreign"
  rows = verdict.matching_settings(cells)
  assert len(rows) == 1 and rows[0][1].n == 3 and rows[0][2] == REFUTED
  del cells[4]["overlap_before"]
  with pytest.raises(
    ValueError, match=r"results cell 4 \(alpha=None, setting='foreign'.* lacks \['overlap_before'\]"
  ):
    verdict.answer(cells)


def test_a_match_where_both_arms_lose_accuracy_is_at_the_floor():
  cells = rl_cells(0.3, rl_gain=0.0)
  assert all(v == verdict.SUPPORTED for _, _, v in verdict.matching_settings(cells))
  for c in cells:  # every arm ends below the accuracy it started from
    c["accuracy_before"] = {"mean": c["accuracy"]["mean"] + 0.2}
  rows = verdict.matching_settings(cells)
  assert [v for _, _, v in rows] == [verdict.FLOOR]
  assert verdict.headline(cells).startswith("At no overlap tested")


def test_answer_compares_the_unified_arm_and_the_other_losses_by_the_same_rules(tmp_path):
  """RLVR helps by 0.2 at both settings; the unified arm matches no RL at 0.9 and is 0.2
  better at 0.3; forward KL is 0.1 below reverse KL at 0.9, top-k equal to it (noisy)."""
  cells = rl_cells(0.9, 0.2) + rl_cells(0.3, 0.2)
  for c in [c for c in cells if c["rl"] == "rlvr"]:
    gain = 0.0 if c["overlap"] == 0.9 else 0.2
    cells.append(dict(c, rl="unified", accuracy={"mean": 0.5 + gain + SMALL[c["seed"]]}))
  for s in range(3):
    for loss, acc in (("reverse_kl", 0.5), ("forward_kl", 0.4 + SMALL[s]),
                      ("topk_teacher", 0.5 + LARGE[s])):  # fmt: skip
      cells.append(cell(0.9, loss, seed=s, acc=acc))
  text = verdict.write_answer(cells, str(tmp_path / "answer.md"))
  head = text.splitlines()[2]
  assert head.startswith("At no overlap tested") and "(rlvr)" in head  # RLVR helps everywhere
  section = text[text.index("## Against the unified arm") :]
  assert "matches the one with it (unified, equal budget, within 0.05) at overlap 0.90;" in section
  assert "- overlap 0.30: no-RL - unified accuracy" in section
  assert "5u. **at high overlap, student RL adds nothing" in section
  assert section.split("5u. ")[1].split("\n")[0].endswith("SUPPORTED")
  losses = text[text.index("## Other losses") :]
  assert "- forward_kl - reverse_kl at overlap 0.90: -0.099" in losses
  assert (
    losses.split("forward_kl - reverse_kl at overlap 0.90")[1].split("\n")[0].endswith(": lower")
  )
  assert "topk_teacher - reverse_kl at overlap 0.90" in losses
  assert losses.split("topk_teacher - reverse_kl")[1].split("\n")[0].endswith("no difference shown")
  # without unified cells or other losses the sections are absent
  plain = verdict.answer(rl_cells(0.9, 0.2))
  assert "## Against the unified arm" not in plain and "## Other losses" not in plain

"""Verifiers on hand cases; teacher-data generation exactly once across a kill; rejection."""

import json
import os

import pytest

from jdistill.eval import verifiers
from jdistill.stages import generate
from jdistill.testing.toy import tiny_config


@pytest.mark.parametrize(
  "name,completion,reference,want",
  [
    ("exact_match", "so the answer: 42", "42", 1.0),
    ("exact_match", "first 3\n41", "41", 1.0),  # the last line
    ("exact_match", "answer: 42.0", "42", 0.0),
    ("numeric", "answer: 42.0", "42", 1.0),
    ("numeric", "7 * 6 = 42.", "42", 1.0),
    ("numeric", "answer: 1,000", "1000", 1.0),
    ("numeric", "answer: forty-two", "42", 0.0),  # malformed: no number
    ("numeric", "answer: nan", "42", 0.0),
    ("numeric", "answer: 42", "not a number", 0.0),
    ("numeric", "", "42", 0.0),
    ("boxed", "so \\boxed{\\frac{1}{2}} and then \\boxed{7}", "7", 1.0),
    ("boxed", "\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("boxed", "\\boxed{7", "7", 0.0),  # unbalanced braces: malformed
    ("boxed", "7", "7", 0.0),  # no box at all
    ("exact_match", "\\boxed{7} is it", "7", 1.0),  # a box wins over the last line
    ("regex:^def \\w+\\(", "def f(x): return x", "", 1.0),
    ("regex:^def \\w+\\(", "lambda x: x", "", 0.0),
  ],
)
def test_verifiers_on_hand_cases(name, completion, reference, want):
  assert verifiers.get(name)(completion, reference) == want


def test_numeric_honours_its_tolerance_on_values_that_are_not_exactly_representable():
  """0.1 + 0.2 is 0.30000000000000004 in binary floating point: within the tolerance of 0.3
  (absolute 1e-6 below 1, relative above), while 1.1e-6 away is not; a passed `tol` is used."""
  numeric = verifiers.get("numeric")
  assert numeric(f"answer: {0.1 + 0.2!r}", "0.3") == 1.0
  assert numeric("answer: 0.3000009", "0.3") == 1.0
  assert numeric("answer: 0.3000011", "0.3") == 0.0
  assert numeric("answer: 1000000.7", "1000000.1") == 1.0  # relative: 1e-6 * 1e6 = 1
  assert numeric("answer: 1000001.3", "1000000.1") == 0.0
  assert verifiers.numeric("answer: 3.14159", "3.14", tol=1e-3) == 1.0
  assert verifiers.numeric("answer: 3.14159", "3.14", tol=1e-4) == 0.0


def test_user_verifiers_and_their_errors():
  assert verifiers.get("jdistill.eval.verifiers:numeric")("= 3", "3") == 1.0
  with pytest.raises(ValueError, match="cannot import 'nope'"):
    verifiers.get("jdistill.eval.verifiers:nope")
  with pytest.raises(ValueError, match="allowed: exact_match"):
    verifiers.get("levenshtein")
  scorer = verifiers.Scorer(verifiers.get("json:loads"))  # raises on these arguments
  assert scorer("completion", "reference") == 0.0 and scorer("x", "y") == 0.0
  assert scorer.errors == 2 and "Error" in scorer.last_error


def _config(world, out_dir, **generate_kw):
  c = tiny_config(world)
  c.stage = "generate"
  c.generate.model = world["teacher_math"]
  c.generate.prompt_files = world["eval"]  # 4 prompts per domain: 8 in all
  c.generate.model_name = "math"
  c.generate.out_dir = str(out_dir)
  c.generate.samples_per_prompt = 2
  c.generate.prompts_per_batch = 3
  c.sampling.max_new_tokens = 6
  c.num_devices = 1
  for k, v in generate_kw.items():
    c.generate[k] = v
  return c


def _records(out_dir):
  (name,) = [n for n in os.listdir(out_dir) if n.endswith(".jsonl")]
  with open(os.path.join(out_dir, name)) as f:
    return f.read()


def test_generation_is_complete_and_exactly_once_after_a_kill(small_world, tmp_path, monkeypatch):
  generate.Generator(_config(small_world, tmp_path / "straight")).run()
  straight = _records(tmp_path / "straight")
  lines = [json.loads(x) for x in straight.splitlines()]
  assert len(lines) == 8 * 2  # 8 prompts x 2 samples
  first = lines[0]
  assert {"domain", "teacher", "completion", "sampling", "prompt", "source"} <= set(first)
  assert first["teacher"] == "math" and first["sampling"]["max_new_tokens"] == 6

  # killed after batch 2's records were written but before they were committed
  commit, calls = generate.Generator._commit, {"n": 0}

  def dying_commit(self, progress):
    calls["n"] += 1
    if calls["n"] == 2:
      raise KeyboardInterrupt("killed")
    commit(self, progress)

  monkeypatch.setattr(generate.Generator, "_commit", dying_commit)
  with pytest.raises(KeyboardInterrupt):
    generate.Generator(_config(small_world, tmp_path / "killed")).run()
  assert len(_records(tmp_path / "killed").splitlines()) == 12  # 2 batches on disk, 1 committed
  monkeypatch.setattr(generate.Generator, "_commit", commit)
  generate.Generator(_config(small_world, tmp_path / "killed")).run()
  assert _records(tmp_path / "killed") == straight  # every record once, byte for byte


def test_rejection_sampling_keeps_exactly_the_verified_ones(small_world, tmp_path):
  verifier = "regex:[0-9]"  # the toy completions that contain a digit
  all_cfg = _config(small_world, tmp_path / "all", verifier=verifier)
  generate.Generator(all_cfg).run()
  scored = [json.loads(x) for x in _records(tmp_path / "all").splitlines()]
  assert all("score" in r for r in scored if r["domain"] == "math")
  verified = [r for r in scored if r.get("score") == 1.0]
  assert 0 < len(verified) < len(scored)
  kept_cfg = _config(small_world, tmp_path / "kept", verifier=verifier, keep="verified")
  progress = generate.Generator(kept_cfg).run()
  kept = [json.loads(x) for x in _records(tmp_path / "kept").splitlines()]
  assert kept == verified and progress["kept"] == len(verified)
  assert progress["sampled"] == len(scored)


def test_a_raising_verifier_is_counted_not_fatal(small_world, tmp_path):
  progress = generate.Generator(_config(small_world, tmp_path / "x", verifier="json:loads")).run()
  math_samples = sum(
    r["domain"] == "math" for r in map(json.loads, _records(tmp_path / "x").splitlines())
  )
  assert progress["verifier_errors"] == math_samples > 0

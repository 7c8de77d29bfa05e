"""Bad input drawn by hypothesis (issue 27): config overrides and data lines of wrong types,
extremes, unicode and empty values either pass or stop, before anything compiles, with one
ValueError line naming the field (`config.<field>`) or `file:line`; never another exception,
never an accepted value that breaks the field's declared constraint.

`CASES` counts the examples tried per property; `-s` prints it at the end of the module.
"""

from __future__ import annotations

import collections
import json
import math
import re

import jax
import pytest
from absl import flags
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from ml_collections import config_flags

from jdistill import config as config_lib
from jdistill.config.fields import get
from jdistill.data import packing, prompts
from jdistill.stages import pipeline
from jdistill.testing.tokenizers import qwen_like

CASES: collections.Counter = collections.Counter()
SETTINGS = settings(
  max_examples=200,
  deadline=None,
  derandomize=True,  # the same cases on every run (CI, the break checks)
  suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# ---------------------------------------------------------------------------- configs

# Every declared field, as the command line names it; a teacher is `teachers.a`. The per-run
# maps (`rl.verifiers.<domain>`, `pipeline.overrides.<stage>`) have no declared key to override.
FIELDS = {
  dotted.replace("<name>", "a"): f
  for section in config_lib.SECTIONS
  for dotted, f in section.rows()
  if not f.per
}

# What the command line can be given: the field type's parser reads the text (`--config.x=...`)
EXTREMES = (
  *("", " ", "-1", "0", "-0.0", "1", "1.5", "nan", "-nan", "inf", "-inf", "1e999", "-1e999"),
  *("9" * 30, "-" + "9" * 30, "True", "False", "None", "()", "(0,)", "(-1,)", "(1.5, 2)"),
  *("('a', 1)", "('',)", "(nan,)", "(inf, 1)", "[]", "{}", "x", "a:b", "::", "é", "\u202e"),
  *("東京", "🙂", "opd", "sft", "generate", "rlvr", "('opd',)", "('sft', 'x')", "x" * 10_000),
)
ARGV_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
OVERRIDE_TEXT = st.one_of(
  st.sampled_from(EXTREMES),
  st.integers().map(str),
  st.floats().map(repr),
  st.lists(st.one_of(st.integers(), st.floats(), ARGV_TEXT), max_size=3).map(
    lambda xs: repr(tuple(xs))
  ),
  ARGV_TEXT,
)
# Text of the field's own type, at its edges (the flag parser refuses most other texts)
INT_TEXT = st.sampled_from(["-1", "0", "1", "-2", "9" * 30, "-" + "9" * 30]) | st.integers().map(
  str
)
FLOAT_TEXT = st.sampled_from(["nan", "-nan", "inf", "-inf", "1e999", "-0.0", "0", "1", "-1", "1.5"])
TUPLE_TEXT = st.sampled_from(
  ["()", "(0,)", "(-1,)", "(1.5, 2)", "('a', 1)", "('',)", "(nan,)", "1"]
)
BY_TYPE = {
  bool: st.sampled_from(["True", "False", "true", "0", "yes", "", "2"]),
  int: INT_TEXT,
  float: FLOAT_TEXT | st.floats().map(repr),
  tuple: TUPLE_TEXT | st.lists(st.integers(-3, 3), max_size=3).map(lambda xs: repr(tuple(xs))),
}
CHOICES = re.compile(r"`[^`]+`(, `[^`]+`)*")


def valid_config(stage: str):
  """A config every stage's validation accepts (paths are only named, never opened)."""
  c = config_lib.base_config()
  c.stage = stage
  c.student.path = "student"
  c.data.train_files = "prompts.jsonl"
  c.sft.train_files = "sft.jsonl"
  c.teachers.a = config_lib.teacher_config(path="teacher", domains="math")
  return c


def override(config, field: str, text: str):
  """`config` after `--config.<field>=<text>`, parsed by the flags the CLI defines."""
  argv = ["jdistill", f"--config.{field}={text}"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_dict(
    "config", config, flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  return values.config


def validate(config) -> None:
  """What the CLI runs before anything else (`cli.run_config`)."""
  (pipeline.validate if config.pipeline.stages else config_lib.validate)(config)


def stated(field: str, allowed: str, value) -> bool:
  """Whether `value` meets the field's declared `allowed` text, for the texts it can read."""
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if number and not math.isfinite(value):
    return False
  if CHOICES.fullmatch(allowed):
    return value in re.findall(r"`([^`]+)`", allowed)
  if allowed.startswith("a positive int"):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
  if allowed.startswith("an int ≥ 0"):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
  if allowed.startswith(("a float in (0, 1]", "a probability in (0, 1]")):
    return number and 0 < value <= 1
  if allowed.startswith(("a number in [0, 1]", "a float in [0, 1]")):
    return number and 0 <= value <= 1
  if allowed.startswith(("a float > 0", "a number > 0")):
    return number and value > 0
  if allowed.startswith(("a float ≥ 0", "a number ≥ 0")):
    return number and value >= 0
  if allowed.startswith(("a positive int, or `-1`", "as `mesh.data`")):
    return isinstance(value, int) and (value > 0 or value == -1)
  if allowed.startswith("a saved step; `-1`"):
    return isinstance(value, int) and value >= -1
  if allowed.startswith("a float in [0, 1)"):
    return number and 0 <= value < 1
  if allowed.startswith("a number ≥ 1"):
    return number and value >= 1
  if allowed.startswith("a non-empty tuple of positive ints"):
    return bool(value) and all(
      isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
    )
  return True  # a path, a name, a text the validation does not bound


def checked_in(field: str, stage: str) -> bool:
  """Whether `validate` in `stage` checks `field` (a stage's section only in that stage)."""
  section = field.split(".")[0]
  own = {"generate": "generate", "sft": "sft", "rl": "rlvr", "teachers": "opd"}
  # a teacher's length_ratio counts only with its own tokenizer (None here)
  return field != "teachers.a.length_ratio" and own.get(section, stage) == stage


@pytest.fixture(scope="module", autouse=True)
def report_cases():
  yield
  print(f"\ntest_bad_input cases tried: {dict(CASES)}")


@pytest.fixture
def no_compile():
  """Fails the test if XLA compiles anything while it runs."""
  compiles = []

  def listen(event, *_, **__):
    if "compile" in event:
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listen)
  yield
  jax.monitoring.unregister_event_duration_listener(listen)
  assert not compiles, compiles


def check_override(field: str, text: str, stage: str) -> None:
  """The property for `--config.<field>=<text>` in `stage`."""
  CASES["config overrides"] += 1
  try:
    config = override(valid_config(stage), field, text)
  except flags.Error as e:  # the flag parser's own refusal: absl prints it, exits 1
    CASES["refused by the flag parser"] += 1
    assert f"config.{field}" in str(e)
    return
  value = get(config, field)
  try:
    validate(config)
  except ValueError as e:
    CASES["refused by validate"] += 1
    message = str(e)
    assert "\n" not in message, message
    assert field in message or field.replace(".a.", ".<name>.") in message, message
    return
  CASES["accepted"] += 1
  if checked_in(field, stage) and not config.pipeline.stages:
    assert stated(field, FIELDS[field].allowed, value), (field, value, FIELDS[field].allowed)


@SETTINGS
@given(data=st.data(), stage=st.sampled_from(config_lib.STAGES))
def test_a_config_override_passes_or_names_its_field(no_compile, data, stage):
  field = data.draw(st.sampled_from(sorted(FIELDS)), "field")
  declared = FIELDS[field]
  own = BY_TYPE.get(declared.field_type or type(declared.default), ARGV_TEXT)
  check_override(field, data.draw(st.one_of(own, own, OVERRIDE_TEXT), "text"), stage)


# What the property found (each was accepted, or another exception than a ValueError naming
# the field): prompt_buckets was never checked (a float, an empty tuple: max() of nothing, a
# string: TypeError); optimizer.eps was unchecked; mesh sizes were checked only when the mesh
# was built, naming no config field; restore_step=-5 silently meant the latest.
@pytest.mark.parametrize(
  "field, text",
  [
    ("sampling.prompt_buckets", "64.0"),
    ("sampling.prompt_buckets", "()"),
    ("sampling.prompt_buckets", ""),
    ("optimizer.eps", "-1"),
    ("mesh.fsdp", "-7"),
    ("mesh.fsdp", "-1"),  # two axes of -1 (mesh.data is -1)
    ("checkpoint.restore_step", "-5"),
  ],
)
def test_overrides_the_property_found(no_compile, field, text):
  check_override(field, text, "opd")


# ------------------------------------------------------------------------------- data

JSON_VALUES = st.recursive(
  st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.sampled_from(["", " "]),
  lambda inner: (
    st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
  ),
  max_leaves=6,
)
GOOD = {"domain": "math", "prompt": "1 + 1 =", "answer": "2", "completion": "2"}
KEYS = ("prompt", "domain", "answer", "messages", "completion", "turns")
MESSAGES = st.lists(
  st.fixed_dictionaries({"role": JSON_VALUES | st.just("user"), "content": JSON_VALUES}),
  max_size=2,
)


@st.composite
def records(draw):
  """A good record with some fields replaced by drawn values, or dropped."""
  record = dict(GOOD)
  for key in draw(st.lists(st.sampled_from(KEYS), max_size=3, unique=True)):
    if draw(st.booleans()):
      record.pop(key, None)
    else:
      record[key] = draw(MESSAGES if key == "messages" else JSON_VALUES)
  return record


def dumps(value) -> str:
  return json.dumps(value, ensure_ascii=False, allow_nan=True)


LINES = st.one_of(
  records().map(dumps),
  JSON_VALUES.map(dumps),  # a line that is not an object
  st.sampled_from(
    ["{", "not json", '{"prompt": "x",}', "\ufeff" + dumps(GOOD), '{"prompt": NaN}', "[" * 5000]
  ),
  ARGV_TEXT.filter(lambda s: "\n" not in s and "\r" not in s),
  st.just(dumps({**GOOD, "prompt": "🙂 " * 5000})),  # huge
)
BYTES = st.one_of(LINES.map(lambda s: s.encode()), st.just(b"\xff\xfe{}"))


def check_line_error(error: ValueError, path: str) -> None:
  """One line, starting `<path>:<line>: ` (or `<path>: ` for a file without examples)."""
  message = str(error)
  assert "\n" not in message, message
  assert re.match(re.escape(path) + r"(:\d+)?: \S", message), message


@SETTINGS
@example(lines=[b"[" * 5000])  # found by this property: a RecursionError, not a ValueError
# found by this property: a list, bool or NaN answer became the reference "[]", "True", "nan"
@example(lines=[dumps({**GOOD, "answer": []}).encode()])
@example(lines=[dumps({**GOOD, "answer": True}).encode()])
@example(lines=[dumps({**GOOD, "answer": math.nan}).encode()])
@given(lines=st.lists(BYTES, min_size=1, max_size=3))
def test_a_prompt_line_reads_or_names_file_and_line(no_compile, tmp_path, lines):
  CASES["prompt files"] += 1
  path = tmp_path / "prompts.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  try:
    read, _ = prompts.read_prompt_records(str(path))
  except ValueError as e:
    CASES["prompt file refused"] += 1
    check_line_error(e, str(path))
    return
  for record in read:
    assert isinstance(record["domain"], str) and record["domain"]
    assert isinstance(record.get("prompt", ""), str)
    line = int(record["where"].rsplit(":", 1)[1])
    answer = json.loads(lines[line - 1]).get("answer")  # the line as written
    if answer is None:
      assert "answer" not in record
    else:  # the text itself, or a number as Python writes it; nothing else
      assert record["answer"] == (answer if isinstance(answer, str) else repr(answer))
      assert isinstance(answer, str) or type(answer) in (int, float) and math.isfinite(answer)


@SETTINGS
@example(lines=[b"[" * 5000])  # found by this property: a RecursionError, not a ValueError
# found by this property: a list domain was kept; a list or null prompt reached the template
@example(lines=[dumps({**GOOD, "domain": []}).encode()])
@example(lines=[dumps({**GOOD, "prompt": []}).encode()])
@example(lines=[dumps({**GOOD, "prompt": None}).encode()])
@given(lines=st.lists(BYTES, min_size=1, max_size=3))
def test_an_sft_line_reads_or_names_file_and_line(no_compile, tmp_path, lines):
  CASES["sft files"] += 1
  path = tmp_path / "sft.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  try:
    examples = packing.read_examples(str(path), qwen_like(), use_chat_template=True, max_len=10**6)
  except ValueError as e:
    CASES["sft file refused"] += 1
    check_line_error(e, str(path))
    return
  for ids, mask, domain in examples:
    assert len(ids) == len(mask) and any(mask)
    assert domain is None or isinstance(domain, str)

"""The task world's problems, worked solutions and verifier (hand cases included)."""

import json
import random
import re

import pytest

from jdistill.eval import verifiers
from jdistill.experiments import tasks


@pytest.mark.parametrize("style", tasks.STYLES)
def test_every_worked_solution_verifies_and_computes_the_answer(style):
  rng = random.Random(0)
  for domain in tasks.DOMAINS:
    for _ in range(200):
      prompt, answer = tasks.make_problem(domain, rng)
      assert prompt.endswith("\n")
      completion = tasks.solution(prompt, style)
      assert tasks.verify(completion, answer) == 1.0, (prompt, completion)
      assert "\n" not in completion


def test_hand_cases():
  assert tasks.solution("add 47 38\n", "plain") == "7+8=15 c1 4+3+1=8 answer: 85"
  assert tasks.solution("add 47 38\n", "external") == "8+7 is 15 so 5 up 1, 3+4+1 is 8; answer: 85"
  assert tasks.solution("reverse lamp\n", "plain") == "p m a l answer: pmal"
  assert tasks.solution("count a in abca\n", "plain") == "a1 b1 c1 a2 answer: 2"
  assert tasks.solution("count c in abab\n", "external") == "at none so 0; answer: 0"


@pytest.mark.parametrize(
  "completion, score",
  [
    ("7+8=15 c1 4+3+1=8 answer: 85", 1.0),
    ("anything at all; answer: 85", 1.0),
    ("answer:85", 1.0),
    ("answer: 85\n\n", 1.0),
    ("answer: 86", 0.0),
    ("answer: 85 and more", 0.0),  # the answer must end the completion
    ("answer: 85\nmore text", 0.0),  # ... on the last line
    ("85", 0.0),  # no answer line: malformed
    ("", 0.0),
    ("answer:", 0.0),
    ("ANSWER: 85", 0.0),
  ],
)
def test_verifier_on_hand_cases_including_malformed(completion, score):
  assert tasks.verify(completion, "85") == score
  # registered with the stages' verifiers: usable as rl.verifier / generate.verifier
  assert verifiers.get("jdistill.experiments.tasks:verify")(completion, "85") == score


def test_prompt_files_are_distinct_and_held_out_prompts_stay_out_of_training(tmp_path):
  eval_path = tasks.write_prompts(str(tmp_path / "eval.jsonl"), tasks.DOMAINS, 20, seed=0)
  records = [json.loads(line) for line in open(eval_path)]
  assert len(records) == 60 and len({r["prompt"] for r in records}) == 60
  held_out = {r["prompt"] for r in records}
  path = tasks.write_examples(
    str(tmp_path / "sft.jsonl"), ["add"], 500, seed=1, style="plain", exclude=held_out
  )
  assert not {json.loads(line)["prompt"] for line in open(path)} & held_out


def _reference(prompt: str) -> str:
  """The answer of `prompt`, computed here apart from `tasks` (a second opinion)."""
  domain, *args = prompt.split()
  if domain in ("add", "sub", "mul"):
    a, b = int(args[0]), int(args[1])
    return str({"add": a + b, "sub": a - b, "mul": a * b}[domain])
  if domain == "reverse":
    return args[0][::-1]
  if domain == "count":
    return str(args[2].count(args[0]))
  if domain == "max":
    return str(max(int(x) for x in args))
  if domain == "sort":
    return "".join(sorted(args[0]))
  if domain == "parity":
    return ["even", "odd"][sum(map(int, args[0])) % 2]
  if domain == "first":
    return "".join(w[0] for w in args)
  if domain == "len":
    return str(len(args[0]))
  raise AssertionError(domain)


_ARITHMETIC = re.compile(r"(\d+(?:[-+*]\d+)+)=(\d+)")


@pytest.mark.parametrize("domain", tasks.ALL_DOMAINS)
def test_every_domain_is_answered_right_in_both_styles_with_right_steps(domain):
  """Over many problems: the reference answer is right (computed apart), both styles'
  completions verify against it, and every `x op y = z` step of the plain style is true."""
  rng = random.Random(1)
  for _ in range(500):
    prompt, answer = tasks.make_problem(domain, rng)
    assert prompt.startswith(f"{domain} ") and prompt.endswith("\n")
    assert answer == _reference(prompt), prompt
    for style in tasks.STYLES:
      completion = tasks.solution(prompt, style)
      assert tasks.verify(completion, answer) == 1.0, (prompt, style, completion)
      assert "\n" not in completion
    for expr, value in _ARITHMETIC.findall(tasks.solution(prompt, "plain")):
      assert eval(expr) == int(value), (prompt, expr, value)


@pytest.mark.parametrize(
  "prompt, plain, external",
  [
    ("sub 83 47\n", "13-7=6 b1 8-4-1=3 answer: 36", "7 from 13 is 6, 5 from 8 is 3; answer: 36"),
    ("sub 58 23\n", "8-3=5 b0 5-2-0=3 answer: 35", "3 from 8 is 5, 2 from 5 is 3; answer: 35"),
    ("max 47 12 93\n", "47 47 93 answer: 93", "down 93,47,12; answer: 93"),
    ("sort dbca\n", "a b c d answer: abcd", "in order: a,b,c,d; answer: abcd"),
    ("mul 7 38\n", "7*8=56 c5 7*3=21 21+5=26 answer: 266",
     "8x7=56 so 6 up 5, 3x7+5=26; answer: 266"),
    ("parity 10110\n", "1 1 0 1 1 answer: odd", "ones 3; answer: odd"),
    ("parity 0000\n", "0 0 0 0 answer: even", "ones 0; answer: even"),
    ("first cab dog emu\n", "c d e answer: cde", "heads c/d/e; answer: cde"),
    ("len abcd\n", "a1 b2 c3 d4 answer: 4", "last d at 4; answer: 4"),
  ],
)  # fmt: skip
def test_hand_cases_of_the_new_domains(prompt, plain, external):
  assert tasks.solution(prompt, "plain") == plain
  assert tasks.solution(prompt, "external") == external


def test_prompts_and_completions_fit_the_worlds_token_budgets():
  """Under the world's character-level tokenizer: prompts within `data.max_prompt_len` (24),
  completions and their EOS within `sampling.max_new_tokens` (48), with room to spare."""
  from jdistill.data.tokenizer import load_tokenizer
  from jdistill.experiments import task_world

  tokenizer = load_tokenizer(f"{task_world.COMMITTED}/tokenizer")
  spec = task_world.WorldSpec()
  rng = random.Random(2)
  for domain in tasks.ALL_DOMAINS:
    longest = 0
    for _ in range(300):
      prompt, _ = tasks.make_problem(domain, rng)
      assert len(tokenizer.encode(prompt, add_special_tokens=False)) <= 24, prompt
      for style in tasks.STYLES:
        completion = tasks.solution(prompt, style)
        longest = max(longest, len(tokenizer.encode(completion, add_special_tokens=False)) + 1)
    assert longest <= spec.max_new_tokens - 2, (domain, longest)


@pytest.mark.parametrize("domain", tasks.ALL_DOMAINS)
def test_the_two_styles_differ_in_their_steps(domain):
  rng = random.Random(3)
  for _ in range(100):
    prompt, _ = tasks.make_problem(domain, rng)
    steps = {tasks.solution(prompt, style).rpartition("answer:")[0] for style in tasks.STYLES}
    assert len(steps) == 2, prompt


def test_unknown_domains_are_refused_naming_the_allowed_ones():
  with pytest.raises(ValueError, match="allowed: .*'add'.*'len'"):
    tasks.make_problem("divide", random.Random(0))
  with pytest.raises(ValueError, match="allowed: .*'add'.*'len'"):
    tasks.solution("divide 6 3\n", "plain")
  assert tasks.DOMAINS == tasks.ALL_DOMAINS[:3] and len(set(tasks.ALL_DOMAINS)) == 10

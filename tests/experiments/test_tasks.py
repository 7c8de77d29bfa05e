"""The task world's problems, worked solutions and verifier (hand cases included)."""

import json
import random

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

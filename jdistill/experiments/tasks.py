"""A verifiable task world: three domains with short chains of thought, in two surface styles.

  add      "add 47 38\n"        two-digit addition, the carry written out
  reverse  "reverse lamp\n"     the letters of a word, last to first
  count    "count a in abcab\n" occurrences of a letter, with a running count

(A prompt ends in a newline, where the completion starts.)

Every completion ends in the same final-answer line, `answer: <x>`, whatever its style, so one
verifier per domain (`verify`) scores both. The styles differ in wording and step layout:

  plain     7+8=15 c1 4+3+1=8 answer: 85        (the base and its lineage teachers)
  external  8+7 is 15 so 5 up 1, 3+4+1 is 8; answer: 85

A student trained on "plain" and a teacher trained on "external" agree on the answers but
not on the tokens between: the student's rollouts fall off the external teacher's support.
"""

from __future__ import annotations

import json
import random
import re

DOMAINS = ("add", "reverse", "count")
STYLES = ("plain", "external")
LETTERS = "abcdefghijklmnop"
_ANSWER = re.compile(r"answer:\s*(\S+)\s*$")


def make_problem(domain: str, rng: random.Random) -> tuple[str, str]:
  """(prompt, reference answer) of one random problem of `domain`."""
  if domain == "add":
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"add {a} {b}\n", str(a + b)
  if domain == "reverse":
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
    return f"reverse {word}\n", word[::-1]
  if domain == "count":
    letter = rng.choice("abc")
    text = "".join(rng.choice("abc") for _ in range(rng.randint(4, 7)))
    return f"count {letter} in {text}\n", str(text.count(letter))
  raise ValueError(f"domain {domain!r} is invalid; allowed: {list(DOMAINS)}")


def solution(prompt: str, style: str) -> str:
  """The worked completion of `prompt` in `style`, ending in `answer: <x>`."""
  domain, *args = prompt.split()
  if style not in STYLES:
    raise ValueError(f"style {style!r} is invalid; allowed: {list(STYLES)}")
  if domain == "add":
    a, b = (int(x) for x in args)
    units = a % 10 + b % 10
    carry = units // 10
    tens = a // 10 + b // 10 + carry
    if style == "plain":
      return (
        f"{a % 10}+{b % 10}={units} c{carry} {a // 10}+{b // 10}+{carry}={tens} answer: {a + b}"
      )
    return (
      f"{b % 10}+{a % 10} is {units} so {units % 10} up {carry}, "
      f"{b // 10}+{a // 10}+{carry} is {tens}; answer: {a + b}"
    )
  if domain == "reverse":
    word = args[0]
    if style == "plain":
      return f"{' '.join(word[::-1])} answer: {word[::-1]}"
    return f"last first: {','.join(word[::-1])}; answer: {word[::-1]}"
  if domain == "count":
    letter, text = args[0], args[2]
    if style == "plain":
      steps, n = [], 0
      for ch in text:
        n += ch == letter
        steps.append(f"{ch}{n}")
      return f"{' '.join(steps)} answer: {n}"
    hits = [str(i + 1) for i, ch in enumerate(text) if ch == letter]
    return f"at {' '.join(hits) or 'none'} so {len(hits)}; answer: {len(hits)}"
  raise ValueError(f"prompt {prompt!r}: unknown domain {domain!r}")


# The "notation" of external data at the token level: each character of the worked steps may
# be written in its shifted glyph (a digit as the symbol on its key, a letter in upper case).
# The answer line stays plain, so the verifier reads it whatever the notation.
SHIFTED = dict(zip("0123456789abcdefghijklmnopqrstuvwxyz", ")!@#$%^&*(ABCDEFGHIJKLMNOPQRSTUVWXYZ"))


def notate(completion: str, share: float, rng: random.Random) -> str:
  """`completion` with each character of its steps (before ` answer:`) that has a shifted
  glyph written in it with probability `share`, independently: at share α a model trained on
  such data puts about α of its mass on the shifted glyph at every such position."""
  if not 0.0 <= share <= 1.0:
    raise ValueError(f"share must be in [0, 1], got {share}")
  steps, sep, answer = completion.rpartition(" answer:")
  if not sep:
    raise ValueError(f"completion {completion!r} has no ' answer:' line")
  out = [SHIFTED[ch] if ch in SHIFTED and rng.random() < share else ch for ch in steps]
  return "".join(out) + sep + answer


def final_answer(completion: str) -> str | None:
  """The `<x>` of a completion's last line `answer: <x>`; None if it does not end so."""
  lines = [line for line in completion.strip().splitlines() if line.strip()]
  if not lines:
    return None
  found = _ANSWER.search(lines[-1])
  return found.group(1) if found else None


def verify(completion: str, reference: str) -> float:
  """1.0 when the completion ends in `answer: <reference>`, else 0.0 (malformed: 0.0). The
  verifier of every domain: `rl.verifier="jdistill.experiments.tasks:verify"`."""
  answer = final_answer(completion)
  return float(answer is not None and answer == str(reference).strip())


def write_prompts(path: str, domains, n_per_domain: int, seed: int) -> str:
  """A prompt file (`{"domain", "prompt", "answer"}` per line) of distinct problems."""
  rng = random.Random(seed)
  with open(path, "w") as f:
    for domain in domains:
      seen = set()
      while len(seen) < n_per_domain:
        prompt, answer = make_problem(domain, rng)
        if prompt not in seen:
          seen.add(prompt)
          f.write(json.dumps({"domain": domain, "prompt": prompt, "answer": answer}) + "\n")
  return path


def write_examples(path: str, domains, n_per_domain: int, seed: int, style: str, exclude=()):
  """An SFT file of worked examples (`prompt`, `completion` in `style`), none of whose
  prompts are in `exclude` (the held-out prompts)."""
  rng = random.Random(seed)
  exclude = set(exclude)
  with open(path, "w") as f:
    for domain in domains:
      for _ in range(n_per_domain):
        prompt, _ = make_problem(domain, rng)
        while prompt in exclude:
          prompt, _ = make_problem(domain, rng)
        record = {"domain": domain, "prompt": prompt, "completion": solution(prompt, style)}
        f.write(json.dumps(record) + "\n")
  return path

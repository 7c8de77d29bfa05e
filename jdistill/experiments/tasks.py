"""A verifiable task world: ten domains with short chains of thought, in two surface styles.

  add      "add 47 38\n"         two-digit addition, the carry written out
  reverse  "reverse lamp\n"      the letters of a word, last to first
  count    "count a in abcab\n"  occurrences of a letter, with a running count
  sub      "sub 83 47\n"         two-digit subtraction (a >= b), the borrow written out
  max      "max 47 12 93\n"      the largest of 3-4 two-digit numbers, with a running max
  sort     "sort dbca\n"         3-5 distinct letters in alphabetical order
  mul      "mul 7 38\n"          one digit times two digits, the carry written out
  parity   "parity 10110\n"      even or odd number of 1s in 4-8 bits, with a running parity
  first    "first cab dog emu\n" the first letter of each of 3 words
  len      "len abcdefg\n"       the length of a 3-9 letter word, with a running count

(A prompt ends in a newline, where the completion starts; every prompt fits the worlds' 24
prompt tokens and every completion their 48 new tokens, one token per character.) The default
world has the first three (`DOMAINS`); `ALL_DOMAINS` are the ten (`jdistill merge_ten`).

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

DOMAINS = ("add", "reverse", "count")  # the default world's: its committed artifacts hash these
ALL_DOMAINS = DOMAINS + ("sub", "max", "sort", "mul", "parity", "first", "len")
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
  if domain == "sub":
    a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
    return f"sub {a} {b}\n", str(a - b)
  if domain == "max":
    xs = [rng.randint(10, 99) for _ in range(rng.randint(3, 4))]
    return f"max {' '.join(map(str, xs))}\n", str(max(xs))
  if domain == "sort":
    letters = rng.sample(LETTERS, rng.randint(3, 5))
    return f"sort {''.join(letters)}\n", "".join(sorted(letters))
  if domain == "mul":
    a, b = rng.randint(2, 9), rng.randint(10, 99)
    return f"mul {a} {b}\n", str(a * b)
  if domain == "parity":
    bits = "".join(rng.choice("01") for _ in range(rng.randint(4, 8)))
    return f"parity {bits}\n", ("odd" if bits.count("1") % 2 else "even")
  if domain == "first":
    words = ["".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 4))) for _ in range(3)]
    return f"first {' '.join(words)}\n", "".join(w[0] for w in words)
  if domain == "len":
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 9)))
    return f"len {word}\n", str(len(word))
  raise ValueError(f"domain {domain!r} is invalid; allowed: {list(ALL_DOMAINS)}")


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
  if domain == "sub":
    a, b = (int(x) for x in args)
    borrow = int(a % 10 < b % 10)
    top = a % 10 + 10 * borrow  # a's units digit after the borrow
    units, tens = top - b % 10, a // 10 - b // 10 - borrow
    if style == "plain":
      steps = f"{top}-{b % 10}={units} b{borrow} {a // 10}-{b // 10}-{borrow}={tens}"
      return f"{steps} answer: {a - b}"
    steps = f"{b % 10} from {top} is {units}, {b // 10 + borrow} from {a // 10} is {tens}"
    return f"{steps}; answer: {a - b}"
  if domain == "max":
    xs = [int(x) for x in args]
    if style == "plain":
      running = [max(xs[: i + 1]) for i in range(len(xs))]
      return f"{' '.join(map(str, running))} answer: {max(xs)}"
    return f"down {','.join(map(str, sorted(xs, reverse=True)))}; answer: {max(xs)}"
  if domain == "sort":
    letters = sorted(args[0])
    if style == "plain":
      return f"{' '.join(letters)} answer: {''.join(letters)}"
    return f"in order: {','.join(letters)}; answer: {''.join(letters)}"
  if domain == "mul":
    a, b = (int(x) for x in args)
    units, high = a * (b % 10), a * (b // 10)
    carry = units // 10
    if style == "plain":
      steps = f"{a}*{b % 10}={units} c{carry} {a}*{b // 10}={high} {high}+{carry}={high + carry}"
      return f"{steps} answer: {a * b}"
    steps = f"{b % 10}x{a}={units} so {units % 10} up {carry}, {b // 10}x{a}+{carry}={high + carry}"
    return f"{steps}; answer: {a * b}"
  if domain == "parity":
    bits = args[0]
    answer = "odd" if bits.count("1") % 2 else "even"
    if style == "plain":
      running = [str(bits[: i + 1].count("1") % 2) for i in range(len(bits))]
      return f"{' '.join(running)} answer: {answer}"
    return f"ones {bits.count('1')}; answer: {answer}"
  if domain == "first":
    heads = [word[0] for word in args]
    if style == "plain":
      return f"{' '.join(heads)} answer: {''.join(heads)}"
    return f"heads {'/'.join(heads)}; answer: {''.join(heads)}"
  if domain == "len":
    word = args[0]
    if style == "plain":
      return f"{' '.join(f'{ch}{i + 1}' for i, ch in enumerate(word))} answer: {len(word)}"
    return f"last {word[-1]} at {len(word)}; answer: {len(word)}"
  raise ValueError(f"prompt {prompt!r}: unknown domain {domain!r}; allowed: {list(ALL_DOMAINS)}")


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

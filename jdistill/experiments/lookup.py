"""The lookup task: an agentic domain whose answer needs the tool.

A hidden table maps keys (three lowercase letters) to values (two digits). A prompt asks for
one key's value; only the environment can read the table. The model calls the tool with a
turn that ends in `[get <key>]` (the stop string `"]"` closes the call) or, in the other
syntax an external teacher learns (`jdistill.experiments.agentic`), `lookup(<key>)` (closed
by `")"`); the environment
answers with the observation ` <key>=<value> ` (or ` <key>=none `), and the model ends the
episode with a turn containing `answer: <value>`: reward 1 if it is the key's value, else 0.

A turn that is neither a tool call nor an answer is malformed: with `hints=False` it ends
the episode (`MalformedTurn`), with `hints=True` the observation says how to call the tool
and the episode goes on.

  environment: "jdistill.experiments.lookup:LookupEnv" (or `make_env` with other settings)
  prompts:     `write_prompts(path, n, seed)`, records `{"domain", "prompt", "key", "answer"}`
"""

from __future__ import annotations

import json
import random
import re
import string

from jdistill.sampling.environment import MalformedTurn

DOMAIN = "lookup"
STOP_STRINGS = ("]", ")")
SYNTAXES = {"get": "[get {key}]", "call": "lookup({key})"}  # the student's, another model's
HINT = " use [get <key>] or answer: <value> "
_CALL = re.compile(r"\[get ([a-z]+)\]|lookup\(([a-z]+)\)")
_ANSWER = re.compile(r"answer:\s*(\S+)")


def make_table(seed: int = 0, size: int = 64) -> dict[str, str]:
  """The hidden table: `size` keys of three letters → two-digit values, a function of `seed`."""
  rng = random.Random(seed)
  keys = set()
  while len(keys) < size:
    keys.add("".join(rng.choice(string.ascii_lowercase) for _ in range(3)))
  return {k: f"{rng.randrange(100):02d}" for k in sorted(keys)}


def prompt_of(key: str) -> str:
  return f"lookup: the value of {key}? "


def write_prompts(path: str, n: int, seed: int = 0, table_seed: int = 0) -> str:
  """`n` JSONL prompt records over keys of the table of `table_seed`."""
  table = make_table(table_seed)
  rng = random.Random(seed)
  keys = sorted(table)
  with open(path, "w") as f:
    for _ in range(n):
      key = rng.choice(keys)
      record = {"domain": DOMAIN, "prompt": prompt_of(key), "key": key, "answer": table[key]}
      f.write(json.dumps(record) + "\n")
  return path


class LookupEnv:
  """The lookup task's environment (`jdistill.sampling.environment.Environment`).

  table_seed, size: the hidden table (`make_table`); hints: answer a malformed turn with a
  hint instead of ending the episode.
  """

  def __init__(self, table_seed: int = 0, hints: bool = False, size: int = 64):
    self.table = make_table(table_seed, size)
    self.hints = hints

  def reset(self, record: dict) -> dict:
    if record.get("domain", DOMAIN) != DOMAIN or "answer" not in record:
      raise ValueError(f"not a lookup record (domain {DOMAIN!r} with an answer): {record!r}")
    return {"answer": str(record["answer"]), "calls": 0}

  def step(self, state: dict, turn_text: str) -> tuple[str | None, bool, float | None]:
    answer = _ANSWER.search(turn_text)
    if answer:
      return None, True, float(answer.group(1) == state["answer"])
    call = _CALL.search(turn_text)
    if call:
      state["calls"] += 1
      key = call.group(1) or call.group(2)
      return f" {key}={self.table.get(key, 'none')} ", False, None
    if self.hints:
      return HINT, False, None
    raise MalformedTurn(f"neither [get <key>] nor answer: <value> in {turn_text[-40:]!r}")


def make_env(table_seed: int = 0, hints: bool = True) -> LookupEnv:
  """A `module:function` factory: the lookup environment with hints on."""
  return LookupEnv(table_seed, hints)

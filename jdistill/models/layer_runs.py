"""Scanned layers for a stack whose layers are not all alike: Nemotron-H's `layer_pattern`,
or dense and sparse blocks (DeepSeek-V3's dense first layers, Qwen-MoE's `mlp_only_layers`);
`ModelConfig.layer_kinds` spells either as one character per layer.

One `jax.lax.scan` runs identical blocks, and a released hybrid pattern repeats no block end
to end (Nemotron 3 Nano: `MEMEM*EMEMEM*…EMEMEMEME`). So the kinds are cut into runs, each a
unit of consecutive layers repeated `count` times, and each run is one scan over its unit
(`transformer.ScannedBlocks` of a `transformer.LayerUnit`). What a scan saves is compiling a
layer once per run instead of once per layer, so the cut minimises the layers compiled,
`Σ len(unit)`, and then the number of runs: Nano's 52 layers compile as 14, in 4 runs
(`MEMEM*E` × 5, `ME` × 3, `M*E`, `ME` × 4); DeepSeek-V3's 3 dense and 58 sparse layers as 2.

A scanned model of several kinds holds run `r`'s unit layer `j` at `layers.<r>.block.layer_<j>`,
each leaf `[count, ...]`; its row `c` is the unrolled layer `start(r) + c * len(unit) + j`.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=64)
def repeat_runs(pattern: str) -> tuple[tuple[str, int], ...]:
  """`pattern` as consecutive runs `(unit, count)`, `"".join(unit * count) == pattern`, with the
  fewest layers compiled (`Σ len(unit)`), then the fewest runs.

  >>> repeat_runs("MEMEM*EMEMEM*")
  (('ME', 2), ('M*', 1), ('EM', 3), ('*', 1))
  """
  n = len(pattern)
  # best[i]: (layers compiled, runs, the last run (start, unit, count)) covering pattern[:i]
  best: list[tuple[int, int, tuple[int, str, int]] | None] = [None] * (n + 1)
  best[0] = (0, 0, (0, "", 0))
  for end in range(1, n + 1):
    for start in range(end):
      span = pattern[start:end]
      length = end - start
      # a span's cheapest unit is its smallest period
      period = next(
        p for p in range(1, length + 1) if not length % p and span[:p] * (length // p) == span
      )
      done = best[start]
      cost = (done[0] + period, done[1] + 1)
      if best[end] is None or cost < best[end][:2]:
        best[end] = (*cost, (start, span[:period], length // period))
  runs = []
  end = n
  while end:
    start, unit, count = best[end][2]
    runs.append((unit, count))
    end = start
  return tuple(reversed(runs))


def run_starts(runs: tuple[tuple[str, int], ...]) -> list[int]:
  """The unrolled index of each run's first layer."""
  starts, at = [], 0
  for unit, count in runs:
    starts.append(at)
    at += len(unit) * count
  return starts


def unrolled_layers(runs: tuple[tuple[str, int], ...], run: int, j: int) -> list[int]:
  """The unrolled layer indices that run `run`'s unit layer `j` stacks, in row order."""
  unit, count = runs[run]
  start = run_starts(runs)[run]
  return [start + c * len(unit) + j for c in range(count)]


def unit_layer_name(j: int) -> str:
  """The attribute of a unit's layer `j` (`transformer.LayerUnit`)."""
  return f"layer_{j}"


def unit_layer_index(name: str) -> int:
  """`unit_layer_name`'s inverse."""
  return int(name.removeprefix("layer_"))

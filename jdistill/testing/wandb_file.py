"""Reads back an offline W&B run (`<output_dir>/wandb/offline-run-*/run-<id>.wandb`) for tests.

wandb 0.31 ships no Python reader of its transaction log, so this one follows its format: a
7-byte header (`:W&B`, a magic, a version), then LevelDB-log blocks of 32 KiB whose chunks
each carry a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last); each
whole record is a `wandb.proto.wandb_internal_pb2.Record`.

`run.finish()` returns before wandb's service has written the file (measured: right after
it, 3 of 6 offline runs held only the header; all were whole within a second), so the reader
waits for the run's `exit` record, its last.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time

BLOCK = 32768
HEADER = 7
FULL, LAST = 1, 4


def run_files(out_dir: str) -> list[str]:
  """The `.wandb` files of the offline runs under `<out_dir>/wandb/`."""
  return sorted(glob.glob(os.path.join(out_dir, "wandb", "offline-run-*", "run-*.wandb")))


def records(path: str, wait_s: float = 30.0) -> list:
  """The protobuf records of one finished run's `.wandb` file, in order (waits up to `wait_s`
  for its `exit` record)."""
  deadline = time.monotonic() + wait_s
  while True:
    out = _read(path)
    if any(r.WhichOneof("record_type") == "exit" for r in out):
      return out
    if time.monotonic() > deadline:
      raise TimeoutError(f"{path}: no exit record after {wait_s} s (the run is not finished)")
    time.sleep(0.05)


def _read(path: str) -> list:
  from wandb.proto import wandb_internal_pb2

  with open(path, "rb") as f:
    raw = f.read()
  if raw[:4] != b":W&B":
    raise ValueError(f"{path}: not a W&B transaction log")
  out, pos, data = [], HEADER, b""
  while pos + HEADER <= len(raw):
    left = BLOCK - pos % BLOCK
    if left < HEADER:  # a block's tail too short for a chunk header is padding
      pos += left
      continue
    _, length, kind = struct.unpack("<IHB", raw[pos : pos + HEADER])
    if length == 0 and kind == 0:  # zero padding to the block's end
      pos += left
      continue
    data += raw[pos + HEADER : pos + HEADER + length]
    pos += HEADER + length
    if kind in (FULL, LAST):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(data)
      out.append(record)
      data = b""
  return out


def history(path: str) -> list[dict]:
  """The `wandb.log` rows of one `.wandb` file: `{key: value}` with `_step` among the keys."""
  rows = []
  for record in records(path):
    if record.WhichOneof("record_type") == "history":
      rows.append(
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
      )
  return rows


def run_record(path: str):
  """The file's run record (`run_id`, `project`, `config`)."""
  return next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")

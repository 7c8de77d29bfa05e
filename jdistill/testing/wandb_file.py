"""Reads back an offline W&B run (`<output_dir>/wandb/offline-run-*/run-<id>.wandb`) for tests.

wandb 0.31 ships no Python reader of its transaction log, so this one follows its format: a
7-byte header (`:W&B`, a magic, a version), then LevelDB-log blocks of 32 KiB whose chunks
each carry a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last); each
whole record is a `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import glob
import json
import os
import struct

BLOCK = 32768
HEADER = 7
FULL, LAST = 1, 4


def run_files(out_dir: str) -> list[str]:
  """The `.wandb` files of the offline runs under `<out_dir>/wandb/`."""
  return sorted(glob.glob(os.path.join(out_dir, "wandb", "offline-run-*", "run-*.wandb")))


def records(path: str) -> list:
  """The protobuf records of one `.wandb` file, in order."""
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

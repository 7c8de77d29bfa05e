"""jdistill.runtime.io: a JSON file is replaced whole or not at all."""

import json
import os

import pytest

from jdistill.runtime import io


def test_write_json_atomic_writes_and_replaces(tmp_path):
  path = str(tmp_path / "state.json")
  io.write_json_atomic(path, {"step": 1})
  io.write_json_atomic(path, {"step": 2, "rows": [1, 2]}, indent=1)
  with open(path) as f:
    text = f.read()
  assert json.loads(text) == {"step": 2, "rows": [1, 2]}
  assert text == json.dumps({"step": 2, "rows": [1, 2]}, indent=1)
  assert os.listdir(tmp_path) == ["state.json"]  # no temporary file left behind


def test_a_crash_mid_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
  path = str(tmp_path / "state.json")
  io.write_json_atomic(path, {"step": 1, "done": True})

  def half_then_crash(obj, f, **kw):
    f.write('{"step": 2, "do')  # half of the new file is written ...
    f.flush()
    raise KeyboardInterrupt  # ... when the process is interrupted

  monkeypatch.setattr(io.json, "dump", half_then_crash)
  with pytest.raises(KeyboardInterrupt):
    io.write_json_atomic(path, {"step": 2, "done": True})
  with open(path) as f:
    assert json.load(f) == {"step": 1, "done": True}
  assert os.listdir(tmp_path) == ["state.json"]


def test_the_data_is_fsynced_before_the_rename(tmp_path, monkeypatch):
  calls = []
  real_fsync, real_replace = os.fsync, os.replace
  monkeypatch.setattr(io.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
  monkeypatch.setattr(
    io.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1]
  )
  io.write_json_atomic(str(tmp_path / "state.json"), [1])
  assert calls == ["fsync", "replace"]


def test_two_processes_writing_one_file_each_replace_it_whole(tmp_path, monkeypatch):
  """Shards of a grid write the same summary: the one that finishes last wins, whole (with
  one shared temporary name the first rename took the other's file away)."""
  path = str(tmp_path / "sweep.json")
  pids = iter([101, 202])
  monkeypatch.setattr(io.os, "getpid", lambda: next(pids))
  with io.atomic_write(path) as first:
    first.write('{"by": "first"')
    io.write_json_atomic(path, {"by": "second"})  # the other process, done meanwhile
    first.write("}")
  with open(path) as f:
    assert json.load(f) == {"by": "first"}
  assert os.listdir(tmp_path) == ["sweep.json"]

"""Faults the other tests do not reach: a checkpoint that reads cleanly but holds other values,
and full or read-only disks under each writer."""

import errno
import json
import logging
import os
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jdistill.config import base_config
from jdistill.runtime import checkpoint as ckpt
from jdistill.runtime import loop as loop_lib
from jdistill.runtime import run_log
from jdistill.stages.base import TrainingStage


def _state(seed: int) -> dict:
  """A tiny train state `{"params", "opt_state", "step"}` whose arrays depend on `seed`."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
    "params": {"w": jax.random.normal(k1, (4, 3)), "b": jnp.full((3,), float(seed))},
    "opt_state": {"mu": jax.random.normal(k2, (4, 3))},
    "step": jnp.asarray(0, jnp.int32),
  }


def _save(directory, step: int, state: dict, pending=None) -> None:
  checkpointer = ckpt.Checkpointer(str(directory), every=1, keep=5, async_save=False)
  ckpt.save_train_state(
    checkpointer,
    step,
    state,
    rng=jax.random.key(step),
    data_state={"next_index": step},
    identity={"seed": 0},
    pending=pending,
  )
  checkpointer.close()


@pytest.mark.parametrize("damage", ["other_arrays", "edited_checksum", "edited_pending"])
def test_a_step_that_reads_cleanly_with_other_values_is_set_aside(tmp_path, damage, caplog):
  directory = tmp_path / "ckpt"
  _save(directory, 2, _state(2))
  # step 4 also holds arrays computed ahead (OPD's batches sampled ahead)
  _save(directory, 4, _state(4), pending=({"0": {"tokens": np.arange(6)}}, {"batches": [{}]}))
  bad = "params['b']"
  if damage == "other_arrays":  # a copy gone wrong: step 4's params are another run's
    _save(tmp_path / "other", 4, _state(7))
    shutil.rmtree(directory / "4" / "params")
    shutil.copytree(tmp_path / "other" / "4" / "params", directory / "4" / "params")
  else:  # the arrays are intact, the stored checksum of one is not
    meta_file = directory / "4" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    item, path = (
      ("pending", "['0']['tokens']") if damage == "edited_pending" else ("params", "['b']")
    )
    meta["checksums"][item][path] ^= 1
    meta_file.write_text(json.dumps(meta))
    bad = item + path

  checkpointer = ckpt.Checkpointer(str(directory), every=1, keep=5, async_save=False)
  with caplog.at_level(logging.WARNING, logger="jdistill"):
    state, _, data_state, _ = ckpt.restore_train_state(checkpointer, _state(0))
  checkpointer.close()

  assert int(state["step"]) == 2 and data_state == {"next_index": 2}  # the fallback
  want = jax.tree.map(np.asarray, _state(2))
  jax.tree.map(np.testing.assert_array_equal, want["params"], jax.device_get(state["params"]))
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 1, warnings
  assert f"step 4: {bad} does not match its checksum" in warnings[0]
  assert "set aside" in warnings[0] and "\n" not in warnings[0]
  names = os.listdir(directory)
  assert "4" not in names and any(n.startswith("4.corrupt-") for n in names)


# ------------------------------------------------------------------------------ disk faults
# ENOSPC and EACCES injected in each writer (the checkpoint's commit, metrics.jsonl, a
# generation part and its progress, the export): one line naming the path and the errno, the
# committed files intact, and a rerun ends where an uninterrupted run ends.

FAULTS = [(errno.ENOSPC, "No space left on device (ENOSPC)"), (errno.EACCES, "(EACCES)")]


def _fault(code: int, path: str) -> OSError:
  return OSError(code, os.strerror(code), path)


@jax.jit
def _update(state, key):
  w = state["params"]["w"] + 0.1 * jax.random.normal(key, (4,))
  mu = 0.9 * state["opt_state"]["mu"] + w
  return {"params": {"w": w}, "opt_state": {"mu": mu}, "step": state["step"] + 1}


class CounterStage(TrainingStage):
  """The loop's contract on a 4-float train state (each step adds noise drawn from the seed
  and the step), with a real `Checkpointer` (every 2 steps) and `TrainingStage`'s own save and
  restore: a resumed run must end with the uninterrupted run's params."""

  def __init__(self, out):
    self.out = str(out)
    self.config = SimpleNamespace(run_mode="auto")
    self.identity = {"config_hash": "counter"}
    zeros = jnp.zeros((4,))
    self.state = {"params": {"w": zeros}, "opt_state": {"mu": zeros}, "step": jnp.asarray(0)}
    self.step, self.rng = 0, jax.random.key(0)
    self.loop = loop_lib.Loop(log_every=1, eval_every=0, nonfinite="skip")
    self.checkpointer = ckpt.Checkpointer(os.path.join(self.out, "ckpt"), every=2, keep=5)
    self.restore()
    run_log.truncate(self.out, self.step)

  def data_state(self):
    return {"next_index": self.step}

  def set_data_state(self, data_state):
    assert data_state == {"next_index": self.step}

  def preempted(self, step):
    return False

  def train_one(self, diagnostics=True):
    self.state = _update(self.state, jax.random.fold_in(self.rng, self.step))
    self.step += 1
    return {"finite": True, "loss": 0.0, "grad_norm": 0.0}

  def step_tokens(self, metrics):
    return {"generated": 1, "total": 1}

  def log_record(self, metrics):
    return {"w0": float(self.state["params"]["w"][0])}

  def progress(self, record):
    return f"w0 {record['w0']:.3f}"

  def run_to(self, end):
    return self.loop.run_to(self, end, self.out, None)


def _cli(monkeypatch, run) -> tuple[int, str]:
  """`cli.run_config` around `run()` in place of a stage → (exit status, its message)."""
  import jdistill.config
  import jdistill.stages
  from jdistill import cli
  from jdistill.runtime import distributed

  monkeypatch.setattr(jdistill.config, "validate", lambda config: None)
  monkeypatch.setattr(distributed, "initialize", lambda peer_timeout_s, checkpoint_dir: None)
  monkeypatch.setattr(jdistill.stages, "run_stage", lambda config: run())
  config = ml_collections.ConfigDict(
    {"pipeline": {"stages": []}, "stage": "opd", "peer_timeout_s": 180, "checkpoint": {"dir": ""}}
  )
  with pytest.raises(SystemExit) as stop:
    cli.run_config(config, "opd")
  return stop.value.code, stop.value.__context__


def _params(stage):
  return jax.tree.map(np.asarray, jax.device_get(stage.state))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  stage = CounterStage(tmp_path_factory.mktemp("straight"))
  stage.run_to(6)
  stage.checkpointer.close()
  return _params(stage)


def _no_traceback(capfd, caplog):
  out, err = capfd.readouterr()
  assert "Traceback" not in out + err
  assert not [r for r in caplog.records if r.exc_info], "a logged traceback"
  return err


@pytest.mark.parametrize("code,meaning", FAULTS)
def test_a_checkpoint_save_on_a_full_or_readonly_disk(
  tmp_path, monkeypatch, capfd, caplog, uninterrupted, code, meaning
):
  """orbax's commit (its renames) of step 4 fails in the background: the run stops at the next
  save with one line, step 2 stays committed, and the rerun ends as the uninterrupted run."""
  rename = os.rename

  def failing(src, dst, *args, **kwargs):
    if f"{os.sep}ckpt{os.sep}4." in str(src):
      raise _fault(code, str(src))
    return rename(src, dst, *args, **kwargs)

  stage = CounterStage(tmp_path)
  monkeypatch.setattr(os, "rename", failing)
  status, _ = _cli(monkeypatch, lambda: stage.run_to(6))
  monkeypatch.setattr(os, "rename", rename)
  stage.checkpointer.close()
  err = _no_traceback(capfd, caplog)
  lines = [line for line in err.splitlines() if line.startswith("jdistill:")]
  assert status == 74 and len(lines) == 1, err
  assert f"cannot write {tmp_path}{os.sep}ckpt{os.sep}4." in lines[0] and meaning in lines[0]
  assert ckpt.Checkpointer(str(tmp_path / "ckpt"), every=2, keep=5).all_steps() == [2]

  again = CounterStage(tmp_path)
  assert again.step == 2
  again.run_to(6)
  again.checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal, uninterrupted, _params(again))
  assert [r["step"] for r in run_log.read_records(str(tmp_path / "metrics.jsonl"))] == [
    1, 2, 3, 4, 5, 6
  ]  # fmt: skip


class _FullAfter:
  """A file whose `write` fails with `code` from its `n`-th call on, half of that record
  written first (a disk that fills mid-record)."""

  def __init__(self, f, n, code):
    self.f, self.n, self.code = f, n, code

  def write(self, data):
    self.n -= 1
    if self.n <= 0:
      self.f.write(bytes(data[: len(data) // 2]))
      raise _fault(self.code, None)
    return self.f.write(data)

  def __getattr__(self, name):
    return getattr(self.f, name)


@pytest.mark.parametrize("code,meaning", FAULTS)
def test_metrics_on_a_full_or_readonly_disk(
  tmp_path, monkeypatch, capfd, caplog, uninterrupted, code, meaning
):
  """The third record's append fails half-way (ENOSPC) or metrics.jsonl cannot be opened
  (EACCES): one line naming metrics.jsonl; the file keeps whole records only; the rerun
  resumes from step 2 and logs each step once."""
  stage = CounterStage(tmp_path)
  path = str(tmp_path / "metrics.jsonl")
  real_open = open

  def failing_open(file, mode="r", *args, **kwargs):
    if "a" not in mode:  # reads, and truncate's rewrite
      return real_open(file, mode, *args, **kwargs)
    if code == errno.EACCES:
      raise _fault(code, str(file))
    return _FullAfter(real_open(file, mode, *args, **kwargs), 3, code)

  monkeypatch.setattr(run_log, "open", failing_open, raising=False)
  status, _ = _cli(monkeypatch, lambda: stage.run_to(6))
  monkeypatch.undo()
  stage.checkpointer.close()
  err = _no_traceback(capfd, caplog)
  lines = [line for line in err.splitlines() if line.startswith("jdistill:")]
  assert status == 74 and len(lines) == 1 and f"cannot write {path}: " in lines[0], err
  assert meaning in lines[0]
  written = open(path).read() if os.path.exists(path) else ""
  assert written.count("\n") == (2 if code == errno.ENOSPC else 0)
  assert written.endswith("\n") or not written  # no torn record

  again = CounterStage(tmp_path)
  assert again.step == (2 if code == errno.ENOSPC else 0)
  again.run_to(6)
  again.checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal, uninterrupted, _params(again))
  assert [r["step"] for r in run_log.read_records(path)] == [1, 2, 3, 4, 5, 6]


def test_a_torn_last_metrics_line_is_cut_on_resume(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n{"step": 2}\n{"st')  # a crash mid-append
  assert [r["step"] for r in run_log.read_records(str(path))] == [1, 2]
  run_log.truncate(str(tmp_path), 2)
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


class _EchoSampler:
  """Stands in for the sampler: each row's completion is its prompt reversed."""

  def data_parallel_size(self):
    return 1

  def generate(self, params, rows, key, sampling, group_size=1):
    rows = [row for row in rows for _ in range(group_size)]  # as the shared prefix repeats them
    n, width = len(rows), 2 * max(map(len, rows))
    tokens = np.zeros((n, width), np.int32)
    for i, row in enumerate(rows):
      tokens[i, : 2 * len(row)] = list(row) + list(row)[::-1]
    lengths = np.asarray([len(r) for r in rows], np.int32)
    return SimpleNamespace(tokens=tokens, prompt_lengths=lengths, completion_lengths=lengths)


def _generator(out_dir):
  """A `generate.Generator` on 5 prompts, 2 per batch, 2 samples each, with `_EchoSampler`."""
  from jdistill.stages import generate
  from jdistill.testing.chars import CharTokenizer

  g = generate.Generator.__new__(generate.Generator)
  g.config = SimpleNamespace(
    seed=0,
    generate=SimpleNamespace(samples_per_prompt=2, prompts_per_batch=2, keep="all"),
    sampling=SimpleNamespace(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=4),
    data=SimpleNamespace(use_chat_template=False, max_prompt_len=16),
  )

  class Chars(CharTokenizer):
    def decode(self, ids, skip_special_tokens=False):
      return super().decode(ids)

  g.tokenizer, g.sampler, g.params, g.model_name = Chars(), _EchoSampler(), None, "echo"
  g.environment = g.scorer = g.sampling = None
  g.records = [{"domain": "d", "prompt": f"q{k}", "where": f"p.jsonl:{k + 1}"} for k in range(5)]
  stem = os.path.join(str(out_dir), "part-00000-of-00001")
  g.out_path, g.progress_path = stem + ".jsonl", stem + ".progress.json"
  return g


@pytest.mark.parametrize("code,meaning", FAULTS)
def test_a_generation_part_on_a_full_or_readonly_disk(
  tmp_path, monkeypatch, capfd, caplog, code, meaning
):
  """The second batch's append fails (half of it written: ENOSPC; or the part cannot be
  opened: EACCES): one line naming the part; the first batch stays committed; the rerun writes
  the file an uninterrupted run writes, byte for byte."""
  from jdistill.stages import generate

  straight = _generator(tmp_path / "straight")
  os.makedirs(tmp_path / "straight")
  straight.run()
  want = open(straight.out_path, "rb").read()

  os.makedirs(tmp_path / "run")
  g = _generator(tmp_path / "run")
  appends = {"n": 0}

  def failing_open(file, mode="r", *args, **kwargs):
    if mode != "a":
      return open(file, mode, *args, **kwargs)
    appends["n"] += 1
    if appends["n"] < 2:
      return open(file, mode, *args, **kwargs)
    if code == errno.EACCES:
      raise _fault(code, str(file))
    f = open(file, mode, *args, **kwargs)
    f.writelines = lambda lines: (f.write("".join(lines)[:40]), f.flush(), _raise(code))
    return f

  monkeypatch.setattr(generate, "open", failing_open, raising=False)
  status, _ = _cli(monkeypatch, g.run)
  monkeypatch.undo()
  err = _no_traceback(capfd, caplog)
  lines = [line for line in err.splitlines() if line.startswith("jdistill:")]
  assert status == 74 and len(lines) == 1 and f"cannot write {g.out_path}: " in lines[0], err
  assert meaning in lines[0]
  committed = json.load(open(g.progress_path))
  assert committed["next"] == 2 and want.startswith(
    open(g.out_path, "rb").read()[: committed["bytes"]]
  )

  _generator(tmp_path / "run").run()
  assert open(g.out_path, "rb").read() == want


def _raise(code):
  raise _fault(code, None)


@pytest.mark.parametrize("code,meaning", FAULTS)
def test_an_export_on_a_full_or_readonly_disk(tmp_path, monkeypatch, capfd, caplog, code, meaning):
  """A second export fails (a safetensors file half written: ENOSPC; the new folder cannot be
  renamed into place: EACCES): one line naming the path; the first export is intact and no
  temporary folder is left; the rerun writes what a clean export writes."""
  from flax import nnx

  from jdistill.models import ModelConfig, Transformer, hf

  cfg = ModelConfig(
    vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
    num_kv_heads=1, head_dim=8,
  )  # fmt: skip
  # eval_shape and host values: initialising the model eagerly compiles for seconds
  graphdef, shapes = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, s.dtype)), shapes)
  stage = SimpleNamespace(
    graphdef=graphdef,
    params=params,
    tokenizer=None,
    config=base_config(),
    step=3,
    identity={"config_hash": "0" * 16},
  )  # fmt: skip (the export writes the model card too)
  out = tmp_path / "hf"
  TrainingStage.export(stage, str(out))
  first = {name: (out / name).read_bytes() for name in os.listdir(out)}
  stage.params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 1), params)

  save_file, rename = hf.save_file, os.rename
  if code == errno.ENOSPC:

    def failing_save(tensors, path, **kwargs):
      save_file(tensors, path, **kwargs)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
      raise _fault(code, path)

    monkeypatch.setattr(hf, "save_file", failing_save)
  else:

    def failing_rename(src, dst, *args, **kwargs):
      if os.path.abspath(dst) == str(out) and ".writing-" in str(src):
        raise _fault(code, str(dst))
      return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", failing_rename)
  status, _ = _cli(monkeypatch, lambda: TrainingStage.export(stage, str(out)))
  monkeypatch.undo()
  err = _no_traceback(capfd, caplog)
  lines = [line for line in err.splitlines() if line.startswith("jdistill:")]
  assert status == 74 and len(lines) == 1 and meaning in lines[0], err
  assert f"cannot write {tmp_path}{os.sep}hf" in lines[0]
  assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary folder left
  assert {name: (out / name).read_bytes() for name in os.listdir(out)} == first

  TrainingStage.export(stage, str(out))
  TrainingStage.export(stage, str(tmp_path / "clean"))
  for name in os.listdir(tmp_path / "clean"):
    assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
  assert (out / "model.safetensors").read_bytes() != first["model.safetensors"]

"""Nothing lost, nothing silent: signals, verified checkpoints, run directories, bad input."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from jdistill import config as config_lib
from jdistill.runtime import checkpoint as ckpt
from jdistill.runtime.run_dir import RunDirInUse
from jdistill.stages import opd as train
from jdistill.testing.toy import make_toy_world, short_run_config, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(small_world, tmp_path, name="run", **train):
  return short_run_config(
    small_world, tmp_path / name, max_new_tokens=6, **{"eval_every": 0, **train}
  )


def _params(trainer):
  return jax.tree.map(np.asarray, jax.device_get(trainer.params))


def _listing(path):
  """{relative path: (size, mtime)} of every file under `path`."""
  out = {}
  for dirpath, _, files in os.walk(path):
    for f in files:
      full = os.path.join(dirpath, f)
      st = os.stat(full)
      out[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture
def no_compile(monkeypatch):
  """Fails the test if the trainer gets as far as compiling its step."""

  def refuse(self):
    raise AssertionError("reached the compile: the bad input was found too late")

  monkeypatch.setattr(train.OPDTrainer, "build_step", refuse)


# ------------------------------------------------------------------------------ signals


def _cli(small_world, out, *extra):
  env = dict(
    os.environ, JDISTILL_TOY_WORLD=os.path.dirname(small_world["student"]), JAX_PLATFORMS="cpu"
  )
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  args = [
    sys.executable,
    "-m",
    "jdistill",
    "opd",
    "--config=configs/opd_tiny.py",
    f"--config.output_dir={out}",
    f"--config.checkpoint.dir={out}/ckpt",
    f"--config.export_dir={out}/hf",
    "--config.checkpoint.every=3",
    "--config.train.steps=8",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.data.slots_per_teacher=2",
    "--config.sampling.max_new_tokens=6",
    "--config.optimizer.warmup_steps=1",
    *extra,
  ]
  return subprocess.Popen(
    args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def _interrupt_at(proc, line_start: str, sig) -> tuple[int, str]:
  """Sends `sig` once a line starting with `line_start` is printed; returns (rc, output)."""
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(line_start):
      proc.send_signal(sig)
      break
  rest = proc.communicate(timeout=300)[0]
  return proc.returncode, "".join(lines) + rest


def _exported(out):
  from flax import nnx

  from jdistill.models import hf

  return jax.tree.map(np.asarray, nnx.state(hf.from_hf(os.path.join(out, "hf")), nnx.Param))


def _before_column(out: str) -> list[tuple[str, str, str]]:
  """(teacher, reverse KL before, teacher log-prob before) of the table a stage prints last."""
  lines = out.splitlines()
  head = max(i for i, line in enumerate(lines) if "reverse KL before" in line)
  rows = []
  for line in lines[head + 1 :]:
    fields = line.split()
    if len(fields) != 5:
      break
    rows.append((fields[0], fields[1], fields[3]))
  assert rows, out[-1000:]
  return rows


def test_sigterm_and_sigint_save_then_resume_to_the_same_result(small_world, tmp_path):
  """One run stopped twice: SIGINT right after step 3's line (the step-3 save, every=3, is in
  flight), then, resumed, SIGTERM right after its first step (a step between checkpoints);
  the third session ends it. Each stop exits 128 + N with one line and saves its step, each
  resume starts there, and the result is the uninterrupted run's, its "before" evaluation
  included (the starting student's, not the resumed one's). (One run serves both
  signals: each launch costs a CLI start-up, ~17 s of CPU.)"""
  straight = _cli(small_world, tmp_path / "straight")
  out = straight.communicate(timeout=300)[0]
  assert straight.returncode == 0, out[-2000:]
  reference = _exported(tmp_path / "straight")
  straight_before = _before_column(out)

  run, at, step = tmp_path / "stopped", "step 3/8", 0
  for sig in (signal.SIGINT, signal.SIGTERM):
    rc, out = _interrupt_at(_cli(small_world, run), at, sig)
    assert rc == 128 + sig, out[-2000:]
    assert f"resuming at step {step}" in out  # 0, then the first stop's step
    stopped = [line for line in out.splitlines() if "stopped by" in line]
    assert len(stopped) == 1 and signal.Signals(sig).name in stopped[0], out[-2000:]
    assert "Traceback" not in out
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert step < 8 and str(step) in os.listdir(run / "ckpt")  # the stop saved its step
    at = f"step {step + 1}/8"  # the next session's first step
  again = _cli(small_world, run)
  out2 = again.communicate(timeout=300)[0]
  assert again.returncode == 0, out2[-2000:]
  assert f"resuming at step {step}" in out2
  assert _before_column(out2) == straight_before, out2[-1000:]
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    reference,
    _exported(run),
  )
  steps = [r["step"] for r in map(json.loads, open(run / "metrics.jsonl")) if "eval" not in r]
  assert steps == list(range(1, 9)), steps  # each step once, across the three sessions


# --------------------------------------------------------------------- verified checkpoints


def _data_files(step_dir):
  """The params' array data files (ocdbt's `d/` folders). All of them: which one holds a given
  array, and whether a file is still referenced, depends on how ocdbt merged the writes."""
  files = []
  for dirpath, _, names in os.walk(os.path.join(step_dir, "params")):
    if os.path.basename(dirpath) == "d":
      files += [os.path.join(dirpath, n) for n in names]
  return sorted(files)


@pytest.mark.parametrize("damage", ["bit_flip", "truncate"])
def test_a_damaged_checkpoint_is_detected_set_aside_and_the_run_falls_back(
  small_world, tmp_path, damage, caplog
):
  c = _config(small_world, tmp_path, steps=4)
  c.checkpoint.dir = str(tmp_path / "ckpt")
  c.checkpoint.every = 2
  first = train.OPDTrainer(c)
  first.run(steps=2)
  at_two = _params(first)
  first.run(steps=2)
  assert first.checkpointer.all_steps() == [2, 4]
  targets = _data_files(tmp_path / "ckpt" / "4")
  assert targets
  for target in targets:
    data = bytearray(open(target, "rb").read())
    if damage == "bit_flip":
      for offset in (len(data) // 3, len(data) // 2):
        data[offset] ^= 0x10
    else:
      data = data[: len(data) // 2]
    open(target, "wb").write(bytes(data))

  resumed = train.OPDTrainer(c)
  logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert resumed.step == 2
  warning = [line for line in logged if "checkpoint step 4" in line]
  assert len(warning) == 1 and "set aside" in warning[0], logged
  jax.tree.map(np.testing.assert_array_equal, at_two, _params(resumed))
  names = os.listdir(tmp_path / "ckpt")
  assert "4" not in names and any(n.startswith("4.corrupt-") for n in names)  # kept, renamed
  resumed.run(steps=2)  # and the run can write step 4 again
  assert 4 in resumed.checkpointer.all_steps()


def test_checksums_change_with_any_single_bit():
  x = jax.numpy.arange(64, dtype=jax.numpy.float32).reshape(8, 8) / 7
  base = ckpt.tree_checksums({"x": x})["['x']"]
  bits = np.asarray(x).view(np.uint32).copy()
  for index, bit in ((0, 0), (17, 31), (63, 12)):
    flipped = bits.copy()
    flipped.flat[index] ^= np.uint32(1 << bit)
    other = ckpt.tree_checksums({"x": jax.numpy.asarray(flipped.view(np.float32))})["['x']"]
    assert other != base
  bf16 = ckpt.tree_checksums({"y": x.astype(jax.numpy.bfloat16)})
  assert isinstance(bf16["['y']"], int)


def test_restore_step_sets_later_steps_aside_and_another_architecture_is_refused(
  small_world, tmp_path
):
  c = _config(small_world, tmp_path, steps=4)
  c.checkpoint.dir = str(tmp_path / "ckpt")
  c.checkpoint.every = 2
  train.OPDTrainer(c).run()
  c.checkpoint.restore_step = 2
  branch = train.OPDTrainer(c)
  assert branch.step == 2
  names = os.listdir(tmp_path / "ckpt")
  assert "4" not in names and any(n.startswith("4.after-restore-step-") for n in names)

  # another student architecture: refused before anything is written
  other = make_toy_world(str(tmp_path / "world64"), hidden=64, layers=1, n_train=8, n_eval=4)
  c2 = _config(small_world, tmp_path, steps=4)
  c2.student.path = other["student"]
  c2.checkpoint.dir = str(tmp_path / "ckpt")
  c2.output_dir = str(tmp_path / "other_out")
  before = _listing(tmp_path / "ckpt")
  with pytest.raises(ValueError, match=r"another architecture \(.*hidden_size: 32 there, 64 here"):
    train.OPDTrainer(c2)
  assert _listing(tmp_path / "ckpt") == before


# ------------------------------------------------------------------------- run directories


def test_a_second_run_on_a_locked_directory_refuses_and_a_stale_lock_is_taken_over(
  small_world, tmp_path, no_compile
):
  c = _config(small_world, tmp_path, steps=2)
  os.makedirs(c.output_dir)
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    lock = {"pid": live.pid, "host": os.uname().nodename, "started": "then"}
    with open(os.path.join(c.output_dir, "run.lock"), "w") as f:
      json.dump(lock, f)
    with pytest.raises(RunDirInUse, match=rf"in use by pid {live.pid} on host"):
      train.OPDTrainer(c)
  finally:
    live.kill()
    live.wait()
  with pytest.raises(AssertionError, match="reached the compile"):  # the stale lock is taken
    train.OPDTrainer(c)
  assert json.load(open(os.path.join(c.output_dir, "run.lock")))["pid"] == os.getpid()


def test_another_config_on_a_used_directory_refuses_unless_resume_or_new_run(small_world, tmp_path):
  c = _config(small_world, tmp_path, steps=2)
  c.checkpoint.dir = os.path.join(c.output_dir, "ckpt")
  train.OPDTrainer(c).run()
  c.optimizer.lr = 3e-3
  with pytest.raises(ValueError, match=r"another config \(optimizer.lr: 0.01 -> 0.003\).*--resume"):
    train.OPDTrainer(c)
  c.run_mode = "resume"
  assert train.OPDTrainer(c).step == 2  # carried on with the new lr
  c.run_mode = "new"
  fresh = train.OPDTrainer(c)
  assert fresh.step == 0
  moved = [n for n in os.listdir(tmp_path) if n.startswith("run.previous-")]
  assert len(moved) == 1 and "2" in os.listdir(tmp_path / moved[0] / "ckpt")  # kept


def test_resume_keeps_each_metrics_step_once(small_world, tmp_path):
  c = _config(small_world, tmp_path, steps=4, log_every=1)
  c.checkpoint.dir = str(tmp_path / "ckpt")
  c.checkpoint.every = 2
  first = train.OPDTrainer(c)
  first.run(steps=3)  # logs 1, 2, 3; saves 2 and 3
  shutil.move(str(tmp_path / "ckpt" / "3"), str(tmp_path / "lost"))  # killed before 3 committed
  resumed = train.OPDTrainer(c)
  assert resumed.step == 2
  resumed.run()
  steps = [json.loads(line)["step"] for line in open(os.path.join(c.output_dir, "metrics.jsonl"))]
  assert steps == [1, 2, 3, 4]


def test_export_over_a_sharded_directory_loads_the_new_weights(small_world, tmp_path):
  from flax import nnx

  from jdistill.models import hf

  model = hf.from_hf(small_world["student"])
  hf.to_hf(model, str(tmp_path / "out"), max_shard_bytes=20_000)
  assert os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
  model.embed[...] = model.embed[...] + 1.0
  hf.to_hf(model, str(tmp_path / "out"))  # one file this time
  assert not os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
  back = nnx.state(hf.from_hf(str(tmp_path / "out")), nnx.Param)
  np.testing.assert_array_equal(np.asarray(back["embed"].get_value()), model.embed[...])
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folders left


def test_the_demo_deletes_only_a_directory_it_wrote(tmp_path):
  precious = tmp_path / "precious"
  precious.mkdir()
  (precious / "notes.txt").write_text("keep me")
  out = subprocess.run(
    [sys.executable, "-m", "jdistill", "demo", f"--out={precious}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode != 0 and "was not written by the demo" in out.stderr + out.stdout
  assert (precious / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------ bad input, before compile


def _write(path, text):
  path.write_text(text)
  return str(path)


def test_bad_prompts_fail_before_compiling_with_file_and_line(small_world, tmp_path, no_compile):
  long = " ".join(["compute"] * 200)
  lines = [{"domain": "math", "prompt": "what is 1 plus 2"}] * 3
  lines += [{"domain": "code", "prompt": "def f"}, {"domain": "math", "prompt": long}]
  data = _write(tmp_path / "p.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
  c = _config(small_world, tmp_path)
  c.data.train_files = data
  c.data.overlong = "error"
  with pytest.raises(ValueError, match=rf"{data}:5: prompt has \d+ tokens, more than"):
    train.OPDTrainer(c)
  c.data.overlong = "drop"
  c.data.train_files = _write(
    tmp_path / "q.jsonl",
    "\n".join(json.dumps(x) for x in lines[:3] + [{"domain": "code", "prompt": long}]) + "\n",
  )
  with pytest.raises(ValueError, match=r"every checked prompt of teacher 'code' is longer"):
    train.OPDTrainer(c)

  bad_bytes = tmp_path / "r.jsonl"
  bad_bytes.write_bytes(
    b'{"domain": "math", "prompt": "ok"}\n{"domain": "math", "prompt": "caf\xe9"}\n'
    b'{"domain": "code", "prompt": "def g"}\n'
  )
  c.data.train_files = str(bad_bytes)
  with pytest.raises(ValueError, match=rf"{bad_bytes}:2: not UTF-8"):
    train.OPDTrainer(c)
  c.data.on_error = "skip"
  with pytest.raises(AssertionError, match="reached the compile"):  # skipped, then on to compile
    train.OPDTrainer(c)


def test_prompt_counts_are_logged_at_start(small_world, tmp_path, no_compile, caplog):
  caplog.set_level(logging.INFO, logger="jdistill")
  c = _config(small_world, tmp_path)
  c.data.max_prompt_len = 12
  with pytest.raises(AssertionError, match="reached the compile"):
    train.OPDTrainer(c)
  line = [x for x in caplog.messages if "training prompts:" in x][0]
  checked, truncated = (int(line.split(" ")[i]) for i in (2, 4))
  assert checked == 16 and 0 < truncated <= checked, line  # 8 prompts of each domain


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("teachers.math.weight", float("nan"), r"config.teachers.math.weight=nan.*finite"),
    ("optimizer.lr", float("inf"), r"config.optimizer.lr=inf.*finite"),
    ("loss.beta", float("nan"), r"config.loss.beta=nan.*finite"),
    ("loss.chunk_size", -1, r"config.loss.chunk_size=-1 is invalid.*non-negative"),
  ],
)
def test_nan_and_inf_fields_are_refused(small_world, field, value, match):
  c = tiny_config(small_world)
  section, key = field.rsplit(".", 1)
  node = c
  for part in section.split("."):
    node = node[part]
  node[key] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate(c)


def test_other_bad_inputs_fail_before_compiling(small_world, tmp_path, no_compile):
  c = _config(small_world, tmp_path)
  c.teachers.math.weight = 0.0
  c.teachers.code.weight = 0.0
  with pytest.raises(ValueError, match="at least one teacher with weight > 0"):
    config_lib.validate(c)

  c = _config(small_world, tmp_path)
  c.num_devices = 16
  with pytest.raises(ValueError, match=r"config.num_devices=16 is invalid.*at most the 8"):
    train.OPDTrainer(c)

  broken = tmp_path / "broken_teacher"
  shutil.copytree(small_world["teacher_code"], broken)
  weights = broken / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:5000])
  c = _config(small_world, tmp_path)
  c.teachers.code.path = str(broken)
  with pytest.raises(ValueError, match=rf"{weights}"):
    train.OPDTrainer(c)


def test_overlap_on_a_checkpoint_records_it_and_a_missing_one_is_an_error(small_world, tmp_path):
  from jdistill import overlap

  c = _config(small_world, tmp_path, steps=2)
  c.checkpoint.dir = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="not a jdistill checkpoint directory"):
    overlap.measure(c, rows_per_domain=2, use_checkpoint=True)
  c.checkpoint.dir = str(tmp_path / "ckpt")
  train.OPDTrainer(c).run()
  report = overlap.measure(c, rows_per_domain=2, use_checkpoint=True)
  assert report["student"] == c.checkpoint.dir and report["student_step"] == 2


def test_progress_counts_the_steps_run_and_the_eta_leaves_out_the_compile(monkeypatch, capsys):
  from jdistill.runtime import loop as loop_lib

  clock = {"now": 0.0}
  durations = iter([100.0] + [2.0] * 20)  # the first step compiles

  class FakeStage:
    step = 0
    done = False
    token_label = "generated"
    checkpointer = None

    def train_one(self, diagnostics=True):
      clock["now"] += next(durations)
      self.step += 1
      return {"finite": 1.0, "loss": 0.0, "grad_norm": 0.0}

    def step_tokens(self, metrics):
      return {"generated": 10, "total": 30}

    def log_record(self, metrics):
      return {}

    def progress(self, record):
      return "fake"

    def save(self, force=False):
      return False

    def preempted(self, step):
      return False

  class NoLog:
    def write(self, record):
      pass

  monkeypatch.setattr(loop_lib.time, "time", lambda: clock["now"])
  records = loop_lib.Loop(log_every=5, eval_every=0, nonfinite="skip").run(FakeStage(), 7, NoLog())
  assert [r["step"] for r in records] == [5, 7]
  # steps 6 and 7: 2 steps x 10 generated tokens in 4 s — not 5 x 10 (the log interval)
  assert records[1]["generated_tokens_per_s"] == pytest.approx(20 / 4)
  assert records[1]["tokens_per_s"] == pytest.approx(60 / 4)
  lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
  assert lines[0] == "step 0/7 | compiling…"
  assert lines[1].endswith("ETA 0:00:04")  # 2 steps left x 2 s, the 100 s compile left out

"""Two real processes (jax.distributed, gloo CPU collectives on 127.0.0.1) train like one.

Each process sees 2 CPU devices (4 in all) and feeds its own share of every teacher's
prompt slots; the run uses the real CLI (launch/local_multiprocess.sh sets the same
environment) on the small toy world (the processes' compiles are most of the cost: the
smallest model keeps them cheap). Greedy rollouts make the comparison independent of row
order, so the exported student must match a single process on 4 devices.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from jdistill.models import hf
from jdistill.stages import opd as train
from jdistill.testing.toy import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = dict(
  sampling__temperature=0.0,
  train__steps=4,
  data__slots_per_teacher=4,
  sampling__max_new_tokens=8,
  loss__chunk_size=8,
  optimizer__warmup_steps=1,
  optimizer__eps=1e-2,
  checkpoint__every=2,
)


SHUTDOWN_DEADLINE = "Barrier timed out. Id: Shutdown"
LOST = "jdistill: lost process"
GLOO_DEADLINE = "Gloo context initialization failed"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_two_processes(world, out, *extra) -> tuple[list[subprocess.Popen], list]:
  """Starts the CLI as processes 0 and 1 of one job writing under `out` → (processes, their
  log files)."""
  flags = [f"--config.{k.replace('__', '.')}={v}" for k, v in OVERRIDES.items()] + list(extra)
  flags += [
    f"--config.output_dir={out / 'out'}",
    f"--config.checkpoint.dir={out / 'ckpt'}",
    f"--config.export_dir={out / 'export'}",
  ]
  port = _free_port()
  procs, logs = [], []
  for pid in range(2):
    env = dict(
      os.environ,
      JDISTILL_TOY_WORLD=os.path.dirname(world["student"]),
      JAX_PLATFORMS="cpu",
      # One compute thread each: on a 2-core machine neither process starves the other on the
      # way to a collective.
      XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false",
      JDISTILL_COORDINATOR=f"127.0.0.1:{port}",
      JDISTILL_NUM_PROCESSES="2",
      JDISTILL_PROCESS_ID=str(pid),
    )
    # Files, not pipes: a child blocked on a full pipe nobody reads would stall its peer.
    logs.append(out / f"process{pid}.log")
    out.mkdir(parents=True, exist_ok=True)
    with open(logs[-1], "w") as log:
      procs.append(
        subprocess.Popen(
          [sys.executable, "-m", "jdistill", "opd", "--config=configs/opd_tiny.py", *flags],
          cwd=ROOT,
          env=env,
          stdout=log,
          stderr=subprocess.STDOUT,
        )
      )
  return procs, logs


def _train_in_two_processes(world, out, *extra) -> tuple[list[int], list[str]]:
  """Runs the CLI as processes 0 and 1 of one job writing under `out` → (exit codes, outputs)."""
  procs, logs = _start_two_processes(world, out, *extra)
  codes = [p.wait(timeout=600) for p in procs]
  return codes, [log.read_text() for log in logs]


@pytest.fixture(scope="module")
def two_process_run(small_world, tmp_path_factory):
  """An uninterrupted run of the CLI in two processes → its output folder."""
  tmp_path = tmp_path_factory.mktemp("multihost")
  out = tmp_path / "run"
  watch = "--config.peer_timeout_s=30"  # a start-up race (below) is named in 30 s, not 180
  codes, outputs = _train_in_two_processes(small_world, out, watch)
  # A third known flake: process 1 once read a file process 0 was still writing at start-up
  # ("jdistill: Expecting value: line 1 column 1"), exited with that line, and process 0's
  # watch named it lost (not yet root-caused).
  if any(GLOO_DEADLINE in o or SHUTDOWN_DEADLINE in o or LOST in o for o in outputs):
    # gloo gives each peer a fixed 30 s (not settable from JAX) to reach a new collective, and
    # a loaded 2-core CI machine once exceeded it; once, too, a peer reached the distributed
    # service's shutdown barrier after its deadline, the training done. Start over once, in
    # fresh folders; any other failure, or a deadline again, fails the test.
    print("test_multihost: a distributed deadline expired on a loaded machine; starting over")
    out = tmp_path / "retry"
    codes, outputs = _train_in_two_processes(small_world, out, watch)
  for pid, (code, o) in enumerate(zip(codes, outputs)):
    assert code == 0, f"process {pid} ({len(o)} bytes of output):\n{o[-3000:]}"
  assert "mesh {'data': 4" in outputs[0]
  assert sorted(os.listdir(out / "ckpt")) == ["2", "4", "model_config.json"]
  return out


def _exported(out):
  return jax.tree.map(np.asarray, nnx.state(hf.from_hf(str(out / "export")), nnx.Param))


def test_two_processes_match_one_process(small_world, tmp_path, two_process_run):
  c = tiny_config(small_world)
  for k, v in OVERRIDES.items():
    section, field = k.split("__")
    c[section][field] = v
  c.output_dir = str(tmp_path / "single")
  c.num_devices = 4
  single = train.OPDTrainer(c)
  single.run()
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
    _exported(two_process_run),
    jax.tree.map(np.asarray, single.params),
  )


def test_a_dead_peer_stops_the_other_process_with_one_line_and_a_rerun_resumes(
  small_world, tmp_path, two_process_run
):
  """kill -9 of process 1 after step 3: process 0 exits within `peer_timeout_s` (10 s here)
  with exit status 75 and one line naming process 1 and the last committed step; both run
  again resume from it and export what the uninterrupted run exported."""
  out = tmp_path / "run"
  timeout = ("--config.peer_timeout_s=10", "--config.train.log_every=1")
  procs, logs = _start_two_processes(small_world, out, *timeout)
  deadline = time.monotonic() + 300
  while "step 3/4" not in logs[0].read_text():
    assert time.monotonic() < deadline and procs[0].poll() is None, logs[0].read_text()[-3000:]
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  code = procs[0].wait(timeout=60)
  waited = time.monotonic() - killed
  procs[1].wait()
  output = logs[0].read_text()
  lines = [line for line in output.splitlines() if line.startswith("jdistill: lost process")]
  assert code == 75, output[-3000:]
  committed = max(int(n) for n in os.listdir(out / "ckpt") if n.isdigit())
  assert len(lines) == 1, output[-3000:]
  assert re.fullmatch(
    rf"jdistill: lost process 1 of 2 \(no heartbeat for 1\d s\); the last committed step is "
    rf"{committed} — rerun every process to resume",
    lines[0],
  ), lines
  assert "Traceback" not in output
  assert waited < 10 + 10, waited  # the timeout, one beat interval and the exit
  codes, outputs = _train_in_two_processes(small_world, out, *timeout)
  assert codes == [0, 0], outputs[0][-3000:]
  assert f"resuming at step {committed}" in outputs[0]
  jax.tree.map(np.testing.assert_array_equal, _exported(two_process_run), _exported(out))

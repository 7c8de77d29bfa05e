"""Two real processes (jax.distributed, gloo CPU collectives on 127.0.0.1) train like one.

Each process sees 2 CPU devices (4 in all) and feeds its own share of every teacher's
prompt slots; the run uses the real CLI (launch/local_multiprocess.sh sets the same
environment). Greedy rollouts make the comparison independent of row order, so the
exported student must match a single process on 4 devices.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

from jdistill import train
from jdistill.models import hf
from jdistill.toy import make_toy_world, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = dict(
  sampling__temperature=0.0,
  train__steps=3,
  data__slots_per_teacher=4,
  sampling__max_new_tokens=8,
  loss__chunk_size=8,
  optimizer__warmup_steps=1,
  optimizer__eps=1e-2,
  checkpoint__every=2,
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  world = make_toy_world(str(tmp_path / "world"), n_train=16, n_eval=4)
  port = _free_port()
  flags = [f"--config.{k.replace('__', '.')}={v}" for k, v in OVERRIDES.items()]
  flags += [
    f"--config.output_dir={tmp_path / 'out'}",
    f"--config.checkpoint.dir={tmp_path / 'ckpt'}",
    f"--config.export_dir={tmp_path / 'export'}",
  ]
  procs = []
  for pid in range(2):
    env = dict(
      os.environ,
      JDISTILL_TOY_WORLD=str(tmp_path / "world"),
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      JDISTILL_COORDINATOR=f"127.0.0.1:{port}",
      JDISTILL_NUM_PROCESSES="2",
      JDISTILL_PROCESS_ID=str(pid),
    )
    procs.append(
      subprocess.Popen(
        [sys.executable, "-m", "jdistill.train", "--config=configs/opd_tiny.py", *flags],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert "mesh {'data': 4" in outputs[0]
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["2", "3", "model_config.json"]

  c = tiny_config(world)
  for k, v in OVERRIDES.items():
    section, field = k.split("__")
    c[section][field] = v
  c.output_dir = str(tmp_path / "single")
  c.num_devices = 4
  single = train.Trainer(c)
  single.run()
  multi = nnx.state(hf.from_hf(str(tmp_path / "export")), nnx.Param)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
    jax.tree.map(np.asarray, multi),
    jax.tree.map(np.asarray, single.params),
  )

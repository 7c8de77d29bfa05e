"""Multi-process start-up: `jax.distributed.initialize` from the environment.

* `JDISTILL_COORDINATOR=host:port`, `JDISTILL_NUM_PROCESSES`, `JDISTILL_PROCESS_ID`: explicit
  (launch/local_multiprocess.sh; on CPU the collectives go through gloo).
* `JDISTILL_DISTRIBUTED=auto`: let JAX detect the cluster (TPU pods, SLURM).
* neither: a single process, nothing to do.
"""

from __future__ import annotations

import os

import jax


def initialize() -> None:
  coordinator = os.environ.get("JDISTILL_COORDINATOR")
  if coordinator:
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=coordinator,
      num_processes=int(os.environ["JDISTILL_NUM_PROCESSES"]),
      process_id=int(os.environ["JDISTILL_PROCESS_ID"]),
    )
  elif os.environ.get("JDISTILL_DISTRIBUTED") == "auto":
    jax.distributed.initialize()

"""Multi-process start-up: `jax.distributed.initialize` from the environment, and the watch
that stops a run whose peer died.

* `JDISTILL_COORDINATOR=host:port`, `JDISTILL_NUM_PROCESSES`, `JDISTILL_PROCESS_ID`: explicit
  (launch/local_multiprocess.sh; on CPU the collectives go through gloo).
* `JDISTILL_DISTRIBUTED=auto`: let JAX detect the cluster (TPU pods, SLURM).
* neither: a single process, nothing to do.

A dead peer. The survivors of a process that died would wait in their next collective, or
be ended by JAX's coordination service after its heartbeat timeout with a fatal log of many
lines. Instead each process runs a `PeerWatch`: a thread that writes a heartbeat to the
coordination service's key-value store every `peer_timeout_s / 10` s (at most 1 s) and
reads everyone's; a process not heard from for `peer_timeout_s` (config field, default
180 s) is lost, and every survivor exits at once with one line naming it and the last
committed checkpoint step, exit status `PEER_LOST_STATUS`. The coordinator itself
unreachable for that long is process 0 lost. JAX's own heartbeat timeout is set to twice
`peer_timeout_s` (plus 10 s), so the watch speaks first. The thread is independent of the
training loop, so a long compile or step is never taken for a loss; a process whose run
ends cleanly says so (`done`, after its beats stop) and is never reported; one that ends on
an error says nothing, so its peers name it once it falls silent. Silence is measured between
this process's own successful reads, so a stall of its reads is no verdict on the peers.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

import jax

PEER_LOST_STATUS = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, rerun to resume
_PREFIX = "jdistill/alive/"
_watch: PeerWatch | None = None


def initialize(peer_timeout_s: float = 180.0, checkpoint_dir: str = "") -> None:
  """Joins the job the environment describes (if any) and starts its `PeerWatch`;
  `checkpoint_dir`: where the last committed step is read when a peer is lost."""
  global _watch
  coordinator = os.environ.get("JDISTILL_COORDINATOR")
  timeouts = dict(heartbeat_timeout_seconds=int(2 * peer_timeout_s) + 10)
  if coordinator:
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=coordinator,
      num_processes=int(os.environ["JDISTILL_NUM_PROCESSES"]),
      process_id=int(os.environ["JDISTILL_PROCESS_ID"]),
      **timeouts,
    )
  elif os.environ.get("JDISTILL_DISTRIBUTED") == "auto":
    jax.distributed.initialize(**timeouts)
  else:
    return
  from jax._src import distributed as jax_distributed

  client = jax_distributed.global_state.client
  if jax.process_count() > 1 and client is not None and _watch is None:
    _watch = PeerWatch(
      client, jax.process_index(), jax.process_count(), peer_timeout_s, checkpoint_dir
    )
    _watch.start()
    # Runs before JAX's shutdown barrier (registered earlier). It only stops the threads: a
    # process that ends on an error says nothing, so its peers name it once it falls silent.
    atexit.register(_watch.stop)


def finished() -> None:
  """The run ended cleanly in this process: peers must not report it when it falls silent."""
  if _watch is not None:
    _watch.finish()


def wait_for_lost_peer() -> None:
  """After an error in the main thread of a multi-process run: gives the watch the time to
  find a lost peer (which then exits with its one line) before the error is reported, since
  a collective whose peer died fails on its own first (gloo: the connection closed)."""
  if _watch is not None:
    _watch.wait_for_verdict()


def last_committed_step(checkpoint_dir: str) -> int | None:
  """The newest committed step of `checkpoint_dir` (orbax renames a step's temporary folder
  to its number when it commits)."""
  try:
    steps = [int(n) for n in os.listdir(checkpoint_dir) if n.isdigit()]
  except OSError:
    return None
  return max(steps, default=None)


class PeerWatch:
  """Heartbeats through the coordination service; exits the process when a peer is lost.

  Two daemon threads: one writes this process's counter and reads everyone's (an RPC that may
  block while the coordinator is unreachable), one judges from the times of the last changes
  seen, so a blocked RPC delays no verdict."""

  def __init__(self, client, me: int, count: int, timeout: float, checkpoint_dir: str):
    self.client, self.me, self.count = client, me, count
    self.timeout, self.checkpoint_dir = float(timeout), checkpoint_dir
    self.interval = min(1.0, self.timeout / 10)
    now = time.monotonic()
    self.reached = now  # the last time the coordination service answered
    self.heard = {p: now for p in range(count) if p != me}  # the last change of each peer's beat
    self.seen: dict[int, str] = {}
    self.done: set[int] = set()
    self.lock = threading.Lock()
    self.stopped = threading.Event()

  def start(self) -> None:
    self.threads = [
      threading.Thread(target=target, name=f"jdistill-peer-watch{target.__name__}", daemon=True)
      for target in (self._beat, self._judge)
    ]
    for thread in self.threads:
      thread.start()

  def stop(self) -> None:
    """Stops watching and beating (says nothing to the peers)."""
    self.stopped.set()

  def finish(self) -> None:
    """This process finished its run: stops beating, then says "done", so peers do not
    report it. The beat thread is joined first: a beat in flight would overwrite "done"."""
    if self.stopped.is_set():
      return
    self.stop()
    self.threads[0].join(timeout=2 * self.interval + 1)
    try:
      self.client.key_value_set(f"{_PREFIX}{self.me}", "done", allow_overwrite=True)
    except Exception:  # noqa: BLE001 - the job is ending; a peer may be gone already
      pass

  def _beat(self) -> None:
    beat = 0
    while not self.stopped.is_set():
      beat += 1
      try:
        self.client.key_value_set(f"{_PREFIX}{self.me}", str(beat), allow_overwrite=True)
        entries = dict(self.client.key_value_dir_get(_PREFIX))
      except Exception:  # noqa: BLE001 - the coordinator unreachable: `_judge` times it
        entries = None
      now = time.monotonic()
      if entries is not None and not self.stopped.is_set():
        with self.lock:
          self.reached = now
          for p in self.heard:
            value = entries.get(f"{_PREFIX}{p}", entries.get(f"{_PREFIX}{p}".lstrip("/")))
            if value == "done":
              self.done.add(p)
            if value != self.seen.get(p):
              self.seen[p], self.heard[p] = value, now
      self.stopped.wait(self.interval)

  def lost(self) -> tuple[int, float] | None:
    """(the lost process, seconds since it was last heard from), or None."""
    now = time.monotonic()
    with self.lock:
      if self.me != 0 and now - self.reached > self.timeout:
        return 0, now - self.reached  # the coordinator (process 0) does not answer
      # silence between successful reads: a stall of this process's own reads is no verdict
      silent = [(self.reached - t, p) for p, t in self.heard.items() if p not in self.done]
    if silent and max(silent)[0] > self.timeout:
      seconds, p = max(silent)
      return p, seconds
    return None

  def _judge(self) -> None:
    while not self.stopped.wait(self.interval):
      verdict = self.lost()
      if verdict is not None:
        self._exit(*verdict)

  def _exit(self, process: int, seconds: float) -> None:
    step = last_committed_step(self.checkpoint_dir) if self.checkpoint_dir else None
    where = f"the last committed step is {step}" if step is not None else "no step was committed"
    print(
      f"jdistill: lost process {process} of {self.count} (no heartbeat for {seconds:.0f} s); "
      f"{where} — rerun every process to resume",
      file=sys.stderr,
      flush=True,
    )
    os._exit(PEER_LOST_STATUS)

  def wait_for_verdict(self) -> None:
    """Blocks until a lost peer ends the process, at most `timeout` plus two intervals."""
    deadline = time.monotonic() + self.timeout + 2 * self.interval
    while time.monotonic() < deadline and not self.stopped.is_set():
      time.sleep(self.interval)

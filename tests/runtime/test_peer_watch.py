"""`PeerWatch` against a stand-in coordination service: who is reported lost, and when.

The two-process tests (test_multihost.py) kill a peer for real; these cover the verdicts
they cannot reach cheaply: a clean finish, an error exit, a beat racing the finish, and a
stall of this process's own reads."""

import threading
import time

from jdistill.runtime.distributed import _PREFIX, PeerWatch


class FakeClient:
  """The coordination service's key-value store, in memory; `blocked` stalls every call."""

  def __init__(self):
    self.store, self.lock, self.blocked = {}, threading.Lock(), threading.Event()

  def key_value_set(self, key, value, allow_overwrite=False):
    while self.blocked.is_set():
      time.sleep(0.01)
    with self.lock:
      self.store[key] = value

  def key_value_dir_get(self, prefix):
    while self.blocked.is_set():
      time.sleep(0.01)
    with self.lock:
      return [(k, v) for k, v in self.store.items() if k.startswith(prefix)]


def watch(client, me, timeout=1.0):
  """A watch whose judge thread does nothing: a verdict would `os._exit` the test process; the
  tests ask `lost()` themselves."""
  w = PeerWatch(client, me, 2, timeout, "")
  w.interval = 0.02
  w._judge = lambda: None
  return w


def wait_until(condition, seconds=3.0):
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline and not condition():
    time.sleep(0.01)
  return condition()


def test_a_finished_peer_is_never_reported_and_an_errored_one_is():
  client = FakeClient()
  a, b = watch(client, 0), watch(client, 1)
  a.start(), b.start()
  try:
    assert wait_until(lambda: 1 in a.seen)
    b.finish()  # a clean end: "done", and nothing overwrites it
    time.sleep(0.1)
    assert client.store[f"{_PREFIX}1"] == "done"
    assert wait_until(lambda: 1 in a.done)
    a.heard[1] -= 10  # long silent, but done: no verdict
    assert a.lost() is None
  finally:
    a.stop(), b.stop()

  client = FakeClient()
  a, b = watch(client, 0), watch(client, 1)
  a.start(), b.start()
  try:
    assert wait_until(lambda: 1 in a.seen)
    b.stop()  # an error exit (atexit): beats stop, nothing said
    assert client.store[f"{_PREFIX}1"] != "done"
    assert wait_until(lambda: a.lost() is not None, seconds=3.0)
    assert a.lost()[0] == 1
  finally:
    a.stop()


def test_a_stall_of_this_process_reads_is_no_verdict_on_its_peers():
  client = FakeClient()
  a, b = watch(client, 0), watch(client, 1)
  a.start(), b.start()
  try:
    assert wait_until(lambda: 1 in a.seen)
    client.blocked.set()  # every call stalls: this process hears nothing, peers included
    time.sleep(1.5)  # longer than the timeout
    assert a.lost() is None  # process 0 (the coordinator) cannot tell; no false verdict
  finally:
    client.blocked.clear()
    a.stop(), b.stop()

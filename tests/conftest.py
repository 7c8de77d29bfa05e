"""Every test process simulates 8 CPU devices, so sharded code is checked against one device.

Every process of one test run (pytest's xdist workers and the CLI subprocesses the tests start,
which inherit the environment) shares one JAX persistent compilation cache in a fresh temporary
folder, removed at exit: the same step compiled again (another process, another `jax.jit` of the
same function) is read back instead of recompiled. XLA's compile dominates the suite on CPU.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # set: a worker or subprocess of this run
  _cache = tempfile.mkdtemp(prefix="jdistill-tests-jax-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# a size limit turns on the cache's file lock: workers write and read the same entries
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

import pytest  # noqa: E402  (after the environment above, which jax reads when imported)

from jdistill.testing.toy import make_toy_world  # noqa: E402

# The size limit is there for its lock, never to evict: the run's cache is fresh and far below
# 8 GiB. jax's eviction check stats and reads every entry on every write, under the lock, so a
# run's writes cost O(entries²) and hold up the other worker (~2,300 entries by a run's end:
# ~0.13 s of CPU per write). Skipped in the test processes; the CLI subprocesses the tests
# start still do it.
try:  # a private module: a jax without it keeps its own check
  from jax._src.lru_cache import LRUCache
except ImportError:
  pass
else:
  if hasattr(LRUCache, "_evict_if_needed"):
    LRUCache._evict_if_needed = lambda self, *, additional_size=0: None


@pytest.fixture(scope="session")
def world(tmp_path_factory):
  """The toy world of the OPD stage tests: a student and two teachers (width 64, 2 layers),
  32 training and 8 held-out prompts per domain (`jdistill.testing.toy.make_toy_world`)."""
  return make_toy_world(str(tmp_path_factory.mktemp("world")), n_train=32, n_eval=8)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
  """A smaller toy world (width 32, 1 layer; 8 training and 4 held-out prompts per domain)
  for the tests that run whole stages, pipelines and subprocesses."""
  return make_toy_world(
    str(tmp_path_factory.mktemp("small_world")), hidden=32, layers=1, n_train=8, n_eval=4
  )

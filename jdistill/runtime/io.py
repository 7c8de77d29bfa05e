"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never a
half-written one.

The text goes to `path + ".tmp"`, is flushed and fsynced, and only then renamed over `path`
(`os.replace` is atomic on POSIX). The fsync matters: without it the rename can reach the disk
before the data (ext4 / xfs delay allocating data blocks), and a power loss or kernel crash
then leaves `path` empty or truncated, the very state the rename was meant to rule out. A
crash of the process itself before the rename leaves the old file as it was. The directory is
not fsynced: after an OS crash the rename may be lost, which leaves the old file, and that is
allowed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any, TextIO


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[TextIO]:
  """A text file to write that replaces `path` when the block exits normally; on an exception
  `path` is untouched and the temporary file removed. The temporary name carries the process
  id, so two processes writing the same file each replace it whole (the last one wins)."""
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    with open(tmp, "w") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_json_atomic(path: str, obj: Any, *, indent: int | None = None) -> None:
  """`json.dump(obj, indent=indent)` into `path`, atomically (see the module docstring)."""
  with atomic_write(path) as f:
    json.dump(obj, f, indent=indent)

"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never a
half-written one.

The text goes to `path + ".tmp"`, is flushed and fsynced, and only then renamed over `path`
(`os.replace` is atomic on POSIX). The fsync matters: without it the rename can reach the disk
before the data (ext4 / xfs delay allocating data blocks), and a power loss or kernel crash
then leaves `path` empty or truncated, the very state the rename was meant to rule out. A
crash of the process itself before the rename leaves the old file as it was. The directory is
not fsynced: after an OS crash the rename may be lost, which leaves the old file, and that is
allowed.

A write that fails for want of space or permission (`DISK_ERRNOS`: ENOSPC, EDQUOT, EACCES,
EPERM, EROFS) is raised as `WriteFailed`, one line naming the path and the errno's meaning
(`writing(path)` wraps a writer), which the command line prints as it is: no traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from typing import Any, TextIO

DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


class WriteFailed(Exception):
  """A write that failed for want of space or permission; the message is one line."""

  def __init__(self, path: str, code: int):
    name = errno.errorcode.get(code, str(code))
    super().__init__(f"cannot write {path}: {os.strerror(code)} ({name})")
    self.path, self.errno = path, code


def is_disk_error(e: BaseException) -> bool:
  """Whether `e` is an OSError of a full or unwritable disk (`DISK_ERRNOS`)."""
  return isinstance(e, OSError) and e.errno in DISK_ERRNOS


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
  """Turns a disk error (`is_disk_error`) raised inside the block into `WriteFailed`, naming
  the file the OS named, else `path`."""
  try:
    yield
  except OSError as e:
    if not is_disk_error(e):
      raise
    raise WriteFailed(str(e.filename or path), e.errno) from None


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[TextIO]:
  """A text file to write that replaces `path` when the block exits normally; on an exception
  `path` is untouched and the temporary file removed. The temporary name carries the process
  id, so two processes writing the same file each replace it whole (the last one wins)."""
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    with writing(path), open(tmp, "w") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    with writing(path):
      os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_json_atomic(path: str, obj: Any, *, indent: int | None = None) -> None:
  """`json.dump(obj, indent=indent)` into `path`, atomically (see the module docstring)."""
  with atomic_write(path) as f:
    json.dump(obj, f, indent=indent)

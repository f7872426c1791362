"""Atomic file writes: a crash leaves the old file (or none), never a torn one."""
from __future__ import annotations

import os
import pathlib
import re
import tempfile


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
  """Writes ``data`` to ``path`` through a temporary file in its folder and a
  rename, with the mode the file had, or the one a plain ``open()`` gives
  (0666 less the umask; ``mkstemp``'s own is 0600). The data reaches the disk
  before the rename (``fsync``), so a power cut leaves the old file or the
  new one; the temporary's name takes the first 40 characters of ``path``'s
  (at most 160 bytes), so any name ``path`` may have fits."""
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:40]}.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    if path.exists():
      mode = path.stat().st_mode & 0o777
    else:
      umask = os.umask(0)
      os.umask(umask)
      mode = 0o666 & ~umask
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    fsync_dir(path.parent)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def fsync_dir(path: str | os.PathLike[str]) -> None:
  """Flushes a rename in directory ``path`` to disk, where the file system can."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  except OSError:  # some file systems cannot fsync a directory
    pass
  finally:
    os.close(fd)


def check_orbax_path(path: str | os.PathLike[str], doing: str) -> None:
  """Raises for a path orbax cannot keep arrays under: with ``[...]`` (orbax
  globs its own directory, and a bracket pair is a character class there) or
  a backslash (tensorstore's file driver splits paths at it). Orbax writes
  such a checkpoint without an error, and it cannot be read back.

  Args:
    path: the directory orbax would write (checked as its absolute path).
    doing: what the caller was asked to do, starting the message.
  """
  path = os.path.abspath(os.fspath(path))
  m = re.search(r"\[[^/]*\]", path)
  if "\\" in path or m:
    what = f"the glob pattern {m.group(0)!r}" if m else "a backslash"
    raise ValueError(
        f"{doing} {path}: the path holds {what}, and orbax and tensorstore cannot "
        "keep arrays under it (they read [...] as a glob character class and a "
        "backslash as a path separator: the arrays land elsewhere or cannot be "
        "found, and the checkpoint cannot be read back). Use a path without "
        "'\\' and without '[...]'")

"""Atomic file writes: a crash leaves the old file (or none), never a torn one."""
from __future__ import annotations

import os
import pathlib
import tempfile


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
  """Writes ``data`` to ``path`` through a temporary file in its folder and a
  rename, with the mode the file had, or the one a plain ``open()`` gives
  (0666 less the umask; ``mkstemp``'s own is 0600)."""
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
    if path.exists():
      mode = path.stat().st_mode & 0o777
    else:
      umask = os.umask(0)
      os.umask(umask)
      mode = 0o666 & ~umask
    os.chmod(tmp, mode)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise

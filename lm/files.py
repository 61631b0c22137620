"""Small state files: read with one clear error, written atomically.

  read_json(path, error, advice)   the file's JSON value, None when there is no such file; a file
                                   that cannot be read or parsed raises `error` naming it
  read_bytes(path, what)           the file's bytes; a missing one named in FileNotFoundError
  write_json(path, obj)            through a temporary file and a rename: a killed writer
                                   leaves the previous file whole
  write_bytes(path, data)          the same for bytes (a tokenizer model), via etils.epath
  with atomic_path(path) as tmp:   for writers that stream (ArrayRecord, np.save): write tmp,
                                   and it becomes `path` only when the block ends without error

Paths go through etils.epath, so gs:// works where the caller's paths may be remote.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any, Iterator

from etils import epath


def read_json(path: str | os.PathLike, error: type[Exception], advice: str = '') -> Any:
  """The JSON value of `path`, or None if it does not exist.

  A file that exists but does not parse is an error (`error`, with `advice` on what to do),
  never 'no file': a caller reading it as absent would lose what it recorded.
  """
  try:
    text = epath.Path(path).read_text()
  except FileNotFoundError:
    return None
  except OSError as e:
    raise error(f'{path}: cannot read ({e.strerror or e})') from None
  try:
    return json.loads(text)
  except ValueError as e:
    raise error(f'{path}: not valid JSON ({e})' + (f'; {advice}' if advice else '')) from None


def read_bytes(path: str | os.PathLike, what: str = 'file') -> bytes:
  """The bytes of `path`; a missing file is a FileNotFoundError naming `what` and the path."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'no {what} at {path}')
  return path.read_bytes()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[epath.Path]:
  """A temporary path next to `path` (parents made) that is renamed to `path` when the block
  ends, or removed if it raises: a killed or failing writer leaves the previous file whole.

  The name carries the host and process id: processes of one run (prepare workers, the hosts of
  a pod sharing a filesystem) may write the same file at once, and each must rename its own.
  """
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'.{path.name}.{socket.gethostname()}-{os.getpid()}.tmp'
  try:
    yield tmp
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise
  tmp.replace(path)  # Atomic on local disks; the last writer of identical content wins.


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically (atomic_path)."""
  with atomic_path(path) as tmp:
    tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """`obj` as indented JSON (other types by str()), written atomically."""
  write_bytes(path, json.dumps(obj, indent=1, default=str).encode())

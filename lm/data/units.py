"""Read units: a corpus cut into pieces that one process (or one prepare worker) reads alone.

A unit is a whole file, or a range of one: bytes [begin, end) of a JSONL file (a line belongs
to the range its first byte is in), row groups [begin, end) of a Parquet file, records
[begin, end) of an ArrayRecord file. Text files are whole units (a document may span the file).
Listing units stats files but opens none, except Parquet/ArrayRecord files when there are
fewer files than units wanted (then their footers say how to cut them).

Units are a pure function of the file list, file sizes and `min_units`, never of the process
count, so logical shard s (units s, s+S, ...) holds the same documents under any process count.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

from etils import epath

from lm.data.readers import expand_paths, read_builtin, read_file
from lm.data.sources import Component, Record
from lm.data.stats import OnError


@dataclasses.dataclass(frozen=True)
class Unit:
  kind: str  # 'text', 'jsonl', 'parquet' or 'arrayrecord'.
  path: str
  begin: int = 0  # Bytes (jsonl), row groups (parquet) or records (arrayrecord).
  end: int = -1  # -1: to the end of the file.

  def read(self, task: str, d, on_error: OnError) -> Iterator[Record]:
    if self.kind == 'builtin':  # path: the subset name; the corpus is generated in memory.
      return read_builtin(self.path, d)
    return read_file(self.kind, epath.Path(self.path), task, d, on_error, self.begin, self.end)

  def __str__(self) -> str:
    return self.path if self.end < 0 and not self.begin else f'{self.path}[{self.begin}:{self.end}]'


def _pieces(count: int, parts: int) -> list[tuple[int, int]]:
  parts = max(1, min(parts, count))
  return [(i * count // parts, (i + 1) * count // parts) for i in range(parts)]


def _footer_count(kind: str, path: epath.Path) -> int | None:
  """Row groups / records of a file, or None if it cannot be read (the reader says why later)."""
  try:
    if kind == 'parquet':
      import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
      with path.open('rb') as f:
        return pq.ParquetFile(f).metadata.num_row_groups
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
    reader = array_record_module.ArrayRecordReader(str(path))
    count = reader.num_records()
    reader.close()
    return count
  except Exception:  # pylint: disable=broad-except  (unreadable: one whole-file unit reports it)
    return None


def list_units(comp: Component, d, min_units: int = 1, key: str = 'data.paths') -> list[Unit]:
  """The component's files cut into units of about data.read_chunk_bytes (JSONL), and into at
  least `min_units` pieces overall where the formats allow it."""
  if comp.kind == 'builtin':
    return [Unit('builtin', comp.subset)]
  files = expand_paths(comp.paths, key)
  per_file = math.ceil(min_units / len(files))
  units = []
  for path in files:
    if comp.kind == 'jsonl':
      size = path.stat().length
      parts = max(per_file, math.ceil(size / max(1, int(d.read_chunk_bytes))))
      cuts = _pieces(size, parts) if size else [(0, -1)]
      units += [Unit('jsonl', str(path), b, e if e < size else -1) for b, e in cuts]
    elif comp.kind in ('parquet', 'arrayrecord') and per_file > 1:
      count = _footer_count(comp.kind, path)
      cuts = _pieces(count, per_file) if count else [(0, -1)]
      units += [Unit(comp.kind, str(path), b, e if e < (count or 0) else -1) for b, e in cuts]
    else:
      units.append(Unit(comp.kind, str(path)))
  return units


def shard_units(units: list[Unit], shard: int, shard_count: int) -> list[Unit]:
  """Logical shard s reads units s, s+S, s+2S, ..."""
  return units[shard::shard_count]

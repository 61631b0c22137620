"""Readers: files of each format -> Records; bad input raises DataError naming file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator

from etils import epath

from lm import chat, corpus
from lm.data.sources import Component, Record, as_tuple
from lm.data.stats import DataError, OnError


def _has_wildcard(pattern: str) -> bool:
  return any(c in pattern for c in '*?[')


def _glob(pattern: str) -> list[epath.Path]:
  if not _has_wildcard(pattern):
    path = epath.Path(pattern)
    if path.is_dir():
      return sorted(p for p in path.rglob('*') if p.is_file())
    return [path] if path.exists() else []
  parts = pattern.split('/')
  first = next(i for i, part in enumerate(parts) if _has_wildcard(part))
  base = '/'.join(parts[:first]) or '.'
  return sorted(p for p in epath.Path(base).glob('/'.join(parts[first:])) if p.is_file())


def expand_paths(patterns, key: str = 'data.paths') -> list[epath.Path]:
  """Files matching each pattern (file, directory or glob), in sorted order per pattern."""
  patterns = as_tuple(patterns)
  if not patterns:
    raise DataError(f'config key {key}: no files or globs given')
  found = []
  for pattern in patterns:
    matches = _glob(str(pattern))
    if not matches:
      raise DataError(f"config key {key}: '{pattern}' matches no file")
    found.extend(m for m in matches if m not in found)
  return found


def decode_utf8(raw: bytes, where: str, first_line: int, on_error: OnError,
                line_base=lambda: 1) -> str | None:
  """raw as text; else on_error naming `where`:line (first_line counts from line_base())."""
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    start = e.start  # `e` is unbound once the except block ends; the message is built lazily.
    line = lambda: line_base() + first_line - 1 + raw[:start].count(b'\n')
    on_error('invalid_utf8', lambda: f'{where}:{line()}',
             f'invalid UTF-8 byte 0x{raw[start]:02x}')
    return None


_FIELD_KEYS = {'lm': ('data.text_field',), 'sft': ('data.prompt_field', 'data.completion_field'),
               'classify': ('data.text_field', 'data.label_field'),
               'chat': ('data.messages_field',)}


def _fields_for(task: str, d) -> tuple[str, ...]:
  # Called per record: reads only this task's keys (a ConfigDict lookup costs microseconds).
  return tuple(d[key.split('.', 1)[1]] for key in _FIELD_KEYS[task])


def _required(obj: dict, field: str, key: str, where, on_error: OnError):
  """obj[field], or None (after on_error, naming the config key) when it is missing or null."""
  value = obj.get(field)
  if value is None:
    on_error('missing_field', where, f"no field '{field}' (config key {key})")
  return value


def _chat_record(obj: dict, d, where, on_error: OnError) -> Record | None:
  """Task 'chat': the messages list (a list, or a JSON string of one: Parquet string columns),
  checked here so a bad conversation is reported with its file and line like any bad field."""
  field = d.messages_field
  messages = _required(obj, field, 'data.messages_field', where, on_error)
  if messages is None:
    return None
  if isinstance(messages, str):
    try:
      messages = json.loads(messages)
    except json.JSONDecodeError:
      pass  # Reported below as not a list.
  problem = chat.messages_problem(messages)
  if problem is not None:
    on_error('bad_messages', where, f"field '{field}': {problem}")
    return None
  # Template errors surface when the record is tokenized; origin names it then (JSONL readers
  # give a cheap one: a line number past a unit's start would cost a scan of the file).
  return Record('', messages=json.dumps(messages, ensure_ascii=False),
                origin=where if isinstance(where, str) else '')


def record_from_object(obj, task: str, d, where: str, on_error: OnError) -> Record | None:
  """A Record from a JSON object / table row, or None (after on_error) if a field is bad."""
  if not isinstance(obj, dict):
    on_error('not_an_object', where, f'expected a JSON object, got {type(obj).__name__}')
    return None
  if task == 'chat':
    return _chat_record(obj, d, where, on_error)
  values = []
  for field, key in zip(_fields_for(task, d), _FIELD_KEYS[task]):
    value = _required(obj, field, key, where, on_error)
    if value is None:
      return None
    is_label = task == 'classify' and key == 'data.label_field'
    if is_label and isinstance(value, (int, bool)):
      value = str(int(value))
    if not isinstance(value, str):
      on_error('bad_field', where, f"field '{field}' must be a string, got {type(value).__name__}")
      return None
    values.append(value)
  if task == 'lm':
    return Record(values[0])
  if task == 'sft':
    return Record(values[0], completion=values[1])
  return Record(values[0], label=values[1])


def read_builtin(subset: str, d) -> Iterator[Record]:
  for doc in corpus.documents(subset, as_tuple(d.builtin_kinds)):
    yield Record(doc.text, origin=doc.name, group=doc.group)


def _read_text(path: epath.Path, d, on_error: OnError) -> Iterator[Record]:
  raw = path.read_bytes()
  if not raw.strip():
    on_error('empty_file', f'{path}:1', 'empty file')
    return
  text = decode_utf8(raw, str(path), 1, on_error)
  if text is None:
    return
  if d.text_unit == 'file':
    yield Record(text, origin=f'{path}:1')
    return
  block, first = [], 0
  for number, line in enumerate(text.splitlines(keepends=True), start=1):
    if line.strip():
      if not block:
        first = number
      block.append(line)
    elif block:
      yield Record(''.join(block), origin=f'{path}:{first}')
      block = []
  if block:
    yield Record(''.join(block), origin=f'{path}:{first}')


def _line_base(path: epath.Path, begin: int):
  """A function giving the line number at byte `begin` (counted only when a message needs it)."""
  def base() -> int:
    if not begin:
      return 1
    with path.open('rb') as f:
      return 1 + f.read(begin).count(b'\n')
  return base


def _read_jsonl(path: epath.Path, task: str, d, on_error: OnError, begin: int = 0,
                end: int = -1) -> Iterator[Record]:
  """Records of the lines that start in bytes [begin, end) (end -1: the end of the file)."""
  nonblank, base = 0, _line_base(path, begin)
  path_name = str(path)  # Once per file: an epath's str() costs more than a short line.
  with path.open('rb') as f:
    if begin:
      f.seek(begin - 1)
      if f.read(1) != b'\n':
        f.readline()  # The line that started before `begin` belongs to the previous range.
    start = f.tell()
    if begin and start > begin:  # Lines are counted from the first whole line of the range.
      base = _line_base(path, start)
    number = 0
    while end < 0 or f.tell() < end:
      raw = f.readline()
      if not raw:
        break
      number += 1
      if not raw.strip():
        continue  # Blank lines (a trailing newline) hold no record.
      nonblank += 1
      where = lambda n=number: f'{path_name}:{base() + n - 1}'  # pylint: disable=cell-var-from-loop
      line = decode_utf8(raw, path_name, number, on_error, base)
      if line is None:
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        on_error('invalid_json', where, f'not valid JSON ({e.msg} at column {e.colno})')
        continue
      record = record_from_object(obj, task, d, where, on_error)
      if record is not None and task == 'chat':
        record = record._replace(origin=f'{path_name}:{number}' if not begin else
                                 f'{path_name}:line {number} from byte {start}')
      if record is not None:
        yield record
    if not nonblank and not begin and not any(raw.strip() for raw in f):
      on_error('empty_file', f'{path}:1', 'empty file (no JSON lines)')


def _read_parquet(path: epath.Path, task: str, d, on_error: OnError, begin: int = 0,
                  end: int = -1) -> Iterator[Record]:
  """Rows of row groups [begin, end), one row group in memory at a time."""
  import pyarrow  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  fields = _fields_for(task, d)
  try:
    with path.open('rb') as f:
      parquet = pq.ParquetFile(f)
      meta, names = parquet.metadata, parquet.schema_arrow.names
      if meta.num_rows == 0:
        on_error('empty_file', f'{path}', 'Parquet file has no rows')
        return
      missing = [(f, k) for f, k in zip(fields, _FIELD_KEYS[task]) if f not in names]
      if missing:
        field, key = missing[0]
        on_error('missing_field', f'{path}',
                 f"no column '{field}' (config key {key}); columns: {names}", count=meta.num_rows)
        return
      end = meta.num_row_groups if end < 0 else end
      row = sum(meta.row_group(g).num_rows for g in range(begin))
      for group in range(begin, end):
        table = parquet.read_row_group(group, columns=list(dict.fromkeys(fields)))
        columns = [table.column(f).to_pylist() for f in fields]
        for values in zip(*columns):
          row += 1
          yield from _parquet_row(fields, values, f'{path}:row {row}', task, d, on_error)
  except (pyarrow.ArrowException, OSError) as e:
    on_error('corrupt_file', f'{path}', f'not a readable Parquet file ({type(e).__name__}: {e})')


def _parquet_row(fields, values, where: str, task: str, d, on_error: OnError) -> Iterator[Record]:
  decoded = {}
  for field, value in zip(fields, values):
    if isinstance(value, bytes):
      value = decode_utf8(value, where, 1, on_error)
      if value is None:
        return
    decoded[field] = value
  record = record_from_object(decoded, task, d, where, on_error)
  if record is not None:
    yield record


_ARRAYRECORD_BLOCK = 1024  # Records read at a time.


def _read_arrayrecord(path: epath.Path, task: str, d, on_error: OnError, begin: int = 0,
                      end: int = -1) -> Iterator[Record]:
  """Records [begin, end), a block at a time."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  try:
    reader = array_record_module.ArrayRecordReader(str(path))
    count = reader.num_records()
  except Exception as e:  # pylint: disable=broad-except  (the reader raises bare RuntimeError/ValueError)
    on_error('corrupt_file', f'{path}', f'not a readable ArrayRecord file ({e})')
    return
  try:
    if not count:
      on_error('empty_file', f'{path}', 'ArrayRecord file has no records')
      return
    end = count if end < 0 else min(end, count)
    for block in range(begin, end, _ARRAYRECORD_BLOCK):
      raws = reader.read(block, min(block + _ARRAYRECORD_BLOCK, end))
      for index, raw in enumerate(raws, start=block + 1):
        yield from _arrayrecord_record(raw, f'{path}:record {index}', task, d, on_error)
  finally:
    reader.close()


def _arrayrecord_record(raw: bytes, where: str, task: str, d,
                        on_error: OnError) -> Iterator[Record]:
  text = decode_utf8(raw, where, 1, on_error)
  if text is None:
    return
  obj = None
  if text.lstrip().startswith('{'):
    try:
      obj = json.loads(text)
    except json.JSONDecodeError:
      obj = None  # Plain text that happens to start with '{'.
  if isinstance(obj, dict):
    record = record_from_object(obj, task, d, where, on_error)
    if record is not None:
      yield record
  elif task == 'lm':
    yield Record(text, origin=where)
  else:
    on_error('not_an_object', where, f"task '{task}' needs JSON object records")


def read_file(kind: str, path: epath.Path, task: str, d, on_error: OnError, begin: int = 0,
              end: int = -1) -> Iterator[Record]:
  """Records of one file, or of its range [begin, end) in the kind's unit (see units.py)."""
  if kind == 'text':
    yield from _read_text(path, d, on_error)
  elif kind == 'jsonl':
    yield from _read_jsonl(path, task, d, on_error, begin, end)
  elif kind == 'parquet':
    yield from _read_parquet(path, task, d, on_error, begin, end)
  else:
    yield from _read_arrayrecord(path, task, d, on_error, begin, end)


def read_component(comp: Component, task: str, d, on_error: OnError) -> Iterator[Record]:
  if comp.kind == 'builtin':
    yield from read_builtin(comp.subset, d)
    return
  key = 'data.mixture' if d.source == 'mixture' else 'data.paths'
  for path in expand_paths(comp.paths, key):
    yield from read_file(comp.kind, path, task, d, on_error)

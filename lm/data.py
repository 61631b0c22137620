"""The data layer: sources -> quality filters -> tokenize -> pack -> batch, as one grain pipeline.

    it = make_pipeline(cfg, tokenizer, 'train', process_index=i, process_count=n)
    batch = next(it)          # dict of host-local numpy arrays, this process's rows
    state = it.get_state()    # JSON-serialisable; a fresh pipeline + set_state(state)
                              # continues with exactly the batches this one would produce
    it.data_stats             # DataStats: documents read/kept, filtered and skipped by reason

Sources (cfg.data.source; paths through etils.epath, so gs:// works):
  'builtin'      the running interpreter's standard library (lm.corpus), subset
                 cfg.data.builtin_subset ('general' or a held-out domain of lm.corpus.DOMAINS);
  'text'         files/globs/directories; one document per file, or per blank-line-separated
                 block with data.text_unit='paragraph';
  'jsonl'        one JSON object per line; fields data.text_field (task 'lm'), prompt_field +
                 completion_field ('sft'), text_field + label_field ('classify');
  'parquet'      the same fields as columns (pyarrow);
  'arrayrecord'  records of UTF-8 text, or JSON objects (a record starting with '{' that parses
                 as an object) with the fields above;
  'mixture'      cfg.data.mixture = ((name, weight), ...): a builtin subset name or a path/glob
                 (type from its extension: .jsonl/.json, .parquet, .array_record, else text).
                 Documents are drawn from the components with probability ~ weight.
  cfg.data.prepared_dir, when set, replaces all of these with the token shards written by
  `python -m lm.data prepare` (same filters, split and order, no tokenizing at train time).

Documents are read, filtered and de-duplicated once, when the pipeline is built, rather than
lazily after the shuffle: de-duplication needs to see every document anyway, and doing it up
front makes the counts exact and the per-process shards fixed lists. Filters, in order:
too_short / too_long (chars; task 'lm' only, short task examples are legitimate),
non_text (share of control characters / U+FFFD above data.max_nontext_fraction),
duplicate (exact content hash), near_duplicate (MinHash LSH, data.near_dedup).

Split: every document has a group (its content hash; for the built-in corpus, the source
chunk it came from) and a rank = hash(group) in [0, 1). rank < data.validation_share is
validation, the rest is training. Each split is ordered by rank, and data.train_fraction
keeps the first share of the training documents: a deterministic, nested random subset.

Bad input: a missing path, an empty file, a JSONL line that is not a JSON object or lacks a
field, an unreadable Parquet/ArrayRecord file, or bytes that are not UTF-8 raise DataError
with one line naming file and line (or row / record). With data.on_error='skip' the record
(or file) is skipped instead and counted by reason in DataStats.skipped; a path that matches
nothing always raises, since it is a typo rather than bad data.

Batches (T = data.seq_len, B = data.batch_size // process_count rows per process):
  inputs      int32   [B, T]  tokens; documents are wrapped as bos + tokens + eos
  targets     int32   [B, T]  the next token of the stream
  segment_ids int32   [B, T]  1, 2, ... per document in the row; 0 = padding
  positions   int32   [B, T]  0, 1, ... restarting with every segment of the row
  loss_mask   float32 [B, T]  1 where the target is the next token of the same document
                              (0 on padding and across document boundaries; for task 'sft'
                              also 0 where the target is a prompt token)
  labels      int32   [B]     task 'classify' only; ids in the order of class_names(cfg)
Tasks 'lm' and 'sft' concatenate documents and cut the stream into rows: no token is lost
or repeated, long documents continue in the next row (the last target of a row is the first
input of the next, so no prediction is lost either). Task 'classify' puts one document per
row, truncated to T (keeping the final eos) and padded; loss_mask marks its real tokens.
Padding appears only at the end of a finite split (validation, or data.num_epochs > 0);
padding rows of 'classify' have label 0 and an all-zero loss_mask.

Processes: training documents are split into S = data.shard_count logical shards (0 = the
process count); shard s holds every S-th document from s and packs batch_size/S rows per step.
Process p of P reads only shards p*(S/P) .. (p+1)*(S/P)-1 and stacks their rows in shard order,
so every process count dividing S yields the same global batches (the checkpointed iterator
state holds each shard's position; restore_iterator restores it under another process
count). For validation every process packs the same
global stream and keeps its rows, so every process sees the same number of batches (collective
evaluation needs that); validation is finite, in a fixed order and independent of
data.shuffle_seed, so calling make_pipeline again repeats it exactly. A finite mixture ends
when its first component runs out. data.worker_count applies to training only; validation
always runs in-process.
With data.num_epochs > 0 and several processes, training iterators may end a batch apart;
the train loop stops at train.steps anyway.

Stats: `DataStats` counts documents read, kept per split (and their bytes), held out by
train_fraction, filtered by reason and skipped by reason (with the first message of each).
Get it as `iterator.data_stats`, or `data_stats(cfg, task)`; `stats.summary()` is one line.

CLI (ml_collections config files, --config.key=value overrides):
  python -m lm.data prepare --config=configs/X.py [--workdir=DIR]   write ArrayRecord shards
  python -m lm.data report  --config=configs/X.py [--split=train]   counts, bytes/token, top tokens
  python -m lm.data bench   --config=configs/X.py [--runs=5 --batches=200]   tokens/s (median)
The tokenizer comes from lm.tokenizer.load_or_train(cfg, workdir); for `prepare` the workdir
defaults to data.prepared_dir, so the shards carry the tokenizer that wrote them.
"""

from __future__ import annotations

import atexit
import collections
import copy
import dataclasses
import hashlib
import json
import math
import pathlib
import re
import statistics
import tempfile
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from absl import logging
from etils import epath
import grain
import numpy as np

from lm import corpus
from lm.errors import UserError

SOURCES = ('builtin', 'text', 'jsonl', 'parquet', 'arrayrecord', 'mixture')
TASKS = ('lm', 'sft', 'classify')
SPLITS = ('train', 'validation')

_PREPARED_FORMAT = 1
_PREPARED_META = 'meta.json'
_DOCS_PER_ELEMENT = 16  # Documents tokenized per grain element: amortises per-element overhead.
_VALIDATION_SEED = 0  # Fixed, so every run evaluates on the same documents in the same order.
_NEAR_DEDUP_PERMUTATIONS = 128
_NEAR_DEDUP_SHINGLE = 5  # Words per shingle.
# Control characters other than tab/newline/CR/form feed, DEL, and the replacement character.
_NON_TEXT = re.compile('[\x00-\x08\x0b\x0e-\x1f\x7f\ufffd]')


class DataError(UserError, ValueError):
  """A user-caused data problem; the one-line message names the file and line, or config key."""


# --------------------------------------------------------------------------- stats


@dataclasses.dataclass
class DataStats:
  """What happened to every document read (nothing is dropped without being counted here)."""

  read: int = 0  # Records read from the sources, before filters.
  kept: dict = dataclasses.field(default_factory=lambda: {s: 0 for s in SPLITS})
  kept_bytes: dict = dataclasses.field(default_factory=lambda: {s: 0 for s in SPLITS})
  held_out: int = 0  # Training documents left unused by data.train_fraction < 1.
  filtered: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skip_examples: dict = dataclasses.field(default_factory=dict)  # Reason -> first message.

  def merge(self, other: 'DataStats') -> 'DataStats':
    merged = DataStats(read=self.read + other.read, held_out=self.held_out + other.held_out,
                       filtered=self.filtered + other.filtered,
                       skipped=self.skipped + other.skipped,
                       skip_examples={**other.skip_examples, **self.skip_examples})
    for split in SPLITS:
      merged.kept[split] = self.kept[split] + other.kept[split]
      merged.kept_bytes[split] = self.kept_bytes[split] + other.kept_bytes[split]
    return merged

  def to_dict(self) -> dict:
    return {'read': self.read, 'kept': dict(self.kept), 'kept_bytes': dict(self.kept_bytes),
            'held_out': self.held_out, 'filtered': dict(self.filtered),
            'skipped': dict(self.skipped), 'skip_examples': dict(self.skip_examples)}

  @classmethod
  def from_dict(cls, d: dict) -> 'DataStats':
    return cls(read=d['read'], kept=dict(d['kept']), kept_bytes=dict(d['kept_bytes']),
               held_out=d['held_out'], filtered=collections.Counter(d['filtered']),
               skipped=collections.Counter(d['skipped']), skip_examples=dict(d['skip_examples']))

  def summary(self) -> str:
    def counts(counter):
      return ', '.join(f'{k} {v}' for k, v in sorted(counter.items())) or 'none'
    line = (f"documents: read {self.read}, train {self.kept['train']} "
            f"({self.kept_bytes['train'] / 1e6:.2f} MB), validation {self.kept['validation']}")
    if self.held_out:
      line += f', held out by train_fraction {self.held_out}'
    return f'{line}; filtered: {counts(self.filtered)}; skipped: {counts(self.skipped)}'


class _OnError:
  """Raises DataError, or counts the problem and skips, as data.on_error says."""

  def __init__(self, policy: str, stats: DataStats):
    self.policy, self.stats = policy, stats

  def __call__(self, reason: str, where: str, message: str, count: int = 1) -> None:
    text = f'{where}: {message}'
    if self.policy != 'skip':
      raise DataError(f"{text} (set data.on_error='skip' to skip and count such records)")
    self.stats.skipped[reason] += count
    self.stats.skip_examples.setdefault(reason, text)


# --------------------------------------------------------------------------- records


class Record(NamedTuple):
  """One document or task example, as read from a source."""

  text: str  # The document (task 'lm'), the example text ('classify') or the prompt ('sft').
  completion: str = ''  # Task 'sft'.
  label: str = ''  # Task 'classify'.
  origin: str = ''  # 'file:line' (or corpus document name), for messages.
  group: str = ''  # Split key; '' means the content hash.
  rank: float = 0.0  # hash(group) in [0, 1): split and order.


@dataclasses.dataclass(frozen=True)
class Component:
  """One source of a (possibly single-component) mixture."""

  name: str
  kind: str  # 'builtin', 'text', 'jsonl', 'parquet' or 'arrayrecord'.
  paths: tuple[str, ...] = ()  # Patterns, for file kinds.
  subset: str = ''  # For 'builtin'.
  weight: float = 1.0


def _as_tuple(value) -> tuple:
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,) if value else ()
  return tuple(value)


def _kind_from_extension(path: str) -> str:
  lower = path.lower()
  if lower.endswith(('.jsonl', '.json')):
    return 'jsonl'
  if lower.endswith('.parquet'):
    return 'parquet'
  if lower.endswith(('.array_record', '.arrayrecord')) or '.array_record-' in lower:
    return 'arrayrecord'
  return 'text'


def components(cfg) -> list[Component]:
  """The configured sources as components (one unless data.source is 'mixture')."""
  d = cfg.data
  if d.source == 'builtin':
    return [Component(f'builtin:{d.builtin_subset}', 'builtin', subset=d.builtin_subset)]
  if d.source != 'mixture':
    return [Component(d.source, d.source, paths=_as_tuple(d.paths))]
  result = []
  for entry in _as_tuple(d.mixture):
    name, weight = entry
    if name in corpus.SUBSETS:
      result.append(Component(f'builtin:{name}', 'builtin', subset=name, weight=float(weight)))
    else:
      result.append(Component(name, _kind_from_extension(name), paths=(name,),
                              weight=float(weight)))
  return result


def check_data_config(cfg, task: str) -> None:
  """Raises DataError naming the cfg.data key that cannot work."""
  d = cfg.data

  def require(cond, key, msg):
    if not cond:
      raise DataError(f'config key {key}: {msg}')

  require(task in TASKS, 'finetune.task', f'must be one of {TASKS}, got {task!r}')
  require(d.source in SOURCES, 'data.source', f'must be one of {SOURCES}, got {d.source!r}')
  require(d.on_error in ('raise', 'skip'), 'data.on_error', f"must be 'raise' or 'skip', got {d.on_error!r}")
  require(d.text_unit in ('file', 'paragraph'), 'data.text_unit',
          f"must be 'file' or 'paragraph', got {d.text_unit!r}")
  require(0.0 <= d.validation_share < 1.0, 'data.validation_share', 'must be in [0, 1)')
  require(0.0 < d.train_fraction <= 1.0, 'data.train_fraction', 'must be in (0, 1]')
  require(d.seq_len >= 2, 'data.seq_len', f'must be >= 2, got {d.seq_len}')
  require(d.batch_size >= 1, 'data.batch_size', f'must be >= 1, got {d.batch_size}')
  unknown_kinds = set(_as_tuple(d.builtin_kinds)) - set(corpus.KINDS)
  require(not unknown_kinds and _as_tuple(d.builtin_kinds), 'data.builtin_kinds',
          f'must be a non-empty subset of {corpus.KINDS}, got {d.builtin_kinds!r}')
  if d.source == 'mixture':
    entries = _as_tuple(d.mixture)
    require(entries, 'data.mixture', "source 'mixture' needs ((name, weight), ...) entries")
    for entry in entries:
      require(isinstance(entry, (tuple, list)) and len(entry) == 2 and float(entry[1]) > 0,
              'data.mixture', f'each entry must be (name, weight > 0), got {entry!r}')
    require(not d.prepared_dir, 'data.prepared_dir',
            "prepared shards hold one source; prepare and train on mixtures on the fly")
  elif d.source == 'builtin':
    require(d.builtin_subset in corpus.SUBSETS, 'data.builtin_subset',
            f'must be one of {corpus.SUBSETS}, got {d.builtin_subset!r}')
  else:
    require(_as_tuple(d.paths) or d.prepared_dir, 'data.paths',
            f"source '{d.source}' needs files or globs")
  if task != 'lm' and not d.prepared_dir:
    for comp in components(cfg):
      require(comp.kind in ('jsonl', 'parquet', 'arrayrecord'), 'data.source',
              f"task '{task}' needs JSONL, Parquet or ArrayRecord examples with fields; "
              f"'{comp.name}' is {comp.kind}")


def is_builtin_only(cfg) -> bool:
  """True when every document of the configured source comes from the built-in corpus."""
  try:
    return all(c.kind == 'builtin' for c in components(cfg))
  except (TypeError, ValueError):
    return False


def source_key(cfg, task: str | None = None) -> dict:
  """Every setting that decides which documents are read and kept (cache keys)."""
  d = cfg.data
  keys = ('source', 'builtin_subset', 'builtin_kinds', 'paths', 'mixture', 'text_unit',
          'text_field', 'prompt_field', 'completion_field', 'label_field', 'on_error', 'dedup',
          'near_dedup', 'near_dedup_threshold', 'min_chars', 'max_chars', 'max_nontext_fraction')
  key = {k: d[k] for k in keys}
  key['task'] = task or cfg.finetune.task
  return json.loads(json.dumps(key, default=list))


# --------------------------------------------------------------------------- reading


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
  patterns = _as_tuple(patterns)
  if not patterns:
    raise DataError(f'config key {key}: no files or globs given')
  found = []
  for pattern in patterns:
    matches = _glob(str(pattern))
    if not matches:
      raise DataError(f"config key {key}: '{pattern}' matches no file")
    found.extend(m for m in matches if m not in found)
  return found


def _decode_utf8(raw: bytes, where: str, first_line: int, on_error: _OnError) -> str | None:
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    line = first_line + raw[:e.start].count(b'\n')
    on_error('invalid_utf8', f'{where}:{line}', f'invalid UTF-8 byte 0x{raw[e.start]:02x}')
    return None


def _fields_for(task: str, d) -> tuple[str, ...]:
  return {'lm': (d.text_field,), 'sft': (d.prompt_field, d.completion_field),
          'classify': (d.text_field, d.label_field)}[task]


def _field_keys(task: str) -> tuple[str, ...]:
  return {'lm': ('data.text_field',), 'sft': ('data.prompt_field', 'data.completion_field'),
          'classify': ('data.text_field', 'data.label_field')}[task]


def _record_from_object(obj, task: str, d, where: str, on_error: _OnError) -> Record | None:
  """A Record from a JSON object / table row, or None (after on_error) if a field is bad."""
  if not isinstance(obj, dict):
    on_error('not_an_object', where, f'expected a JSON object, got {type(obj).__name__}')
    return None
  values = []
  for field, key in zip(_fields_for(task, d), _field_keys(task)):
    if field not in obj or obj[field] is None:
      on_error('missing_field', where, f"no field '{field}' (config key {key})")
      return None
    value = obj[field]
    is_label = task == 'classify' and key == 'data.label_field'
    if is_label and isinstance(value, (int, bool)):
      value = str(int(value))
    if not isinstance(value, str):
      on_error('bad_field', where, f"field '{field}' must be a string, got {type(value).__name__}")
      return None
    values.append(value)
  if task == 'lm':
    return Record(values[0], origin=where)
  if task == 'sft':
    return Record(values[0], completion=values[1], origin=where)
  return Record(values[0], label=values[1], origin=where)


def _read_builtin(comp: Component, d) -> Iterator[Record]:
  for doc in corpus.documents(comp.subset, _as_tuple(d.builtin_kinds)):
    yield Record(doc.text, origin=doc.name, group=doc.group)


def _read_text(path: epath.Path, d, on_error: _OnError) -> Iterator[Record]:
  raw = path.read_bytes()
  if not raw.strip():
    on_error('empty_file', f'{path}:1', 'empty file')
    return
  text = _decode_utf8(raw, str(path), 1, on_error)
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


def _read_jsonl(path: epath.Path, task: str, d, on_error: _OnError) -> Iterator[Record]:
  nonblank = 0
  with path.open('rb') as f:
    for number, raw in enumerate(f, start=1):
      if not raw.strip():
        continue  # Blank lines (a trailing newline) hold no record.
      nonblank += 1
      where = f'{path}:{number}'
      line = _decode_utf8(raw, str(path), number, on_error)
      if line is None:
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        on_error('invalid_json', where, f'not valid JSON ({e.msg} at column {e.colno})')
        continue
      record = _record_from_object(obj, task, d, where, on_error)
      if record is not None:
        yield record
  if not nonblank:
    on_error('empty_file', f'{path}:1', 'empty file (no JSON lines)')


def _read_parquet(path: epath.Path, task: str, d, on_error: _OnError) -> Iterator[Record]:
  import pyarrow  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  fields = _fields_for(task, d)
  try:
    with path.open('rb') as f:
      table = pq.read_table(f, columns=None)
  except (pyarrow.ArrowException, OSError) as e:
    on_error('corrupt_file', f'{path}', f'not a readable Parquet file ({type(e).__name__}: {e})')
    return
  if table.num_rows == 0:
    on_error('empty_file', f'{path}', 'Parquet file has no rows')
    return
  missing = [(f, k) for f, k in zip(fields, _field_keys(task)) if f not in table.column_names]
  if missing:
    field, key = missing[0]
    on_error('missing_field', f'{path}',
             f"no column '{field}' (config key {key}); columns: {table.column_names}",
             count=table.num_rows)
    return
  columns = [table.column(f).to_pylist() for f in fields]
  for row, values in enumerate(zip(*columns), start=1):
    where = f'{path}:row {row}'
    decoded = {}
    for field, value in zip(fields, values):
      if isinstance(value, bytes):
        value = _decode_utf8(value, where, 1, on_error)
        if value is None:
          break
      decoded[field] = value
    else:
      record = _record_from_object(decoded, task, d, where, on_error)
      if record is not None:
        yield record


def _read_arrayrecord(path: epath.Path, task: str, d, on_error: _OnError) -> Iterator[Record]:
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  try:
    reader = array_record_module.ArrayRecordReader(str(path))
    raws = reader.read_all()
    reader.close()
  except Exception as e:  # pylint: disable=broad-except  (the reader raises bare RuntimeError/ValueError)
    on_error('corrupt_file', f'{path}', f'not a readable ArrayRecord file ({e})')
    return
  if not raws:
    on_error('empty_file', f'{path}', 'ArrayRecord file has no records')
    return
  for index, raw in enumerate(raws, start=1):
    where = f'{path}:record {index}'
    text = _decode_utf8(raw, where, 1, on_error)
    if text is None:
      continue
    obj = None
    if text.lstrip().startswith('{'):
      try:
        obj = json.loads(text)
      except json.JSONDecodeError:
        obj = None  # Plain text that happens to start with '{'.
    if isinstance(obj, dict):
      record = _record_from_object(obj, task, d, where, on_error)
      if record is not None:
        yield record
    elif task == 'lm':
      yield Record(text, origin=where)
    else:
      on_error('not_an_object', where, f"task '{task}' needs JSON object records")


def _read_component(comp: Component, task: str, d, on_error: _OnError) -> Iterator[Record]:
  if comp.kind == 'builtin':
    yield from _read_builtin(comp, d)
    return
  key = 'data.mixture' if d.source == 'mixture' else 'data.paths'
  for path in expand_paths(comp.paths, key):
    if comp.kind == 'text':
      yield from _read_text(path, d, on_error)
    elif comp.kind == 'jsonl':
      yield from _read_jsonl(path, task, d, on_error)
    elif comp.kind == 'parquet':
      yield from _read_parquet(path, task, d, on_error)
    else:
      yield from _read_arrayrecord(path, task, d, on_error)


# --------------------------------------------------------------------------- filters


def _filter_text(record: Record) -> str:
  return record.text + record.completion


def _quality_reason(text: str, d, task: str) -> str | None:
  """Why a document fails the quality filters, or None if it passes."""
  if task == 'lm' and len(text) < d.min_chars:
    return 'too_short'
  if task == 'lm' and len(text) > d.max_chars:
    return 'too_long'
  if text and len(_NON_TEXT.findall(text)) > d.max_nontext_fraction * len(text):
    return 'non_text'
  return None


def _content_hash(record: Record) -> bytes:
  payload = '\x00'.join((record.text, record.completion, record.label)).encode('utf-8', 'replace')
  return hashlib.blake2b(payload, digest_size=16).digest()


class _NearDuplicates:
  """MinHash LSH over word shingles: flags documents too similar to one seen before."""

  def __init__(self, threshold: float):
    import datasketch  # pylint: disable=import-outside-toplevel
    self._datasketch = datasketch
    self._lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=_NEAR_DEDUP_PERMUTATIONS)
    self._count = 0

  def seen(self, text: str) -> bool:
    words = re.findall(r'\w+', text.lower())
    n = _NEAR_DEDUP_SHINGLE
    shingles = {' '.join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}
    minhash = self._datasketch.MinHash(num_perm=_NEAR_DEDUP_PERMUTATIONS)
    minhash.update_batch([s.encode('utf-8') for s in shingles])
    if self._lsh.query(minhash):
      return True
    self._lsh.insert(str(self._count), minhash)
    self._count += 1
    return False


def _filtered(records: Iterable[Record], d, task: str, stats: DataStats) -> list[Record]:
  """Applies quality filters and de-duplication, in source order; fills group from content."""
  seen, near, kept = set(), (_NearDuplicates(d.near_dedup_threshold) if d.near_dedup else None), []
  for record in records:
    stats.read += 1
    text = _filter_text(record)
    reason = _quality_reason(text, d, task)
    digest = _content_hash(record)
    if reason is None and d.dedup and digest in seen:
      reason = 'duplicate'
    if reason is None and near is not None and near.seen(text):
      reason = 'near_duplicate'
    if reason is not None:
      stats.filtered[reason] += 1
      continue
    seen.add(digest)
    kept.append(record if record.group else record._replace(group=digest.hex()))
  return kept


# --------------------------------------------------------------------------- split


def split_rank(group: str) -> float:
  """hash(group) in [0, 1): decides the split and the order of documents."""
  digest = hashlib.blake2b(group.encode('utf-8'), digest_size=8).digest()
  return int.from_bytes(digest, 'big') / 2.0**64


def _fraction_count(n: int, fraction: float) -> int:
  return n if fraction >= 1.0 else min(n, max(1, round(fraction * n))) if n else 0


def _split(records: list[Record], validation_share: float) -> dict[str, list[Record]]:
  ranked = sorted((r._replace(rank=split_rank(r.group)) for r in records),
                  key=lambda r: r.rank)  # Stable: a group's documents keep source order.
  return {'validation': [r for r in ranked if r.rank < validation_share],
          'train': [r for r in ranked if r.rank >= validation_share]}


_RECORDS_CACHE: dict[str, tuple[list[Record], DataStats]] = {}


def _local_files_signature(comp: Component) -> list:
  """(path, size, mtime) of a component's local files: an edited file invalidates the memo.

  Remote files (gs://...) are not stat-ed: one round trip per file on every call would cost
  more than the memo saves.
  """
  if comp.kind == 'builtin' or any('://' in p for p in comp.paths):
    return []
  try:
    files = [pathlib.Path(p) for p in expand_paths(comp.paths)]
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
  except (DataError, OSError):
    return []  # Reading will raise the proper error.


def _component_records(comp: Component, cfg, task: str) -> tuple[list[Record], DataStats]:
  """Filtered, de-duplicated records of one component (memoised per process)."""
  key = json.dumps([dataclasses.asdict(comp), source_key(cfg, task), _local_files_signature(comp),
                    corpus.cache_key() if comp.kind == 'builtin' else ''], default=list)
  if key not in _RECORDS_CACHE:
    stats = DataStats()
    on_error = _OnError(cfg.data.on_error, stats)
    records = _filtered(_read_component(comp, task, cfg.data, on_error), cfg.data, task, stats)
    if len(_RECORDS_CACHE) >= 8:
      _RECORDS_CACHE.pop(next(iter(_RECORDS_CACHE)))
    _RECORDS_CACHE[key] = (records, stats)
  return _RECORDS_CACHE[key]


def split_components(cfg, task: str | None = None,
                     train_fraction: float | None = None) -> list[tuple[Component, dict, DataStats]]:
  """Per component: {'train': [...], 'validation': [...]} records and their DataStats."""
  task = task or cfg.finetune.task
  check_data_config(cfg, task)
  fraction = cfg.data.train_fraction if train_fraction is None else train_fraction
  result = []
  for comp in components(cfg):
    records, read_stats = _component_records(comp, cfg, task)
    splits = _split(records, cfg.data.validation_share)
    keep = _fraction_count(len(splits['train']), fraction)
    stats = dataclasses.replace(read_stats, kept={}, kept_bytes={},
                                held_out=len(splits['train']) - keep)
    splits['train'] = splits['train'][:keep]
    for split in SPLITS:
      stats.kept[split] = len(splits[split])
      stats.kept_bytes[split] = sum(len(_filter_text(r).encode('utf-8')) for r in splits[split])
    result.append((comp, splits, stats))
  return result


def load_documents(cfg, split: str, task: str | None = None) -> list[Record]:
  """The kept records of `split`, all components, each component in rank order."""
  if split not in SPLITS:
    raise DataError(f"split must be one of {SPLITS}, got {split!r}")
  return [r for _, splits, _ in split_components(cfg, task) for r in splits[split]]


def data_stats(cfg, task: str | None = None) -> DataStats:
  """DataStats of the configured source(s), merged over mixture components."""
  if cfg.data.prepared_dir:
    return DataStats.from_dict(read_prepared_meta(cfg.data.prepared_dir)['stats'])
  total = DataStats()
  for _, _, stats in split_components(cfg, task):
    total = total.merge(stats)
  return total


def tokenizer_training_texts(cfg) -> list[str]:
  """Up to tokenizer.max_train_docs training texts, a hash-random sample across components."""
  records = sorted(load_documents(cfg, 'train'), key=lambda r: r.rank)
  if not records:
    raise DataError('cannot train a tokenizer: the training split has no documents '
                    f'({data_stats(cfg).summary()})')
  return [_filter_text(r) for r in records[:int(cfg.tokenizer.max_train_docs)]]


def _label_sort_key(label: str):
  return (0, int(label), '') if re.fullmatch(r'-?\d+', label) else (1, 0, label)


def class_names(cfg) -> list[str]:
  """Label strings of task 'classify', sorted (numerically if all are integers); id = index."""
  if cfg.data.prepared_dir:
    return list(read_prepared_meta(cfg.data.prepared_dir)['class_names'])
  labels = set()
  for _, splits, _ in split_components(cfg, 'classify', train_fraction=1.0):
    labels.update(r.label for split in SPLITS for r in splits[split])
  return sorted(labels, key=_label_sort_key)


# --------------------------------------------------------------------------- tokenizing


def _wrap(tokenizer, ids: list[int]) -> list[int]:
  bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
  eos = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
  return bos + ids + eos


def _assemble(tokenizer, task: str, text_ids: list[int], completion_ids: list[int],
              label_id: int) -> tuple[np.ndarray, int]:
  """(tokens, aux): aux is the count of leading no-loss tokens ('lm'/'sft') or the label id."""
  if task == 'sft':
    prompt = ([tokenizer.bos_id] if tokenizer.bos_id >= 0 else []) + text_ids
    full = prompt + completion_ids + ([tokenizer.eos_id] if tokenizer.eos_id >= 0 else [])
    return np.asarray(full, np.int32), len(prompt)
  tokens = np.asarray(_wrap(tokenizer, text_ids), np.int32)
  return tokens, (label_id if task == 'classify' else 0)


class TokenizeRecord:
  """grain map: Record -> (int32 tokens, aux)."""

  def __init__(self, tokenizer, task: str, label_ids: dict[str, int] | None = None):
    self.tokenizer, self.task, self.label_ids = tokenizer, task, label_ids or {}

  def __call__(self, record: Record) -> tuple[np.ndarray, int]:
    completion = self.tokenizer.encode(record.completion) if self.task == 'sft' else []
    return _assemble(self.tokenizer, self.task, self.tokenizer.encode(record.text), completion,
                     self.label_ids.get(record.label, 0))


def tokenize_records(records: Sequence[Record], tokenizer, task: str,
                     label_ids: dict[str, int] | None = None) -> list[tuple[np.ndarray, int]]:
  """Batch version of TokenizeRecord (SentencePiece's thread pool): for prepare and report."""
  label_ids = label_ids or {}
  texts = tokenizer.encode_batch([r.text for r in records])
  completions = (tokenizer.encode_batch([r.completion for r in records]) if task == 'sft'
                 else [[]] * len(records))
  return [_assemble(tokenizer, task, t, c, label_ids.get(r.label, 0))
          for r, t, c in zip(records, texts, completions)]


def decode_prepared(raw: bytes) -> tuple[np.ndarray, int]:
  """A prepared record: little-endian int32 [aux, tokens...] -> (tokens, aux)."""
  values = np.frombuffer(raw, dtype='<i4')
  return values[1:].astype(np.int32), int(values[0])


def encode_prepared(tokens: np.ndarray, aux: int) -> bytes:
  return np.concatenate([np.asarray([aux], '<i4'), np.asarray(tokens, '<i4')]).tobytes()


def concat_docs(docs: Sequence[tuple[np.ndarray, int]]) -> dict[str, np.ndarray]:
  """grain batch_fn: k tokenized documents -> one element of concatenated tokens."""
  return {'tokens': np.concatenate([t for t, _ in docs]) if docs else np.zeros(0, np.int32),
          'lengths': np.asarray([len(t) for t, _ in docs], np.int64),
          'no_loss': np.asarray([a for _, a in docs], np.int64)}


# --------------------------------------------------------------------------- packing


@dataclasses.dataclass
class TokenStream:
  """Per-token arrays of a stretch of the concatenated document stream."""

  tokens: np.ndarray  # int32
  doc_ids: np.ndarray  # int64, increasing by one per document
  positions: np.ndarray  # int32, index of the token within its document
  loss_flags: np.ndarray  # bool, whether the token may be a loss target

  @classmethod
  def empty(cls) -> 'TokenStream':
    return cls(np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int32),
               np.zeros(0, bool))

  @classmethod
  def from_element(cls, element: dict, first_doc_id: int) -> 'TokenStream':
    lengths, n = element['lengths'], len(element['tokens'])
    starts = np.cumsum(lengths) - lengths
    positions = np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)
    return cls(element['tokens'].astype(np.int32, copy=False),
               np.repeat(np.arange(len(lengths), dtype=np.int64) + first_doc_id, lengths),
               positions.astype(np.int32),
               positions >= np.repeat(element['no_loss'], lengths))

  @classmethod
  def concatenate(cls, parts: Sequence['TokenStream']) -> 'TokenStream':
    return cls(*(np.concatenate([getattr(p, f.name) for p in parts])
                 for f in dataclasses.fields(cls)))

  def __len__(self) -> int:
    return len(self.tokens)

  def drop(self, n: int) -> 'TokenStream':
    return TokenStream(self.tokens[n:], self.doc_ids[n:], self.positions[n:], self.loss_flags[n:])


def pack_rows(stream: TokenStream, start: int, rows: int, seq_len: int,
              pad_id: int) -> dict[str, np.ndarray]:
  """Cuts [rows, seq_len] inputs from `stream` at `start`; targets are the tokens one later.

  Vectorised: every output is a gather from the stream, so the cost is a few numpy ops per
  batch whatever the number of documents in it.
  """
  n = len(stream)
  index = start + np.arange(rows * seq_len, dtype=np.int64).reshape(rows, seq_len)
  real = index < n
  here = np.minimum(index, n - 1)
  has_next = index + 1 < n
  after = np.minimum(index + 1, n - 1)
  doc = stream.doc_ids[here]
  same_doc = has_next & (stream.doc_ids[after] == doc)
  return {
      'inputs': np.where(real, stream.tokens[here], pad_id).astype(np.int32),
      'targets': np.where(has_next, stream.tokens[after], pad_id).astype(np.int32),
      'segment_ids': np.where(real, doc - doc[:, :1] + 1, 0).astype(np.int32),
      'positions': np.where(real, np.minimum(stream.positions[here], np.arange(seq_len)),
                            0).astype(np.int32),
      'loss_mask': (same_doc & stream.loss_flags[after]).astype(np.float32),
  }


class PackedBatchIterDataset(grain.IterDataset):
  """Packs tokenized document elements (see concat_docs) into [rows, seq_len] batches.

  grain's ConcatThenSplitIterDataset works element by element in Python and restores by
  replaying from its last checkpoint; this packer gathers a whole batch with numpy and keeps
  a two-number state, and lets the last target of a row be the next row's first input.
  """

  def __init__(self, parent: grain.IterDataset, *, rows: int, seq_len: int, pad_id: int):
    super().__init__(parent)
    self._rows, self._seq_len, self._pad_id = rows, seq_len, pad_id

  def __iter__(self) -> '_PackedBatchIterator':
    return _PackedBatchIterator(self._parent.__iter__(), self._rows, self._seq_len, self._pad_id)

  def __str__(self) -> str:
    return f'PackedBatchIterDataset(rows={self._rows}, seq_len={self._seq_len})'


class _PackedBatchIterator(grain.DatasetIterator):
  """State = (parent state before the first buffered element, offset of the next input).

  Restoring re-reads the buffered elements from the parent and skips `offset` tokens, so a
  restored iterator produces exactly the batches the original would have.
  """

  def __init__(self, parent: grain.DatasetIterator, rows: int, seq_len: int, pad_id: int):
    super().__init__(parent)
    self._rows, self._seq_len, self._pad_id = rows, seq_len, pad_id
    self._anchor = copy.deepcopy(parent.get_state())
    self._offset = 0
    self._reset_buffer()

  def _reset_buffer(self) -> None:
    self._stream = TokenStream.empty()
    self._element_ends = collections.deque()  # (stream end of an element, parent state after it)
    self._next_doc_id = 0
    self._exhausted = False

  def _fill(self, needed: int) -> None:
    parts, size = [], len(self._stream)
    while size < needed and not self._exhausted:
      try:
        element = next(self._parent)
      except StopIteration:
        self._exhausted = True
        break
      part = TokenStream.from_element(element, self._next_doc_id)
      self._next_doc_id += len(element['lengths'])
      size += len(part)
      parts.append(part)
      self._element_ends.append((size, copy.deepcopy(self._parent.get_state())))
    if parts:
      self._stream = TokenStream.concatenate([self._stream] + parts)

  def _release_consumed(self) -> None:
    """Moves the anchor past elements whose tokens are all behind the offset."""
    dropped = 0
    while self._element_ends and self._element_ends[0][0] <= self._offset:
      dropped, self._anchor = self._element_ends.popleft()
    if dropped:
      self._stream = self._stream.drop(dropped)
      self._offset -= dropped
      self._element_ends = collections.deque((end - dropped, s) for end, s in self._element_ends)

  def __next__(self) -> dict[str, np.ndarray]:
    step = self._rows * self._seq_len
    self._fill(self._offset + step + 1)  # +1: the last input's target.
    if self._offset >= len(self._stream):
      raise StopIteration
    batch = pack_rows(self._stream, self._offset, self._rows, self._seq_len, self._pad_id)
    self._offset = min(self._offset + step, len(self._stream))
    self._release_consumed()
    return batch

  def get_state(self) -> dict[str, Any]:
    return {'parent': copy.deepcopy(self._anchor), 'offset': int(self._offset)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._anchor = copy.deepcopy(state['parent'])
    self._offset = int(state['offset'])
    self._reset_buffer()

  def __str__(self) -> str:
    return f'PackedBatchIterator(rows={self._rows}, seq_len={self._seq_len})'


class ClassifyRow:
  """grain map: (tokens, label) -> one row, truncated to seq_len keeping the final token."""

  def __init__(self, seq_len: int, pad_id: int):
    self.seq_len, self.pad_id = seq_len, pad_id

  def __call__(self, doc: tuple[np.ndarray, int]) -> dict[str, np.ndarray]:
    tokens, label = doc
    if len(tokens) > self.seq_len:  # Keep eos last: a classifier may pool the final token.
      tokens = np.concatenate([tokens[:self.seq_len - 1], tokens[-1:]])
    n, t = len(tokens), self.seq_len
    real = np.arange(t) < n
    inputs = np.full(t, self.pad_id, np.int32)
    inputs[:n] = tokens
    targets = np.full(t, self.pad_id, np.int32)
    targets[:n - 1] = tokens[1:]
    return {'inputs': inputs, 'targets': targets, 'segment_ids': real.astype(np.int32),
            'positions': np.where(real, np.arange(t), 0).astype(np.int32),
            'loss_mask': real.astype(np.float32), 'labels': np.int32(label)}


class StackRows:
  """grain batch_fn: stacks rows and pads a short final batch with empty rows."""

  def __init__(self, rows: int, seq_len: int, pad_id: int):
    self.rows, self.seq_len, self.pad_id = rows, seq_len, pad_id

  def __call__(self, rows: Sequence[dict]) -> dict[str, np.ndarray]:
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    missing = self.rows - len(rows)
    if missing:
      for key, value in batch.items():
        fill = self.pad_id if key in ('inputs', 'targets') else 0
        pad = np.full((missing,) + value.shape[1:], fill, value.dtype)
        batch[key] = np.concatenate([value, pad])
    return batch


class TakeRows:
  """grain map: keeps rows [begin, end) of every array (a process's share of a global batch)."""

  def __init__(self, begin: int, end: int):
    self.begin, self.end = begin, end

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v[self.begin:self.end] for k, v in batch.items()}


# --------------------------------------------------------------------------- logical data shards


def process_shards(shard_count: int, process_index: int, process_count: int) -> range:
  """The logical training shards process p of P reads: p*(S/P) .. (p+1)*(S/P) - 1."""
  per_process = shard_count // process_count
  return range(process_index * per_process, (process_index + 1) * per_process)


class ShardedBatchesIterDataset(grain.IterDataset):
  """Stacks the row blocks of several logical data shards, in shard order.

  Shard s holds documents s, s+S, s+2S, ... and packs its own batch_size/S rows per step, so
  the global batch (shard 0's rows, shard 1's, ...) is the same whichever processes read
  the shards. State: {'shard_count': S, 'shards': {'<s>': state of shard s}}.
  """

  def __init__(self, parents: Sequence[grain.IterDataset], shard_ids: Sequence[int],
               shard_count: int):
    super().__init__(list(parents))
    self._shard_ids, self._shard_count = list(shard_ids), shard_count

  def __iter__(self) -> '_ShardedBatchesIterator':
    return _ShardedBatchesIterator([p.__iter__() for p in self._parents], self._shard_ids,
                                   self._shard_count)

  def __str__(self) -> str:
    return f'ShardedBatchesIterDataset(shards={self._shard_ids}, shard_count={self._shard_count})'


class _ShardedBatchesIterator(grain.DatasetIterator):

  def __init__(self, parents, shard_ids: list[int], shard_count: int):
    super().__init__(parents)
    self._shard_ids, self._shard_count = shard_ids, shard_count

  def __next__(self) -> dict[str, np.ndarray]:
    blocks = [next(p) for p in self._parents]  # A finite split ends with its first shard.
    if len(blocks) == 1:
      return blocks[0]
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}

  def get_state(self) -> dict[str, Any]:
    return {'shard_count': self._shard_count,
            'shards': {str(s): p.get_state() for s, p in zip(self._shard_ids, self._parents)}}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or 'shards' not in state:
      raise DataError('data iterator state has no per-shard positions (saved by an older '
                      'version)')
    if state['shard_count'] != self._shard_count:
      raise DataError(f"data iterator state was saved with data.shard_count="
                      f"{state['shard_count']}, this run has {self._shard_count}")
    missing = [s for s in self._shard_ids if str(s) not in state['shards']]
    if missing:
      raise DataError(f'data iterator state lacks shards {missing} of {self._shard_count}')
    for s, parent in zip(self._shard_ids, self._parents):
      parent.set_state(state['shards'][str(s)])

  def __str__(self) -> str:
    return f'ShardedBatchesIterator(shards={self._shard_ids})'


def merge_iterator_states(states: Sequence[Any]) -> Any:
  """One iterator state from the states several processes saved: their shards united.

  Raises DataError where the states cannot be combined (different data.shard_count, or a
  leaf that differs between processes).
  """
  first = states[0]
  if isinstance(first, dict) and 'shards' in first and 'shard_count' in first:
    if any(s.get('shard_count') != first['shard_count'] for s in states):
      raise DataError('processes saved data iterator states with different data.shard_count')
    shards = {}
    for state in states:
      shards.update(state['shards'])
    return {'shard_count': first['shard_count'], 'shards': shards}
  if isinstance(first, dict):
    if any(not isinstance(s, dict) or s.keys() != first.keys() for s in states):
      raise DataError('processes saved data iterator states of different structure')
    return {k: merge_iterator_states([s[k] for s in states]) for k in first}
  if any(s != first for s in states):
    raise DataError('processes saved data iterator states that cannot be merged')
  return first


def restore_iterator(iterator, directory, step: int) -> None:
  """Sets `iterator` to the state saved in a checkpoint's data directory, by any process count.

  grain's Orbax handler writes one process_<i>-of-<n>.json per process. Same process count:
  each process reads its own file. Another process count: every file is read and the
  per-shard positions are united (merge_iterator_states), so each process continues its
  shards exactly where they were (this needs the same data.shard_count). If the positions
  cannot be mapped (data.shard_count changed), the iterator restarts and skips `step`
  batches, with a warning: the data order then differs from the saved run's, and skipping
  re-reads that many batches.
  """
  import jax  # pylint: disable=import-outside-toplevel

  directory = epath.Path(directory)
  own = directory / f'process_{jax.process_index()}-of-{jax.process_count()}.json'
  files = [own] if own.exists() else sorted(directory.glob('process_*-of-*.json'))
  if not files:
    raise DataError(f'{directory}: no data iterator state in the checkpoint')
  initial = iterator.get_state()
  try:
    iterator.set_state(merge_iterator_states([json.loads(f.read_text()) for f in files]))
  except DataError as e:
    logging.warning('data iterator: %s; restarting it and skipping %d batches (the data order '
                    'differs from the saved run)', e, step)
    iterator.set_state(initial)
    for _ in range(step):
      next(iterator)


# --------------------------------------------------------------------------- prepared shards


def read_prepared_meta(prepared_dir) -> dict:
  path = epath.Path(prepared_dir) / _PREPARED_META
  if not path.exists():
    raise DataError(f"config key data.prepared_dir: no {_PREPARED_META} in '{prepared_dir}' "
                    '(write it with `python -m lm.data prepare`)')
  meta = json.loads(path.read_text())
  if meta.get('format') != _PREPARED_FORMAT:
    raise DataError(f"{path}: prepared format {meta.get('format')} is not {_PREPARED_FORMAT}; "
                    'prepare the data again')
  return meta


def _write_shards(out_dir: epath.Path, split: str, records: list[bytes], num_shards: int) -> list[str]:
  """Writes contiguous blocks of records (so shard order = record order); returns file names."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  num_shards = max(1, min(num_shards, len(records)))
  names = []
  local = not str(out_dir).startswith(('gs://', 's3://'))
  staging = out_dir if local else epath.Path(tempfile.mkdtemp(prefix='lm_prepare_'))
  for shard in range(num_shards if records else 0):
    name = f'{split}-{shard:05d}-of-{num_shards:05d}.array_record'
    begin, end = shard * len(records) // num_shards, (shard + 1) * len(records) // num_shards
    # group_size:1 makes every record its own chunk: fast random access for the shuffle.
    writer = array_record_module.ArrayRecordWriter(str(staging / name), 'group_size:1')
    for raw in records[begin:end]:
      writer.write(raw)
    writer.close()
    if not local:
      (staging / name).copy(out_dir / name, overwrite=True)
    names.append(name)
  return names


def prepare(cfg, tokenizer, out_dir=None) -> dict:
  """Tokenizes the configured source once into ArrayRecord shards + meta.json + tokenizer."""
  task = cfg.finetune.task
  out_dir = epath.Path(out_dir or cfg.data.prepared_dir)
  if not str(out_dir) or str(out_dir) == '.':
    raise DataError('config key data.prepared_dir: set the output directory for `prepare`')
  if cfg.data.source == 'mixture':
    raise DataError("config key data.source: `prepare` takes one source, not 'mixture'")
  prepare_cfg = copy.deepcopy(cfg)
  prepare_cfg.data.prepared_dir = ''  # Read the raw source, not the (future) output.
  # All training documents: data.train_fraction applies when the shards are read.
  [(_, splits, stats)] = split_components(prepare_cfg, task, train_fraction=1.0)
  names = class_names(prepare_cfg) if task == 'classify' else []
  label_ids = {name: i for i, name in enumerate(names)}
  out_dir.mkdir(parents=True, exist_ok=True)
  meta = {'format': _PREPARED_FORMAT, 'task': task, 'tokenizer_fingerprint': tokenizer.fingerprint,
          'vocab_size': tokenizer.vocab_size, 'class_names': names, 'splits': {},
          'stats': stats.to_dict(), 'data_config': json.loads(json.dumps(cfg.data.to_dict(), default=list))}
  for split in SPLITS:
    records, tokens = [], 0
    for begin in range(0, len(splits[split]), 1024):
      for ids, aux in tokenize_records(splits[split][begin:begin + 1024], tokenizer, task, label_ids):
        records.append(encode_prepared(ids, aux))
        tokens += len(ids)
    files = _write_shards(out_dir, split, records, int(cfg.data.prepare_shards))
    meta['splits'][split] = {'documents': len(records), 'tokens': tokens, 'files': files}
  tokenizer.save(out_dir / 'tokenizer.model')
  (out_dir / _PREPARED_META).write_text(json.dumps(meta, indent=2))
  return meta


def _prepared_dataset(cfg, tokenizer, split: str, task: str) -> tuple[grain.MapDataset, DataStats]:
  meta = read_prepared_meta(cfg.data.prepared_dir)
  if meta['tokenizer_fingerprint'] != tokenizer.fingerprint:
    raise DataError(
        f"config key data.prepared_dir: shards in '{cfg.data.prepared_dir}' were tokenized with "
        f"tokenizer {meta['tokenizer_fingerprint']}, not {tokenizer.fingerprint}; set "
        f"tokenizer.path to {epath.Path(cfg.data.prepared_dir) / 'tokenizer.model'}")
  if meta['task'] != task:
    raise DataError(f"config key finetune.task: shards were prepared for task '{meta['task']}', "
                    f"not '{task}'")
  files = [str(epath.Path(cfg.data.prepared_dir) / f) for f in meta['splits'][split]['files']]
  source = grain.sources.ArrayRecordDataSource(files) if files else []
  ds = grain.MapDataset.source(source)
  stats = DataStats.from_dict(meta['stats'])
  if split == 'train':
    keep = _fraction_count(len(ds), cfg.data.train_fraction)
    stats.held_out = len(ds) - keep
    ds = ds[:keep]
  return ds.map(decode_prepared), stats


# --------------------------------------------------------------------------- pipeline


def _document_datasets(cfg, tokenizer, split: str, task: str, shard: tuple[int, int],
                       label_ids: dict[str, int]) -> tuple[list[tuple[grain.MapDataset, float]], DataStats]:
  """Per component: a MapDataset of (tokens, aux) in this process's order, and its weight."""
  index, count = shard
  train = split == 'train'
  epochs = cfg.data.num_epochs or None

  def order(ds: grain.MapDataset, seed_offset: int) -> grain.MapDataset:
    ds = ds[index::count] if count > 1 else ds
    if not train:
      return ds.shuffle(_VALIDATION_SEED + seed_offset) if len(ds) else ds
    if not len(ds):
      raise DataError(f"data shard {index}/{count}: no training documents in it "
                      f'({data_stats(cfg, task).summary()})')
    return ds.shuffle((cfg.data.shuffle_seed + seed_offset) % 2**32).repeat(epochs)

  if cfg.data.prepared_dir:
    ds, stats = _prepared_dataset(cfg, tokenizer, split, task)
    return [(order(ds, 0), 1.0)], stats
  result, total = [], DataStats()
  tokenize = TokenizeRecord(tokenizer, task, label_ids)
  for i, (comp, splits, stats) in enumerate(split_components(cfg, task)):
    total = total.merge(stats)
    ds = grain.MapDataset.source(splits[split])
    if train and not len(ds):
      raise DataError(f"{comp.name}: no training documents left ({stats.summary()})")
    result.append((order(ds, i).map(tokenize), comp.weight))
  return result, total


def make_pipeline(cfg, tokenizer, split: str, *, process_index: int = 0, process_count: int = 1,
                  task: str | None = None) -> grain.DatasetIterator:
  """A grain iterator of this process's batches of `split` (see the module docstring)."""
  task = task or cfg.finetune.task
  check_data_config(cfg, task)
  if split not in SPLITS:
    raise DataError(f'split must be one of {SPLITS}, got {split!r}')
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index {process_index} is not in [0, {process_count})')
  if cfg.data.batch_size % process_count:
    raise DataError(f'config key data.batch_size: {cfg.data.batch_size} rows cannot be split '
                    f'evenly over {process_count} processes')
  train = split == 'train'
  local_rows = cfg.data.batch_size // process_count
  # Training: each process reads its own logical shards (data.shard_count) and stacks their rows.
  # Validation: each process builds the global batches and keeps its rows, so all processes see
  # the same (finite) number of batches.
  shard_count = cfg.data.shard_count or process_count
  if train and (shard_count < 0 or shard_count % process_count
                or cfg.data.batch_size % shard_count):
    raise DataError(f'config key data.shard_count: {shard_count} shards must be a multiple of the '
                    f'{process_count} processes and divide data.batch_size={cfg.data.batch_size}')
  shards = process_shards(shard_count, process_index, process_count) if train else range(1)
  shard_total = shard_count if train else 1
  rows = cfg.data.batch_size // shard_total
  label_ids = {}
  if task == 'classify':
    names = class_names(cfg)
    label_ids = {name: i for i, name in enumerate(names)}
    if cfg.model.num_classes != len(names):
      raise DataError(f'config key model.num_classes: {cfg.model.num_classes}, but the data has '
                      f'{len(names)} labels {names[:10]}')
  seq_len = cfg.data.seq_len
  threads = max(1, cfg.data.read_threads // len(shards))
  read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads)
  per_shard = []
  for shard in shards:
    datasets, stats = _document_datasets(cfg, tokenizer, split, task, (shard, shard_total),
                                         label_ids)
    if len(datasets) > 1:
      # A finite mix ends with its shortest part; a component without validation documents
      # would end it before it starts.
      datasets = [(d, w) for d, w in datasets if len(d)] or datasets[:1]
    ds = (datasets[0][0] if len(datasets) == 1 else
          grain.MapDataset.mix([d for d, _ in datasets], [w for _, w in datasets]))
    if task == 'classify':
      ds = ds.map(ClassifyRow(seq_len, tokenizer.pad_id))
      batches = ds.batch(rows, batch_fn=StackRows(rows, seq_len, tokenizer.pad_id))
      per_shard.append(batches.to_iter_dataset(read_options))
    else:
      elements = ds.batch(_DOCS_PER_ELEMENT, batch_fn=concat_docs).to_iter_dataset(read_options)
      per_shard.append(PackedBatchIterDataset(elements, rows=rows, seq_len=seq_len,
                                              pad_id=tokenizer.pad_id))
  iter_ds = (ShardedBatchesIterDataset(per_shard, shards, shard_count) if train else
             per_shard[0])
  if not train and process_count > 1:
    iter_ds = iter_ds.map(TakeRows(process_index * local_rows, (process_index + 1) * local_rows))
  if train and cfg.data.worker_count > 0:
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; scripts may not parse any.
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.worker_count))
  elif cfg.data.prefetch_batches > 0:
    iter_ds = grain.experimental.ThreadPrefetchIterDataset(
        iter_ds, prefetch_buffer_size=cfg.data.prefetch_batches)
  iterator = iter(iter_ds)
  iterator.data_stats = stats
  logging.info('data %s (process %d/%d): %s', split, process_index, process_count, stats.summary())
  _LIVE_ITERATORS.add(iterator)
  return iterator


# Background prefetch threads must stop before the interpreter tears modules down: grain's
# ThreadPrefetchDatasetIterator.__del__ calls close() again during teardown and fails noisily.
# So close live iterators at exit, then make their later close() a no-op.
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


def _closed_already() -> None:
  pass


@atexit.register
def _close_live_iterators() -> None:
  for iterator in list(_LIVE_ITERATORS):
    iterator.close()
    iterator.close = _closed_already


# --------------------------------------------------------------------------- report and bench


def _split_tokens(cfg, tokenizer, split: str, task: str) -> tuple[list[np.ndarray], int]:
  """Token arrays of every document of the split, and the split's text bytes."""
  if cfg.data.prepared_dir:
    meta = read_prepared_meta(cfg.data.prepared_dir)
    ds, _ = _prepared_dataset(cfg, tokenizer, split, task)
    kept = DataStats.from_dict(meta['stats']).kept_bytes[split]
    return [ds[i][0] for i in range(len(ds))], kept
  records = load_documents(cfg, split, task)
  docs = []
  for begin in range(0, len(records), 1024):
    docs.extend(t for t, _ in tokenize_records(records[begin:begin + 1024], tokenizer, task))
  return docs, sum(len(_filter_text(r).encode('utf-8')) for r in records)


def report(cfg, tokenizer, split: str = 'train', top: int = 20) -> str:
  """Human-readable counts of a split: documents, tokens, bytes/token, filters, top tokens."""
  task = cfg.finetune.task
  stats = data_stats(cfg, task)
  docs, text_bytes = _split_tokens(cfg, tokenizer, split, task)
  lengths = np.asarray([len(d) for d in docs], np.int64)
  tokens = int(lengths.sum())
  specials = int(sum((d == tokenizer.bos_id).sum() + (d == tokenizer.eos_id).sum() for d in docs))
  source = cfg.data.prepared_dir or ', '.join(c.name for c in components(cfg))
  lines = [
      f'source: {source} (task {task}, split {split})',
      f'tokenizer: {tokenizer!r}',
      f'documents: read {stats.read}, kept train {stats.kept["train"]} / validation '
      f'{stats.kept["validation"]}, held out by train_fraction {stats.held_out}',
      f'duplicates removed: exact {stats.filtered.get("duplicate", 0)}, '
      f'near {stats.filtered.get("near_duplicate", 0)}',
      'filtered: ' + (', '.join(f'{k} {v}' for k, v in sorted(stats.filtered.items())) or 'none'),
      'skipped (bad input): ' + (', '.join(f'{k} {v}' for k, v in sorted(stats.skipped.items())) or 'none'),
  ]
  lines += [f'  first {reason}: {msg}' for reason, msg in sorted(stats.skip_examples.items())]
  if not len(lengths):
    return '\n'.join(lines + [f'{split}: no documents'])
  text_tokens = max(1, tokens - specials)
  lines += [
      f'{split}: {len(lengths)} documents, {tokens} tokens ({text_tokens} without bos/eos), '
      f'{text_bytes} bytes, {text_bytes / text_tokens:.3f} bytes/token',
      f'tokens per document: mean {lengths.mean():.1f}, median {int(np.median(lengths))}, '
      f'max {lengths.max()}; rows of {cfg.data.seq_len}: {math.ceil(tokens / cfg.data.seq_len)}',
      f'top {top} tokens:',
  ]
  counts = np.bincount(np.concatenate(docs), minlength=tokenizer.vocab_size)
  for token_id in np.argsort(-counts, kind='stable')[:top]:
    lines.append(f'  {token_id:6d} {tokenizer.id_to_piece(token_id)!r:>16} '
                 f'{counts[token_id]:10d} {100 * counts[token_id] / tokens:6.2f}%')
  return '\n'.join(lines)


def bench(cfg, tokenizer, runs: int = 5, batches: int = 200) -> dict:
  """Tokens/s (non-padding inputs) of fresh training pipelines, after one warm-up batch each."""
  rates = []
  for _ in range(runs):
    iterator = make_pipeline(cfg, tokenizer, 'train')
    next(iterator)  # Building the pipeline and starting threads is not throughput.
    tokens, start = 0, time.perf_counter()
    for _ in range(batches):
      tokens += int((next(iterator)['segment_ids'] > 0).sum())
    rates.append(tokens / (time.perf_counter() - start))
    iterator.close()
  return {'median_tokens_per_s': statistics.median(rates), 'runs': rates,
          'batch': [cfg.data.batch_size, cfg.data.seq_len], 'batches_per_run': batches,
          'mode': 'prepared' if cfg.data.prepared_dir else 'on-the-fly'}


# --------------------------------------------------------------------------- CLI


def _main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from lm import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  if len(argv) != 2 or argv[1] not in ('prepare', 'report', 'bench'):
    raise SystemExit('usage: python -m lm.data {prepare,report,bench} --config=configs/X.py')
  try:
    _run_command(argv[1], flags.FLAGS.config, flags.FLAGS, tokenizer_lib)
  except ValueError as e:  # DataError, ConfigError: the message says it all.
    raise SystemExit(f'error: {e}') from None


def _run_command(command: str, cfg, f, tokenizer_lib) -> None:
  # Prepared shards carry their tokenizer; otherwise a cache directory per source + tokenizer.
  workdir = f.workdir or cfg.data.prepared_dir
  if not workdir:
    key = json.dumps([source_key(cfg), cfg.tokenizer.to_dict()], sort_keys=True, default=list)
    workdir = str(corpus.cache_dir() / 'data_cli' / hashlib.sha256(key.encode()).hexdigest()[:16])
  tokenizer = tokenizer_lib.load_or_train(cfg, workdir)
  if command == 'prepare':
    started = time.perf_counter()
    meta = prepare(cfg, tokenizer)
    print(f'prepared {cfg.data.prepared_dir} in {time.perf_counter() - started:.1f}s: '
          + ', '.join(f"{s} {m['documents']} documents / {m['tokens']} tokens in "
                      f"{len(m['files'])} shards" for s, m in meta['splits'].items()))
  elif command == 'report':
    print(report(cfg, tokenizer, f.split, f.top_tokens))
  else:
    result = bench(cfg, tokenizer, f.runs, f.batches)
    print(json.dumps(result))
    print(f"{result['mode']}: median {result['median_tokens_per_s']:,.0f} tokens/s over "
          f"{len(result['runs'])} runs of {result['batches_per_run']} batches of "
          f"{result['batch'][0]}x{result['batch'][1]}")


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'ml_collections config file.', lock_config=True)
  flags.DEFINE_string('workdir', '', 'Where the tokenizer is loaded from or trained into.')
  flags.DEFINE_enum('split', 'train', list(SPLITS), 'report: which split to count.')
  flags.DEFINE_integer('top_tokens', 20, 'report: how many of the most frequent tokens to list.')
  flags.DEFINE_integer('runs', 5, 'bench: fresh pipelines to time (the median is reported).')
  flags.DEFINE_integer('batches', 200, 'bench: batches timed per run.')
  flags.mark_flags_as_required(['config'])
  app.run(_main)

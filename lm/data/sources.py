"""What to read: the configured source(s) as components, config checks, and cache keys."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import NamedTuple

from lm import corpus
from lm.data.stats import DataError

SOURCES = ('builtin', 'text', 'jsonl', 'parquet', 'arrayrecord', 'mixture')
TASKS = ('lm', 'sft', 'classify', 'chat')


class Record(NamedTuple):
  """One document or task example, as read from a source."""

  text: str  # The document (task 'lm'), the example text ('classify') or the prompt ('sft').
  completion: str = ''  # Task 'sft'.
  label: str = ''  # Task 'classify'.
  origin: str = ''  # 'file:line' (or corpus document name), for messages.
  group: str = ''  # Split key; '' means the content hash.
  rank: float = 0.0  # hash(group) in [0, 1): split and order.
  # Task 'chat': the conversation's messages as a JSON list (a string keeps Record small,
  # hashable and cheap to pickle into grain workers).
  messages: str = ''


@dataclasses.dataclass(frozen=True)
class Component:
  """One source of a (possibly single-component) mixture."""

  name: str
  kind: str  # 'builtin', 'text', 'jsonl', 'parquet' or 'arrayrecord'.
  paths: tuple[str, ...] = ()  # Patterns, for file kinds.
  subset: str = ''  # For 'builtin'.
  weight: float = 1.0


def as_tuple(value) -> tuple:
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,) if value else ()
  return tuple(value)


def kind_from_extension(path: str) -> str:
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
    return [Component(d.source, d.source, paths=as_tuple(d.paths))]
  result = []
  for entry in as_tuple(d.mixture):
    name, weight = entry
    if name in corpus.SUBSETS:
      result.append(Component(f'builtin:{name}', 'builtin', subset=name, weight=float(weight)))
    else:
      result.append(Component(name, kind_from_extension(name), paths=(name,),
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
  require(int(d.read_chunk_bytes) >= 1, 'data.read_chunk_bytes', 'must be >= 1')
  require(int(d.shuffle_window) >= 0, 'data.shuffle_window', 'must be >= 0')
  require(int(d.dedup_buckets) >= 1, 'data.dedup_buckets', 'must be >= 1')
  require(isinstance(d.messages_field, str) and d.messages_field, 'data.messages_field',
          f'must be a field name, got {d.messages_field!r}')
  require(isinstance(d.chat_template, str), 'data.chat_template',
          "must be '' (the model's own, else the default), 'required', 'default' or a path")
  unknown_kinds = set(as_tuple(d.builtin_kinds)) - set(corpus.KINDS)
  require(not unknown_kinds and as_tuple(d.builtin_kinds), 'data.builtin_kinds',
          f'must be a non-empty subset of {corpus.KINDS}, got {d.builtin_kinds!r}')
  if d.source == 'mixture':
    entries = as_tuple(d.mixture)
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
    require(as_tuple(d.paths) or d.prepared_dir, 'data.paths',
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
          'validation_paths',
          'text_field', 'prompt_field', 'completion_field', 'label_field', 'messages_field',
          'on_error', 'dedup',
          'near_dedup', 'near_dedup_threshold', 'min_chars', 'max_chars', 'max_nontext_fraction')
  key = {k: d[k] for k in keys}
  key['task'] = task or cfg.finetune.task
  return json.loads(json.dumps(key, default=list))


def validation_component(cfg) -> Component | None:
  """data.validation_paths as one component (its kind from the first path's extension)."""
  paths = as_tuple(cfg.data.validation_paths)
  if not paths:
    return None
  return Component('validation_paths', kind_from_extension(paths[0]), paths=paths)


def label_sort_key(label: str):
  return (0, int(label), '') if re.fullmatch(r'-?\d+', label) else (1, 0, label)

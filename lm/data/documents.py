"""A split's documents in memory: read, filter, de-duplicate, split by hash rank (small corpora)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import heapq

from lm import corpus
from lm import tokenizer as tokenizer_lib
from lm.data import prepared
from lm.data.split import fraction_count, split_rank
from lm.data.stream import SplitSelector, unit_records
from lm.data.units import list_units
from lm.data.filters import filter_records, filter_text
from lm.data.readers import expand_paths, read_component
from lm.data.sources import (Component, Record, check_data_config, components, is_builtin_only,
                             label_sort_key, source_key, validation_component)
from lm.data.stats import SPLITS, DataError, DataStats, OnError


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
    on_error = OnError(cfg.data.on_error, stats)
    records = filter_records(read_component(comp, task, cfg.data, on_error), cfg.data, task, stats)
    if len(_RECORDS_CACHE) >= 8:
      _RECORDS_CACHE.pop(next(iter(_RECORDS_CACHE)))
    _RECORDS_CACHE[key] = (records, stats)
  return _RECORDS_CACHE[key]


def split_components(cfg, task: str | None = None, train_fraction: float | None = None,
                     only: list[Component] | None = None) -> list[tuple[Component, dict,
                                                                         DataStats]]:
  """Per component: {'train': [...], 'validation': [...]} records and their DataStats.

  With data.validation_paths, every document of the configured sources is training data and
  the validation split is the documents of those paths (one more component, train empty).
  """
  task = task or cfg.finetune.task
  check_data_config(cfg, task)
  fraction = cfg.data.train_fraction if train_fraction is None else train_fraction
  validation = validation_component(cfg)
  comps = only if only is not None else components(cfg) + ([validation] if validation else [])
  result = []
  for comp in comps:
    records, read_stats = _component_records(comp, cfg, task)
    if comp is validation:
      splits = {'train': [], 'validation': _split(records, 1.0)['validation']}
    else:
      splits = _split(records, 0.0 if validation else cfg.data.validation_share)
    keep = fraction_count(len(splits['train']), fraction)
    stats = dataclasses.replace(read_stats, kept={}, kept_bytes={},
                                held_out=len(splits['train']) - keep)
    splits['train'] = splits['train'][:keep]
    for split in SPLITS:
      stats.kept[split] = len(splits[split])
      stats.kept_bytes[split] = sum(len(filter_text(r).encode('utf-8')) for r in splits[split])
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
    return DataStats.from_dict(prepared.read_prepared_meta(cfg.data.prepared_dir)['stats'])
  total = DataStats()
  for _, _, stats in split_components(cfg, task):
    total = total.merge(stats)
  return total


def _streamed_sample(cfg, task: str, limit: int) -> list[Record]:
  """The `limit` training records of lowest hash rank, streamed: memory ~ limit documents."""
  selector = SplitSelector(cfg.data.validation_share, cfg.data.train_fraction,
                           validation_component(cfg) is not None)
  key = 'data.mixture' if cfg.data.source == 'mixture' else 'data.paths'
  heap, stats, order = [], DataStats(), 0
  for comp in components(cfg):
    for unit in list_units(comp, cfg.data, 1, key):
      for record in unit_records(unit, task, cfg.data, 'train', selector, stats):
        order += 1  # Ties (equal ranks) keep source order.
        item = (-record.rank, -order, record)
        if len(heap) < limit:
          heapq.heappush(heap, item)
        elif item > heap[0]:
          heapq.heapreplace(heap, item)
  return [r for _, _, r in sorted(heap, reverse=True)]


def tokenizer_training_texts(cfg) -> list[str]:
  """Up to tokenizer.max_train_docs training texts, a hash-random sample across components.

  The built-in corpus is sampled in memory (its size is fixed); files are streamed.
  """
  limit = int(cfg.tokenizer.max_train_docs)
  if is_builtin_only(cfg):
    records = sorted(load_documents(cfg, 'train'), key=lambda r: r.rank)
  else:
    records = _streamed_sample(cfg, cfg.finetune.task, limit)
  if not records:
    raise DataError('cannot train a tokenizer: the training split has no documents '
                    f'({data_stats(cfg).summary()})')
  return [filter_text(r) for r in records[:int(cfg.tokenizer.max_train_docs)]]


def class_names(cfg) -> list[str]:
  """Label strings of task 'classify', sorted (numerically if all are integers); id = index."""
  if cfg.data.prepared_dir:
    return list(prepared.read_prepared_meta(cfg.data.prepared_dir)['class_names'])
  labels = set()
  for _, splits, _ in split_components(cfg, 'classify', train_fraction=1.0):
    labels.update(r.label for split in SPLITS for r in splits[split])
  return sorted(labels, key=label_sort_key)



def tokenizer_cache_key(cfg) -> dict | None:
  """What identifies the tokenizer's training texts, when they are fixed (the built-in corpus)."""
  if not is_builtin_only(cfg):
    return None
  return {'data': source_key(cfg), 'corpus': corpus.cache_key()}


def load_or_train_tokenizer(cfg, workdir) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer: tokenizer.load_or_train, trained on this config's data if need be."""
  return tokenizer_lib.load_or_train(
      cfg, workdir, training_texts=lambda: tokenizer_training_texts(cfg),
      cache_key=tokenizer_cache_key(cfg), cache_dir=corpus.cache_dir())

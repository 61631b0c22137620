"""The tokenized documents of one logical shard and split: (ids, loss mask) per document.

Three kinds of component feed a shard:
  prepared shards  grain random access over the ArrayRecord index: a global shuffle per epoch,
                   each shard reading records s, s+S, ... of the shuffled order (state O(1));
  built-in corpus  generated in memory by lm.corpus (its size is fixed), shuffled the same way;
  files            streamed unit by unit (stream.py): each shard reads only its units, with a
                   window shuffle of data.shuffle_window documents.
A mixture draws documents from its components with probability ~ weight.
"""

from __future__ import annotations

import functools

import grain

from lm.data import documents, prepared
from lm.data.sources import Component, components, validation_component
from lm.data.stats import DataError, DataStats
from lm.data.stream import SplitSelector, UnitStreamIterDataset, unit_records
from lm.data.tokenize import TokenizeRecord, task_template
from lm.data.units import list_units, shard_units

_VALIDATION_SEED = 0  # Fixed, so every run evaluates on the same documents in the same order.


def _order(ds: grain.MapDataset, cfg, train: bool, shard: tuple[int, int], seed_offset: int,
           name: str) -> grain.MapDataset:
  index, count = shard
  ds = ds[index::count] if count > 1 else ds
  if not train:
    return ds.shuffle(_VALIDATION_SEED + seed_offset) if len(ds) else ds
  if not len(ds):
    raise DataError(f'data shard {index}/{count} of {name}: no training documents in it')
  epochs = cfg.data.num_epochs or None
  return ds.shuffle((cfg.data.shuffle_seed + seed_offset) % 2**32).repeat(epochs)


def _stream(comp: Component, cfg, split: str, task: str, shard: tuple[int, int], seed_offset: int,
            stats: DataStats, key: str) -> grain.IterDataset:
  train = split == 'train'
  index, count = shard
  explicit = validation_component(cfg) is not None
  selector = SplitSelector(cfg.data.validation_share, cfg.data.train_fraction, explicit)
  # Enough units for every shard, and for each of its grain worker processes (data.worker_count).
  workers = max(1, cfg.data.worker_count) if train else 1
  units = shard_units(list_units(comp, cfg.data, count * workers, key), index, count)
  read = functools.partial(_read_unit, task=task, d=cfg.data, split=split, selector=selector,
                           stats=stats)
  seed = (cfg.data.shuffle_seed + seed_offset) % 2**32 if train else None
  ds = UnitStreamIterDataset(units, read, seed=seed, epochs=(cfg.data.num_epochs or None) if train
                             else 1, name=f'data shard {index}/{count} of {comp.name}')
  if train and cfg.data.shuffle_window > 1:
    ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=cfg.data.shuffle_window,
                                                     seed=seed)
  return ds


def _read_unit(unit, *, task, d, split, selector, stats):
  return unit_records(unit, task, d, split, selector, stats)


def shard_documents(cfg, tokenizer, split: str, task: str, shard: tuple[int, int],
                    label_ids: dict[str, int],
                    stats: DataStats | None = None) -> tuple[list[tuple], DataStats]:
  """Per component: (dataset of tokenized documents, weight, maybe_empty), and the DataStats
  (live for streamed components: pass the same `stats` for every shard of a process). The
  dataset is a MapDataset (random access: prepared, built-in) or an IterDataset (streamed)."""
  train = split == 'train'
  if cfg.data.prepared_dir:
    ds, stats = prepared.prepared_dataset(cfg, tokenizer, split, task)
    ds = _order(ds, cfg, train, shard, 0, cfg.data.prepared_dir)
    return [(ds, 1.0, not len(ds))], stats
  tokenize = TokenizeRecord(tokenizer, task, label_ids, task_template(cfg, tokenizer, task))
  comps = components(cfg)
  validation = validation_component(cfg)
  if validation is not None and not train:
    comps, key = [validation], 'data.validation_paths'
  else:
    key = 'data.mixture' if cfg.data.source == 'mixture' else 'data.paths'
  result = []
  streaming = any(c.kind != 'builtin' for c in comps)
  total = stats if stats is not None else DataStats()
  if streaming:
    total.note = 'streaming: counts so far in this process'
  for i, comp in enumerate(comps):
    if comp.kind == 'builtin':
      [(_, splits, stats)] = documents.split_components(cfg, task, only=[comp])
      total.add(stats)
      ds = _order(grain.MapDataset.source(splits[split]), cfg, train, shard, i, comp.name)
      result.append((ds.map(tokenize), comp.weight, not len(ds)))
    else:
      ds = _stream(comp, cfg, split, task, shard, i, total, key)
      result.append((ds.map(tokenize), comp.weight, not train))
  return result, total

"""make_pipeline: documents -> tokenize -> pack -> per-process batches, as one grain iterator."""

from __future__ import annotations

import atexit
import weakref

from absl import logging
import grain

from lm.data import documents, prepared
from lm.data.packing import ClassifyRow, PackedBatchIterDataset, StackRows, TakeRows
from lm.data.shards import ShardedBatchesIterDataset, process_shards
from lm.data.sources import check_data_config
from lm.data.stats import SPLITS, DataError, DataStats
from lm.data.tokenize import TokenizeRecord, concat_docs

_DOCS_PER_ELEMENT = 16  # Documents tokenized per grain element: amortises per-element overhead.
_VALIDATION_SEED = 0  # Fixed, so every run evaluates on the same documents in the same order.


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
                      f'({documents.data_stats(cfg, task).summary()})')
    return ds.shuffle((cfg.data.shuffle_seed + seed_offset) % 2**32).repeat(epochs)

  if cfg.data.prepared_dir:
    ds, stats = prepared.prepared_dataset(cfg, tokenizer, split, task)
    return [(order(ds, 0), 1.0)], stats
  result, total = [], DataStats()
  tokenize = TokenizeRecord(tokenizer, task, label_ids)
  for i, (comp, splits, stats) in enumerate(documents.split_components(cfg, task)):
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
    names = documents.class_names(cfg)
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


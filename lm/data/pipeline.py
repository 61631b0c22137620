"""make_pipeline: documents -> tokenize -> pack -> per-process batches, as one grain iterator."""

from __future__ import annotations

import atexit
import weakref

from absl import logging
import grain

from lm.data import documents
from lm.data.packing import ClassifyRow, PackedBatchIterDataset, StackRows, TakeRows
from lm.data.shards import ShardedBatchesIterDataset, process_shards
from lm.data.sources import check_data_config
from lm.data.stats import SPLITS, DataError, DataStats
from lm.data.shard_documents import shard_documents
from lm.data.tokenize import concat_docs

_DOCS_PER_ELEMENT = 16  # Documents tokenized per grain element: amortises per-element overhead.


def _batches(datasets: list[tuple], task: str, rows: int, seq_len: int, pad_id: int,
             read_options: grain.ReadOptions) -> grain.IterDataset:
  """Tokenized documents -> [rows, seq_len] batches. A single random-access component is
  batched before it becomes an iterator, so grain's read threads decode and concatenate too."""
  if len(datasets) == 1 and isinstance(datasets[0][0], grain.MapDataset):
    ds = datasets[0][0]
  else:
    ds = grain.IterDataset.mix(
        [d.to_iter_dataset(read_options) if isinstance(d, grain.MapDataset) else d
         for d, _, _ in datasets], [w for _, w, _ in datasets]) if len(datasets) > 1 else (
             datasets[0][0])
  if task == 'classify':
    ds = ds.map(ClassifyRow(seq_len, pad_id)).batch(rows, batch_fn=StackRows(rows, seq_len, pad_id))
    return ds.to_iter_dataset(read_options) if isinstance(ds, grain.MapDataset) else ds
  elements = ds.batch(_DOCS_PER_ELEMENT, batch_fn=concat_docs)
  if isinstance(elements, grain.MapDataset):
    elements = elements.to_iter_dataset(read_options)
  return PackedBatchIterDataset(elements, rows=rows, seq_len=seq_len, pad_id=pad_id)


def make_pipeline(cfg, tokenizer, split: str, *, process_index: int = 0, process_count: int = 1,
                  task: str | None = None, batch_size: int | None = None) -> grain.DatasetIterator:
  """A grain iterator of this process's batches of `split` (see lm/data/__init__.py).

  batch_size overrides data.batch_size (global rows), e.g. for a second pipeline mixed into
  another's batches; its state is a plain dict, so composite states checkpoint as usual.
  """
  task = task or cfg.finetune.task
  global_rows = int(batch_size or cfg.data.batch_size)
  check_data_config(cfg, task)
  if split not in SPLITS:
    raise DataError(f'split must be one of {SPLITS}, got {split!r}')
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index {process_index} is not in [0, {process_count})')
  if global_rows % process_count:
    raise DataError(f'config key data.batch_size: {global_rows} rows cannot be split '
                    f'evenly over {process_count} processes')
  train = split == 'train'
  local_rows = global_rows // process_count
  # Training: each process reads its own logical shards (data.shard_count) and stacks their rows.
  # Validation: each process builds the global batches and keeps its rows, so all processes see
  # the same (finite) number of batches.
  shard_count = cfg.data.shard_count or process_count
  if train and (shard_count < 0 or shard_count % process_count
                or global_rows % shard_count):
    raise DataError(f'config key data.shard_count: {shard_count} shards must be a multiple of the '
                    f'{process_count} processes and divide data.batch_size={global_rows}')
  shards = process_shards(shard_count, process_index, process_count) if train else range(1)
  shard_total = shard_count if train else 1
  rows = global_rows // shard_total
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
  per_shard, stats = [], DataStats()
  for shard in shards:
    datasets, stats = shard_documents(cfg, tokenizer, split, task, (shard, shard_total), label_ids,
                                      stats)
    if len(datasets) > 1:
      # A finite mix ends with its shortest part; a component without validation documents
      # would end it before it starts.
      datasets = [x for x in datasets if not x[2]] or datasets[:1]
    per_shard.append(_batches(datasets, task, rows, seq_len, tokenizer.pad_id, read_options))
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


"""Logical data shards: which process reads what, and iterator state across process counts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from absl import logging
from etils import epath
import grain
import numpy as np

from lm.data.stats import DataError


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


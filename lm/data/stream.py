"""Streaming records of raw sources: read units in turn, filter, keep one split, checkpointably.

A logical shard's documents come from its units (units.py) in a per-epoch shuffled unit order
(training) or in listing order (validation), then through a window shuffle of
data.shuffle_window documents (training): memory is one unit's dedup set plus the window,
whatever the corpus size. Exact de-duplication here is within a unit (<= data.read_chunk_bytes
of text); corpus-wide exact and near de-duplication is what `python -m lm.data prepare` does.

Iterator state: {'epoch', 'unit' (position in the epoch's order), 'taken' (records yielded from
that unit)}. Restoring re-reads the unit from its start (re-running its filters and dedup) and
skips `taken` records, so a restored stream continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from lm.data.filters import screen
from lm.data.sources import Record
from lm.data.split import split_rank
from lm.data.stats import DataError, DataStats, OnError
from lm.data.units import Unit


class SplitSelector:
  """Which split a record belongs to, by hash rank; train_fraction keeps a nested rank band."""

  def __init__(self, validation_share: float, train_fraction: float, explicit: bool):
    # explicit: validation comes from data.validation_paths, so every document of the
    # training paths is training data (and every document of those paths is validation).
    self.explicit = explicit
    self.share = 0.0 if explicit else validation_share
    self.train_top = self.share + train_fraction * (1.0 - self.share)

  def split_of(self, rank: float) -> str | None:
    if rank < self.share:
      return 'validation'
    return 'train' if rank < self.train_top or self.train_top >= 1.0 else None


def unit_records(unit: Unit, task: str, d, split: str, selector: SplitSelector,
                 stats: DataStats) -> Iterator[Record]:
  """Kept records of one unit and split, with group and rank filled; counts into `stats`."""
  on_error, seen = OnError(d.on_error, stats), set()
  for record in unit.read(task, d, on_error):
    digest = screen(record, d, task, stats, seen)
    if digest is None:
      continue
    group = record.group or digest.hex()
    rank = split_rank(group)
    explicit_validation = selector.explicit and split == 'validation'
    record_split = split if explicit_validation else selector.split_of(rank)
    if record_split is None:
      stats.held_out += 1
    elif record_split == split:
      stats.kept[split] += 1
      yield record._replace(group=group, rank=rank)


class UnitStreamIterDataset(grain.IterDataset):
  """Records of a list of units, epoch after epoch (see the module docstring)."""

  def __init__(self, units: Sequence[Unit], read: Callable[[Unit], Iterator[Record]], *,
               seed: int | None, epochs: int | None, name: str):
    super().__init__()
    self._units, self._read, self._seed, self._epochs, self._name = (
        list(units), read, seed, epochs, name)
    if not self._units:
      raise DataError(f'{name}: no input for it (more files, a smaller data.read_chunk_bytes '
                      'or a smaller data.shard_count)')

  def __iter__(self) -> '_UnitStreamIterator':
    return _UnitStreamIterator(self._units, self._read, self._seed, self._epochs, self._name)

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """grain's worker processes (data.worker_count) each read a slice of the units."""
    del sequential_slice  # Units are already contiguous pieces of the input.
    self._units = self._units[sl]
    if not self._units:
      raise DataError(f'{self._name}: too few units for data.worker_count workers (more files, '
                      'a smaller data.read_chunk_bytes or fewer workers)')

  def __str__(self) -> str:
    return f'UnitStreamIterDataset({self._name}, units={len(self._units)})'


class _UnitStreamIterator(grain.DatasetIterator):

  def __init__(self, units, read, seed, epochs, name):
    super().__init__()
    self._units, self._read, self._seed, self._epochs, self._name = units, read, seed, epochs, name
    self._set(0, 0, 0)

  def _order(self, epoch: int) -> np.ndarray:
    if self._seed is None:
      return np.arange(len(self._units))
    return np.random.default_rng([self._seed, epoch]).permutation(len(self._units))

  def _set(self, epoch: int, unit: int, taken: int) -> None:
    self._epoch, self._unit, self._taken = epoch, unit, 0
    self._order_now = self._order(epoch)
    self._records = None
    self._yielded_this_epoch = taken > 0 or unit > 0
    if unit < len(self._units):
      self._open()
      for _ in range(taken):
        if next(self._records, None) is None:
          raise DataError(f'{self._name}: {self._units[self._order_now[unit]]} has fewer than '
                          f'{taken} records now; it changed since the checkpoint')
        self._taken += 1

  def _open(self) -> None:
    self._records = self._read(self._units[self._order_now[self._unit]])

  def __next__(self) -> Record:
    while True:
      if self._epochs is not None and self._epoch >= self._epochs:
        raise StopIteration
      if self._unit >= len(self._units):
        if not self._yielded_this_epoch:
          raise DataError(f'{self._name}: no documents left after filtering in a whole pass '
                          'over its input')
        self._set(self._epoch + 1, 0, 0)
        continue
      if self._records is None:
        self._open()
      record = next(self._records, None)
      if record is not None:
        self._taken += 1
        self._yielded_this_epoch = True
        return record
      self._unit, self._taken, self._records = self._unit + 1, 0, None

  def get_state(self) -> dict[str, Any]:
    return {'epoch': int(self._epoch), 'unit': int(self._unit), 'taken': int(self._taken)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._set(int(state['epoch']), int(state['unit']), int(state['taken']))

  def __str__(self) -> str:
    return f'UnitStreamIterator({self._name})'

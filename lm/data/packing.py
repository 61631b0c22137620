"""Packing: tokenized documents -> [rows, seq_len] batches with segment ids and positions.

Why lm keeps its own packer rather than grain 0.2.18's:
- FirstFitPackIterDataset / BestFitPackIterDataset place whole documents into rows: a document
  longer than a row is truncated (tokens lost) and rows end in padding. lm's pre-training
  guarantee is that no token is lost or repeated and long documents continue in the next row.
- ConcatThenSplitIterDataset does split documents across rows, but packs each feature of one
  element independently: the last input of a row has no target (one prediction lost per row,
  1/T of the data), and our loss mask (target in the same document and inside the task's mask)
  would need a second aligned pass. It also works element by element in Python.
PackedBatchIterDataset gathers a whole [rows, T] batch with a few numpy ops per batch, takes
each row's last target from the next row's first input, and keeps a two-number state (the
parent's state before its first buffered element, and a token offset), checkpointable like any
grain iterator. Task 'classify' puts one example per row (ClassifyRow) and needs no packing.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np


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
               positions.astype(np.int32), element['loss'].astype(bool, copy=False))

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


"""Tokenize: a Record -> (int32 tokens, aux), and the prepared-record byte format."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lm.data.sources import Record


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


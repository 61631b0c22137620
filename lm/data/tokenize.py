"""Tokenize: a task turns a Record into (int32 token ids, bool loss mask); prepared-record bytes.

A task is a function `(record, tokenizer, text_ids) -> (ids, loss_mask)`: loss_mask[i] says
whether token i may be a loss *target* (predicted from the tokens before it). 'lm' learns every
token after bos; 'sft' only the completion and eos; 'chat' renders record.messages with the
chat template (lm.chat; data.chat_template, resolved once per pipeline by task_template and
handed to TokenizeRecord / tokenize_records) and learns the assistant turns only. A new task is
one more entry in TASK_FUNCTIONS (and in lm.data.sources.TASKS). text_ids are record.text's ids when the caller encoded them in a batch
(SentencePiece's thread pool), else None. Task 'classify' is (ids, label id) instead: one row
per example, no packing.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence

import numpy as np

from lm import chat
from lm.data.sources import Record
from lm.data.stats import DataError

Example = tuple[np.ndarray, np.ndarray]  # (int32 ids [n], bool loss mask [n])


def _bos(tokenizer) -> list[int]:
  return [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []


def _eos(tokenizer) -> list[int]:
  return [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []


def _ids(tokenizer, text: str, ids) -> list[int]:
  return list(ids) if ids is not None else tokenizer.encode(text)


def lm_example(record: Record, tokenizer, text_ids=None) -> Example:
  ids = np.asarray(_bos(tokenizer) + _ids(tokenizer, record.text, text_ids) + _eos(tokenizer),
                   np.int32)
  return ids, np.ones(len(ids), bool)


def sft_example(record: Record, tokenizer, text_ids=None) -> Example:
  prompt = _bos(tokenizer) + _ids(tokenizer, record.text, text_ids)
  ids = np.asarray(prompt + tokenizer.encode(record.completion) + _eos(tokenizer), np.int32)
  return ids, np.arange(len(ids)) >= len(prompt)


def chat_example(record: Record, tokenizer, text_ids=None, *, template: str) -> Example:
  """record.messages rendered with the chat template; loss on the assistant turns (lm.chat)."""
  del text_ids  # The template writes the text; nothing was encoded ahead.
  try:
    ids, mask = chat.encode_chat({'messages': json.loads(record.messages)}, tokenizer, template,
                                 record.origin or 'record')
  except chat.ChatError as e:
    raise DataError(str(e)) from None
  return ids, mask.astype(bool)


TASK_FUNCTIONS: dict[str, Callable[..., Example]] = {'lm': lm_example, 'sft': sft_example,
                                                     'chat': chat_example}
# Tasks whose function takes the pipeline's resolved chat template (template=...).
TEMPLATE_TASKS = ('chat',)


def task_template(cfg, tokenizer, task: str) -> str | None:
  """The chat template a task needs, resolved once per pipeline (data.chat_template), or None."""
  if task not in TEMPLATE_TASKS:
    return None
  return chat.resolve_template(cfg.data.chat_template, tokenizer, cfg.tokenizer.path)


def template_fingerprint(template: str | None) -> str | None:
  """What prepared shards record of the chat template baked into their tokens (None: none)."""
  return None if template is None else hashlib.sha256(template.encode()).hexdigest()[:16]


def _task_function(task: str, template: str | None) -> Callable[..., Example]:
  if task in TEMPLATE_TASKS:
    if template is None:
      raise DataError(f"task '{task}' needs the chat template (lm.data.tokenize.task_template)")
    return functools.partial(TASK_FUNCTIONS[task], template=template)
  return TASK_FUNCTIONS[task]


def classify_example(record: Record, tokenizer, label_ids: dict[str, int],
                     text_ids=None) -> tuple[np.ndarray, int]:
  ids = _bos(tokenizer) + _ids(tokenizer, record.text, text_ids) + _eos(tokenizer)
  return np.asarray(ids, np.int32), label_ids.get(record.label, 0)


class TokenizeRecord:
  """grain map: Record -> (ids, loss mask), or (ids, label id) for task 'classify'.
  template: the resolved chat template, for task 'chat' (task_template)."""

  def __init__(self, tokenizer, task: str, label_ids: dict[str, int] | None = None,
               template: str | None = None):
    self.tokenizer, self.task, self.label_ids = tokenizer, task, label_ids or {}
    self.example = None if task == 'classify' else _task_function(task, template)

  def __call__(self, record: Record):
    if self.task == 'classify':
      return classify_example(record, self.tokenizer, self.label_ids)
    return self.example(record, self.tokenizer)


def tokenize_records(records: Sequence[Record], tokenizer, task: str,
                     label_ids: dict[str, int] | None = None, template: str | None = None) -> list:
  """Batch version of TokenizeRecord (texts encoded in SentencePiece's thread pool)."""
  if task in TEMPLATE_TASKS:
    example = _task_function(task, template)
    return [example(r, tokenizer) for r in records]
  texts = tokenizer.encode_batch([r.text for r in records])
  if task == 'classify':
    return [classify_example(r, tokenizer, label_ids or {}, t) for r, t in zip(records, texts)]
  return [TASK_FUNCTIONS[task](r, tokenizer, t) for r, t in zip(records, texts)]


def encode_prepared(tokens: np.ndarray, aux) -> bytes:
  """A prepared record, little-endian int32: [k, ids...] where k >= 0 is a label id or the
  count of leading tokens outside the loss (the mask is then implied), or
  [-n, ids (n), mask (n)] for any other loss mask."""
  tokens = np.asarray(tokens, '<i4')
  if not isinstance(aux, np.ndarray):
    return np.concatenate([np.asarray([aux], '<i4'), tokens]).tobytes()
  leading = int(np.argmax(aux)) if aux.any() else len(aux)
  if aux[leading:].all():
    return np.concatenate([np.asarray([leading], '<i4'), tokens]).tobytes()
  return np.concatenate([np.asarray([-len(tokens)], '<i4'), tokens,
                         aux.astype('<i4')]).tobytes()


def decode_prepared(raw: bytes) -> tuple[np.ndarray, int | np.ndarray]:
  """(ids, k) for the [k, ids...] form, (ids, bool mask) for the [-n, ids, mask] form."""
  values = np.frombuffer(raw, dtype='<i4')
  head = int(values[0])
  if head >= 0:
    return values[1:].astype(np.int32), head
  n = -head
  return values[1:1 + n].astype(np.int32), values[1 + n:1 + 2 * n] != 0


def loss_mask(ids: np.ndarray, aux) -> np.ndarray:
  """The bool loss mask of a document given as (ids, mask) or (ids, leading no-loss count)."""
  if isinstance(aux, np.ndarray):
    return aux.astype(bool, copy=False)
  return np.arange(len(ids)) >= aux


def concat_docs(docs: Sequence[tuple]) -> dict[str, np.ndarray]:
  """grain batch_fn: k tokenized documents -> one element of concatenated tokens and masks."""
  if not docs:
    return {'tokens': np.zeros(0, np.int32), 'lengths': np.zeros(0, np.int64),
            'loss': np.zeros(0, bool)}
  return {'tokens': np.concatenate([t for t, _ in docs]),
          'lengths': np.asarray([len(t) for t, _ in docs], np.int64),
          'loss': np.concatenate([loss_mask(t, a) for t, a in docs])}

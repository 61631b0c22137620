"""`report` (counts, bytes/token, top tokens) and `bench` (pipeline tokens/s)."""

from __future__ import annotations

import math
import statistics
import time

import numpy as np

from lm.data import documents, prepared
from lm.data.filters import filter_text
from lm.data.pipeline import make_pipeline
from lm.data.sources import components
from lm.data.stats import DataStats
from lm.data.tokenize import task_template, tokenize_records


def _split_tokens(cfg, tokenizer, split: str, task: str) -> tuple[list[np.ndarray], int]:
  """Token arrays of every document of the split, and the split's text bytes."""
  if cfg.data.prepared_dir:
    meta = prepared.read_prepared_meta(cfg.data.prepared_dir)
    ds, _ = prepared.prepared_dataset(cfg, tokenizer, split, task)
    kept = DataStats.from_dict(meta['stats']).kept_bytes[split]
    return [ds[i][0] for i in range(len(ds))], kept
  records = documents.load_documents(cfg, split, task)
  docs, template = [], task_template(cfg, tokenizer, task)
  for begin in range(0, len(records), 1024):
    docs.extend(t for t, _ in tokenize_records(records[begin:begin + 1024], tokenizer, task,
                                               template=template))
  return docs, sum(len(filter_text(r).encode('utf-8')) for r in records)


def report(cfg, tokenizer, split: str = 'train', top: int = 20) -> str:
  """Human-readable counts of a split: documents, tokens, bytes/token, filters, top tokens."""
  task = cfg.finetune.task
  stats = documents.data_stats(cfg, task)
  docs, text_bytes = _split_tokens(cfg, tokenizer, split, task)
  lengths = np.asarray([len(d) for d in docs], np.int64)
  tokens = int(lengths.sum())
  specials = int(sum((d == tokenizer.bos_id).sum() + (d == tokenizer.eos_id).sum() for d in docs))
  source = cfg.data.prepared_dir or ', '.join(c.name for c in components(cfg))
  lines = [
      f'source: {source} (task {task}, split {split})',
      f'tokenizer: {tokenizer!r}',
      f'documents: read {stats.read}, kept train {stats.kept["train"]} / validation '
      f'{stats.kept["validation"]}, held out by train_fraction {stats.held_out}',
      f'duplicates removed: exact {stats.filtered.get("duplicate", 0)}, '
      f'near {stats.filtered.get("near_duplicate", 0)}',
      'filtered: ' + (', '.join(f'{k} {v}' for k, v in sorted(stats.filtered.items())) or 'none'),
      'skipped (bad input): ' + (', '.join(f'{k} {v}' for k, v in sorted(stats.skipped.items())) or 'none'),
  ]
  lines += [f'  first {reason}: {msg}' for reason, msg in sorted(stats.skip_examples.items())]
  if not len(lengths):
    return '\n'.join(lines + [f'{split}: no documents'])
  text_tokens = max(1, tokens - specials)
  lines += [
      f'{split}: {len(lengths)} documents, {tokens} tokens ({text_tokens} without bos/eos), '
      f'{text_bytes} bytes, {text_bytes / text_tokens:.3f} bytes/token',
      f'tokens per document: mean {lengths.mean():.1f}, median {int(np.median(lengths))}, '
      f'max {lengths.max()}; rows of {cfg.data.seq_len}: {math.ceil(tokens / cfg.data.seq_len)}',
      f'top {top} tokens:',
  ]
  counts = np.bincount(np.concatenate(docs), minlength=tokenizer.vocab_size)
  for token_id in np.argsort(-counts, kind='stable')[:top]:
    lines.append(f'  {token_id:6d} {tokenizer.id_to_piece(token_id)!r:>16} '
                 f'{counts[token_id]:10d} {100 * counts[token_id] / tokens:6.2f}%')
  return '\n'.join(lines)


def bench(cfg, tokenizer, runs: int = 5, batches: int = 200) -> dict:
  """Tokens/s (non-padding inputs) of fresh training pipelines, after one warm-up batch each."""
  rates = []
  for _ in range(runs):
    iterator = make_pipeline(cfg, tokenizer, 'train')
    next(iterator)  # Building the pipeline and starting threads is not throughput.
    tokens, start = 0, time.perf_counter()
    for _ in range(batches):
      tokens += int((next(iterator)['segment_ids'] > 0).sum())
    rates.append(tokens / (time.perf_counter() - start))
    iterator.close()
  return {'median_tokens_per_s': statistics.median(rates), 'runs': rates,
          'batch': [cfg.data.batch_size, cfg.data.seq_len], 'batches_per_run': batches,
          'mode': 'prepared' if cfg.data.prepared_dir else 'on-the-fly'}


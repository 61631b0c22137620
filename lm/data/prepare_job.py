"""`python -m lm.data prepare`: a streaming, parallel, resumable job writing ArrayRecord shards.

Stage 1, tokenize (parallel over units, `--workers` processes; split over machines with
  --task=i --tasks=N, unit u going to task u mod N): each unit (units.py) is read, filtered,
  tokenized and written to work/u<unit>.records with its content hashes (and MinHash signatures
  under data.near_dedup); work/u<unit>.json, written last, marks it done. A killed job re-run
  skips the done units, and since a unit's output depends only on its input, the result is
  byte-identical to an uninterrupted run.
Stage 2, merge (`--merge` after N tasks; automatic with one task): de-duplicates across the
  corpus through on-disk hash buckets (dedup.py), then rewrites every unit as
  train-<unit>-of-<U>.array_record / validation-... shards (in parallel; each marked done by
  work/u<unit>.final.json), and writes meta.json: the shard list with record counts, the
  filter/dedup/skip counts and the class names. Memory in every stage is bounded by a unit's
  size, the bucket size and the number of units, never by the corpus.
Records within a shard are sorted by hash rank, so data.train_fraction keeps a prefix of
every shard: a nested, hash-random subset.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import struct
import sys
import time

from etils import epath
import numpy as np

from lm import files
from lm.data import dedup
from lm.data.filters import filter_text, screen
from lm.data.prepared import PREPARED_FORMAT, PREPARED_META, shard_name
from lm.data.sources import check_data_config, components, label_sort_key, validation_component
from lm.data.split import split_rank
from lm.data.stats import SPLITS, DataError, DataStats, OnError
from lm.data.tokenize import (decode_prepared, encode_prepared, task_template,
                               template_fingerprint, tokenize_records)
from lm.data.units import Unit, list_units

_HEADER = struct.Struct('<16sdii')  # content hash, rank, text bytes, label bytes.
_TOKENIZE_BATCH = 1024


def _work(out_dir: epath.Path) -> epath.Path:
  return out_dir / 'work'


def _unit_file(out_dir: epath.Path, index: int, suffix: str) -> epath.Path:
  return _work(out_dir) / f'u{index:06d}.{suffix}'


def plan_units(cfg) -> list[tuple[Unit, bool]]:
  """(unit, is_validation_paths) for the source and data.validation_paths, in source order."""
  d = cfg.data
  [comp] = components(cfg)
  units = [(u, False) for u in list_units(comp, d, int(d.prepare_shards))]
  validation = validation_component(cfg)
  if validation is not None:
    units += [(u, True) for u in list_units(validation, d, 1, 'data.validation_paths')]
  return units


def _tokenize_unit(job) -> dict:
  """Stage 1 for one unit; returns (and saves) its summary."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  index, unit, out_dir, d, task, tokenizer, template = job
  stats = DataStats()
  on_error = OnError(d.on_error, stats)
  digests, signatures, labels, tokens = [], [], set(), 0
  records_path = _unit_file(out_dir, index, 'records')
  batch = []  # (record, content hash) awaiting tokenization.

  def flush():
    nonlocal tokens
    examples = tokenize_records([record for record, _ in batch], tokenizer, task,
                                template=template)
    for (record, digest), (ids, aux) in zip(batch, examples):
      label = record.label.encode('utf-8')
      text_bytes = len(filter_text(record).encode('utf-8'))
      rank = split_rank(record.group or digest.hex())
      writer.write(_HEADER.pack(digest, rank, text_bytes, len(label)) + label +
                   encode_prepared(ids, aux))
      digests.append(digest)
      labels.add(record.label)
      tokens += len(ids)
      if d.near_dedup:
        signatures.append(dedup.minhash_signature(filter_text(record)))
    batch.clear()

  with files.atomic_path(records_path) as tmp:
    writer = array_record_module.ArrayRecordWriter(str(tmp), 'group_size:1')
    for record in unit.read(task, d, on_error):
      digest = screen(record, d, task, stats)  # Duplicates are dropped across units, later.
      if digest is None:
        continue
      batch.append((record, digest))
      if len(batch) == _TOKENIZE_BATCH:
        flush()
    flush()
    writer.close()
  with files.atomic_path(_unit_file(out_dir, index, 'hashes.npy')) as tmp:
    offsets = dedup.write_hashes(tmp, digests, int(d.dedup_buckets))
  if d.near_dedup:
    with files.atomic_path(_unit_file(out_dir, index, 'minhash.npy')) as tmp, tmp.open('wb') as f:
      np.save(f, np.asarray(signatures, np.uint64).reshape(-1, dedup.NEAR_PERMUTATIONS))
  summary = {'unit': str(unit), 'documents': len(digests), 'tokens': tokens, 'offsets': offsets,
             'labels': sorted(labels) if task == 'classify' else [],
             'fingerprint': tokenizer.fingerprint, 'template': template_fingerprint(template),
             'stats': stats.to_dict()}
  files.write_json(_unit_file(out_dir, index, 'json'), summary)
  return summary


def _decode_work_record(raw: bytes) -> tuple[bytes, float, int, str, np.ndarray, int]:
  digest, rank, text_bytes, label_len = _HEADER.unpack_from(raw)
  label = raw[_HEADER.size:_HEADER.size + label_len].decode('utf-8')
  tokens, aux = decode_prepared(raw[_HEADER.size + label_len:])
  return digest, rank, text_bytes, label, tokens, aux


def _finalize_unit(job) -> dict:
  """Stage 2 for one unit: drop duplicates, split, sort by rank, write the final shards."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  index, unit_count, is_validation, out_dir, drop, label_ids, validation_share = job
  reader = array_record_module.ArrayRecordReader(str(_unit_file(out_dir, index, 'records')))
  raws = reader.read_all()
  reader.close()
  dropped = set(drop.tolist())
  by_split = {s: [] for s in SPLITS}
  for doc, raw in enumerate(raws):
    if doc in dropped:
      continue
    _, rank, text_bytes, label, tokens, aux = _decode_work_record(raw)
    split = 'validation' if is_validation or rank < validation_share else 'train'
    by_split[split].append((rank, text_bytes, tokens, label_ids.get(label, aux)))
  summary = {}
  for split, entries in by_split.items():
    entries.sort(key=lambda e: e[0])
    name = shard_name(split, index, unit_count)
    if entries:
      with files.atomic_path(out_dir / name) as tmp:
        writer = array_record_module.ArrayRecordWriter(str(tmp), 'group_size:1')
        for _, _, tokens, aux in entries:
          writer.write(encode_prepared(tokens, aux))
        writer.close()
    summary[split] = {'file': name if entries else '', 'records': len(entries),
                      'tokens': int(sum(len(e[2]) for e in entries)),
                      'bytes': int(sum(e[1] for e in entries))}
  files.write_json(_unit_file(out_dir, index, 'final.json'), summary)
  return summary


class Progress:
  """A line per finished unit (at most every `every` s): units, documents, tokens/s, ETA."""

  def __init__(self, label: str, total_units: int, done: int = 0, every: float = 2.0, out=None):
    self.label, self.total, self.done, self.every = label, total_units, done, every
    self.out = out or sys.stderr
    self.start, self.last, self.docs, self.tokens, self.new = time.perf_counter(), 0.0, 0, 0, 0

  def update(self, documents: int, tokens: int) -> None:
    self.done, self.new = self.done + 1, self.new + 1
    self.docs, self.tokens = self.docs + documents, self.tokens + tokens
    now = time.perf_counter()
    if now - self.last < self.every and self.done < self.total:
      return
    self.last, elapsed = now, max(now - self.start, 1e-9)
    eta = elapsed / self.new * (self.total - self.done)
    print(f'[{self.label}] units {self.done}/{self.total}, {self.docs:,} documents, '
          f'{self.tokens:,} tokens, {self.tokens / elapsed:,.0f} tokens/s, ETA {eta:,.0f}s',
          file=self.out, flush=True)


def _run_parallel(fn, jobs: list, workers: int, on_result) -> list:
  if workers <= 1 or len(jobs) <= 1:
    return [on_result(fn(job)) for job in jobs]
  # spawn, not fork: the caller may hold JAX or grain threads, which fork does not copy safely.
  with multiprocessing.get_context('spawn').Pool(min(workers, len(jobs))) as pool:
    return [on_result(r) for r in pool.imap(fn, jobs)]


def tokenize_stage(cfg, tokenizer, out_dir, *, workers: int = 1, task_index: int = 0,
                   task_count: int = 1, progress: bool = True) -> list[int]:
  """Stage 1 for this task's units that are not done yet; returns the units it ran."""
  units = plan_units(cfg)
  _work(out_dir).mkdir(parents=True, exist_ok=True)
  mine = [i for i in range(len(units)) if i % task_count == task_index]
  todo = [i for i in mine if not _unit_file(out_dir, i, 'json').exists()]
  bar = Progress(f'prepare task {task_index}/{task_count}', len(mine), len(mine) - len(todo),
                 every=2.0 if progress else float('inf'))
  template = task_template(cfg, tokenizer, cfg.finetune.task)
  jobs = [(i, units[i][0], out_dir, cfg.data, cfg.finetune.task, tokenizer, template)
          for i in todo]
  _run_parallel(_tokenize_unit, jobs, workers, lambda s: bar.update(s['documents'], s['tokens']))
  return todo


def merge_stage(cfg, tokenizer, out_dir, *, workers: int = 1) -> dict:
  """Stage 2: corpus-wide dedup, final shards and meta.json (needs every unit's stage 1)."""
  task, d = cfg.finetune.task, cfg.data
  units = plan_units(cfg)
  missing = [i for i in range(len(units)) if not _unit_file(out_dir, i, 'json').exists()]
  if missing:
    raise DataError(f"{out_dir}: units {missing[:10]}{'...' if len(missing) > 10 else ''} of "
                    f'{len(units)} are not tokenized yet (run every --task first)')
  summaries = [json.loads(_unit_file(out_dir, i, 'json').read_text()) for i in range(len(units))]
  stale = [i for i, s in enumerate(summaries) if s['fingerprint'] != tokenizer.fingerprint]
  if stale:
    raise DataError(f'{out_dir}: units {stale[:10]} were tokenized with another tokenizer; '
                    'delete the work directory or use the same tokenizer.model')
  template = template_fingerprint(task_template(cfg, tokenizer, task))
  stale = [i for i, s in enumerate(summaries) if s.get('template') != template]
  if stale:
    raise DataError(f'{out_dir}: units {stale[:10]} were tokenized with another chat template '
                    '(config key data.chat_template); delete the work directory or use the '
                    'same template')
  stats = DataStats()
  for s in summaries:
    stats.add(DataStats.from_dict(s['stats']))
  drop = {}
  if d.dedup:
    drop = dedup.exact_duplicates([_unit_file(out_dir, i, 'hashes.npy') for i in range(len(units))],
                                  [s['offsets'] for s in summaries], int(d.dedup_buckets))
    stats.filtered['duplicate'] += sum(len(v) for v in drop.values())
  if d.near_dedup:
    near = dedup.near_duplicates([_unit_file(out_dir, i, 'minhash.npy') for i in range(len(units))],
                                 drop, d.near_dedup_threshold, int(d.near_dedup_max_docs),
                                 sum(s['documents'] for s in summaries))
    stats.filtered['near_duplicate'] += sum(len(v) for v in near.values())
    drop = {u: np.union1d(drop.get(u, np.zeros(0, np.int64)), near.get(u, np.zeros(0, np.int64)))
            for u in set(drop) | set(near)}
  names = sorted({l for s in summaries for l in s['labels']}, key=label_sort_key)
  label_ids = {name: i for i, name in enumerate(names)}
  # With data.validation_paths those files are the validation split; every source document trains.
  share = 0.0 if validation_component(cfg) is not None else d.validation_share
  finals, jobs = {}, []
  for i, (_, is_validation) in enumerate(units):
    final = _unit_file(out_dir, i, 'final.json')
    if final.exists():
      finals[i] = json.loads(final.read_text())
    else:
      jobs.append((i, len(units), is_validation, out_dir, drop.get(i, np.zeros(0, np.int64)),
                   label_ids, share))
  results = _run_parallel(_finalize_unit, jobs, workers, lambda s: s)
  finals.update({job[0]: result for job, result in zip(jobs, results)})
  meta = {'format': PREPARED_FORMAT, 'task': task, 'tokenizer_fingerprint': tokenizer.fingerprint,
          'chat_template': template,
          'vocab_size': tokenizer.vocab_size, 'class_names': names, 'units': len(units),
          'splits': {}, 'data_config': json.loads(json.dumps(d.to_dict(), default=list))}
  for split in SPLITS:
    parts = [finals[i][split] for i in range(len(units)) if finals[i][split]['records']]
    meta['splits'][split] = {'documents': sum(p['records'] for p in parts),
                             'tokens': sum(p['tokens'] for p in parts),
                             'files': [p['file'] for p in parts],
                             'records': [p['records'] for p in parts]}
    stats.kept[split] = meta['splits'][split]['documents']
    stats.kept_bytes[split] = sum(p['bytes'] for p in parts)
  meta['stats'] = stats.to_dict()
  tokenizer.save(out_dir / 'tokenizer.model')
  files.write_json(out_dir / PREPARED_META, meta)
  return meta


def prepare(cfg, tokenizer, out_dir=None, *, workers: int = 1, task_index: int = 0,
            task_count: int = 1, merge: bool | None = None, progress: bool = False) -> dict | None:
  """Tokenizes the configured source into prepared shards (see the module docstring).

  With task_count > 1 this runs stage 1 for task `task_index` only and returns None; run
  prepare(..., merge=True) (`--merge`) once every task is done. Returns meta.json's content.
  """
  out_dir = epath.Path(out_dir or cfg.data.prepared_dir)
  if not str(out_dir) or str(out_dir) == '.':
    raise DataError('config key data.prepared_dir: set the output directory for `prepare`')
  if cfg.data.source == 'mixture':
    raise DataError("config key data.source: `prepare` takes one source, not 'mixture'")
  if not 0 <= task_index < task_count:
    raise DataError(f'--task={task_index} is not in [0, --tasks={task_count})')
  check_data_config(cfg, cfg.finetune.task)
  out_dir.mkdir(parents=True, exist_ok=True)
  merge = task_count == 1 if merge is None else merge
  if not merge or task_count == 1:
    tokenize_stage(cfg, tokenizer, out_dir, workers=workers, task_index=task_index,
                   task_count=task_count, progress=progress)
  return merge_stage(cfg, tokenizer, out_dir, workers=workers) if merge else None


def default_workers() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1

"""Prepared ArrayRecord token shards: written by `python -m lm.data prepare`, read by training."""

from __future__ import annotations

import json

from etils import epath

from lm.data.stats import DataError, DataStats
from lm.data.split import fraction_count
from lm.data.tokenize import decode_prepared, task_template, template_fingerprint

PREPARED_FORMAT = 2  # 2: one shard per unit and split, record counts in meta.json.
PREPARED_META = 'meta.json'


def read_prepared_meta(prepared_dir) -> dict:
  path = epath.Path(prepared_dir) / PREPARED_META
  if not path.exists():
    raise DataError(f"config key data.prepared_dir: no {PREPARED_META} in '{prepared_dir}' "
                    '(write it with `python -m lm.data prepare`)')
  meta = json.loads(path.read_text())
  if meta.get('format') != PREPARED_FORMAT:
    raise DataError(f"{path}: prepared format {meta.get('format')} is not {PREPARED_FORMAT}; "
                    'prepare the data again')
  return meta


def shard_name(split: str, unit: int, units: int) -> str:
  return f'{split}-{unit:05d}-of-{units:05d}.array_record'


def _checked_count(path: epath.Path, expected: int) -> None:
  """A shard missing or truncated since prepare is an error naming it, not a short epoch."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  if not path.exists():
    raise DataError(f'{path}: prepared shard is missing (listed in {PREPARED_META}); '
                    'prepare the data again')
  try:
    reader = array_record_module.ArrayRecordReader(str(path))
    count = reader.num_records()
    reader.close()
  except Exception as e:  # pylint: disable=broad-except  (the reader raises bare RuntimeError)
    raise DataError(f'{path}: prepared shard is unreadable or truncated ({e}); prepare the data '
                    'again') from None
  if count != expected:
    raise DataError(f'{path}: prepared shard has {count} records, {PREPARED_META} says '
                    f'{expected}; prepare the data again')


def prepared_dataset(cfg, tokenizer, split: str, task: str) -> tuple['grain.MapDataset', DataStats]:
  """The split's records in shard order (random access); train_fraction keeps a prefix of each
  shard, whose records prepare sorted by hash rank: a nested random subset."""
  # grain imports JAX: kept off the import path of prepare's worker processes.
  import grain  # pylint: disable=import-outside-toplevel
  meta = read_prepared_meta(cfg.data.prepared_dir)
  if meta['tokenizer_fingerprint'] != tokenizer.fingerprint:
    raise DataError(
        f"config key data.prepared_dir: shards in '{cfg.data.prepared_dir}' were tokenized with "
        f"tokenizer {meta['tokenizer_fingerprint']}, not {tokenizer.fingerprint}; set "
        f"tokenizer.path to {epath.Path(cfg.data.prepared_dir) / 'tokenizer.model'}")
  if meta['task'] != task:
    raise DataError(f"config key finetune.task: shards were prepared for task '{meta['task']}', "
                    f"not '{task}'")
  template = template_fingerprint(task_template(cfg, tokenizer, task))
  if meta.get('chat_template') != template:  # The template is in the tokens: never mix two.
    raise DataError(f"config key data.chat_template: shards in '{cfg.data.prepared_dir}' were "
                    f"tokenized with chat template {meta.get('chat_template')}, this run's is "
                    f'{template}; prepare the data again with this template')
  entry = meta['splits'][split]
  files = [epath.Path(cfg.data.prepared_dir) / f for f in entry['files']]
  for path, count in zip(files, entry['records']):
    _checked_count(path, count)
  stats = DataStats.from_dict(meta['stats'])
  fraction = cfg.data.train_fraction if split == 'train' else 1.0
  if fraction >= 1.0 or not files:
    source = grain.sources.ArrayRecordDataSource([str(f) for f in files]) if files else []
    ds = grain.MapDataset.source(source)
  else:
    keeps = [fraction_count(n, fraction) for n in entry['records']]
    ds = grain.MapDataset.concatenate([
        grain.MapDataset.source(grain.sources.ArrayRecordDataSource([str(f)]))[:k]
        for f, k in zip(files, keeps) if k])
    stats.held_out = sum(entry['records']) - sum(keeps)
  return ds.map(decode_prepared), stats

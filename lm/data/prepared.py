"""Prepared ArrayRecord token shards: written by `python -m lm.data prepare`, read by training."""

from __future__ import annotations

import json

from etils import epath
import grain

from lm.data.stats import DataError, DataStats
from lm.data.split import fraction_count
from lm.data.tokenize import decode_prepared

PREPARED_FORMAT = 1
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


def prepared_dataset(cfg, tokenizer, split: str, task: str) -> tuple[grain.MapDataset, DataStats]:
  meta = read_prepared_meta(cfg.data.prepared_dir)
  if meta['tokenizer_fingerprint'] != tokenizer.fingerprint:
    raise DataError(
        f"config key data.prepared_dir: shards in '{cfg.data.prepared_dir}' were tokenized with "
        f"tokenizer {meta['tokenizer_fingerprint']}, not {tokenizer.fingerprint}; set "
        f"tokenizer.path to {epath.Path(cfg.data.prepared_dir) / 'tokenizer.model'}")
  if meta['task'] != task:
    raise DataError(f"config key finetune.task: shards were prepared for task '{meta['task']}', "
                    f"not '{task}'")
  files = [str(epath.Path(cfg.data.prepared_dir) / f) for f in meta['splits'][split]['files']]
  source = grain.sources.ArrayRecordDataSource(files) if files else []
  ds = grain.MapDataset.source(source)
  stats = DataStats.from_dict(meta['stats'])
  if split == 'train':
    keep = fraction_count(len(ds), cfg.data.train_fraction)
    stats.held_out = len(ds) - keep
    ds = ds[:keep]
  return ds.map(decode_prepared), stats


"""`python -m lm.data prepare`: tokenize a source once into ArrayRecord shards + meta.json."""

from __future__ import annotations

import copy
import json
import tempfile

from etils import epath

from lm.data import documents
from lm.data.prepared import PREPARED_FORMAT, PREPARED_META
from lm.data.stats import SPLITS, DataError
from lm.data.tokenize import encode_prepared, tokenize_records


def _write_shards(out_dir: epath.Path, split: str, records: list[bytes], num_shards: int) -> list[str]:
  """Writes contiguous blocks of records (so shard order = record order); returns file names."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  num_shards = max(1, min(num_shards, len(records)))
  names = []
  local = not str(out_dir).startswith(('gs://', 's3://'))
  staging = out_dir if local else epath.Path(tempfile.mkdtemp(prefix='lm_prepare_'))
  for shard in range(num_shards if records else 0):
    name = f'{split}-{shard:05d}-of-{num_shards:05d}.array_record'
    begin, end = shard * len(records) // num_shards, (shard + 1) * len(records) // num_shards
    # group_size:1 makes every record its own chunk: fast random access for the shuffle.
    writer = array_record_module.ArrayRecordWriter(str(staging / name), 'group_size:1')
    for raw in records[begin:end]:
      writer.write(raw)
    writer.close()
    if not local:
      (staging / name).copy(out_dir / name, overwrite=True)
    names.append(name)
  return names


def prepare(cfg, tokenizer, out_dir=None) -> dict:
  """Tokenizes the configured source once into ArrayRecord shards + meta.json + tokenizer."""
  task = cfg.finetune.task
  out_dir = epath.Path(out_dir or cfg.data.prepared_dir)
  if not str(out_dir) or str(out_dir) == '.':
    raise DataError('config key data.prepared_dir: set the output directory for `prepare`')
  if cfg.data.source == 'mixture':
    raise DataError("config key data.source: `prepare` takes one source, not 'mixture'")
  prepare_cfg = copy.deepcopy(cfg)
  prepare_cfg.data.prepared_dir = ''  # Read the raw source, not the (future) output.
  # All training documents: data.train_fraction applies when the shards are read.
  [(_, splits, stats)] = documents.split_components(prepare_cfg, task, train_fraction=1.0)
  names = documents.class_names(prepare_cfg) if task == 'classify' else []
  label_ids = {name: i for i, name in enumerate(names)}
  out_dir.mkdir(parents=True, exist_ok=True)
  meta = {'format': PREPARED_FORMAT, 'task': task, 'tokenizer_fingerprint': tokenizer.fingerprint,
          'vocab_size': tokenizer.vocab_size, 'class_names': names, 'splits': {},
          'stats': stats.to_dict(), 'data_config': json.loads(json.dumps(cfg.data.to_dict(), default=list))}
  for split in SPLITS:
    records, tokens = [], 0
    for begin in range(0, len(splits[split]), 1024):
      for ids, aux in tokenize_records(splits[split][begin:begin + 1024], tokenizer, task, label_ids):
        records.append(encode_prepared(ids, aux))
        tokens += len(ids)
    files = _write_shards(out_dir, split, records, int(cfg.data.prepare_shards))
    meta['splits'][split] = {'documents': len(records), 'tokens': tokens, 'files': files}
  tokenizer.save(out_dir / 'tokenizer.model')
  (out_dir / PREPARED_META).write_text(json.dumps(meta, indent=2))
  return meta

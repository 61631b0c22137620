"""The lm.data CLI: prepare, report, bench (see lm/data/__init__.py)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence

from lm import corpus
from lm.data.documents import load_or_train_tokenizer
from lm.data.prepare_job import prepare
from lm.data.measure import bench, report
from lm.data.sources import source_key
from lm.data.stats import SPLITS


def _main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  if len(argv) != 2 or argv[1] not in ('prepare', 'report', 'bench'):
    raise SystemExit('usage: python -m lm.data {prepare,report,bench} --config=configs/X.py')
  try:
    _run_command(argv[1], flags.FLAGS.config, flags.FLAGS)
  except ValueError as e:  # DataError, ConfigError: the message says it all.
    raise SystemExit(f'error: {e}') from None


def _run_command(command: str, cfg, f) -> None:
  # Prepared shards carry their tokenizer; otherwise a cache directory per source + tokenizer.
  workdir = f.workdir or cfg.data.prepared_dir
  if not workdir:
    key = json.dumps([source_key(cfg), cfg.tokenizer.to_dict()], sort_keys=True, default=list)
    workdir = str(corpus.cache_dir() / 'data_cli' / hashlib.sha256(key.encode()).hexdigest()[:16])
  tokenizer = load_or_train_tokenizer(cfg, workdir)
  if command == 'prepare':
    started = time.perf_counter()
    meta = prepare(cfg, tokenizer)
    print(f'prepared {cfg.data.prepared_dir} in {time.perf_counter() - started:.1f}s: '
          + ', '.join(f"{s} {m['documents']} documents / {m['tokens']} tokens in "
                      f"{len(m['files'])} shards" for s, m in meta['splits'].items()))
  elif command == 'report':
    print(report(cfg, tokenizer, f.split, f.top_tokens))
  else:
    result = bench(cfg, tokenizer, f.runs, f.batches)
    print(json.dumps(result))
    print(f"{result['mode']}: median {result['median_tokens_per_s']:,.0f} tokens/s over "
          f"{len(result['runs'])} runs of {result['batches_per_run']} batches of "
          f"{result['batch'][0]}x{result['batch'][1]}")


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'ml_collections config file.', lock_config=True)
  flags.DEFINE_string('workdir', '', 'Where the tokenizer is loaded from or trained into.')
  flags.DEFINE_enum('split', 'train', list(SPLITS), 'report: which split to count.')
  flags.DEFINE_integer('top_tokens', 20, 'report: how many of the most frequent tokens to list.')
  flags.DEFINE_integer('runs', 5, 'bench: fresh pipelines to time (the median is reported).')
  flags.DEFINE_integer('batches', 200, 'bench: batches timed per run.')
  flags.mark_flags_as_required(['config'])
  app.run(_main)

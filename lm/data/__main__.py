"""The lm.data CLI (ml_collections config files, --config.key=value overrides).

  python -m lm.data tokenizer --config=X   train (or find) the tokenizer into data.prepared_dir
  python -m lm.data prepare   --config=X [--workers=N] [--task=i --tasks=N | --merge]
  python -m lm.data report    --config=X [--split=train]   counts, bytes/token, top tokens
  python -m lm.data bench     --config=X [--runs=5 --batches=200]   pipeline tokens/s (median)
  python -m lm.data memory    [--sizes_mb=100,1000 --workers=1,2]   prepare/read at scale
                              (synthetic corpora: peak RSS, tokens/s; see lm/data/scale_bench.py)
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence

from lm import corpus
from lm.data.sources import source_key
from lm.data.stats import SPLITS, DataError

COMMANDS = ('tokenizer', 'prepare', 'report', 'bench', 'memory')


def _main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise SystemExit(f"usage: python -m lm.data {{{','.join(COMMANDS)}}} --config=configs/X.py")
  try:
    if argv[1] == 'memory':
      # Imported here, as _run_command's are: prepare's spawned workers re-import this module.
      from lm.data import scale_bench  # pylint: disable=import-outside-toplevel
      scale_bench.main(flags.FLAGS)
      return
    if flags.FLAGS.config is None:
      raise SystemExit('error: --config is required')
    _run_command(argv[1], flags.FLAGS.config, flags.FLAGS)
  except ValueError as e:  # DataError, ConfigError: the message says it all.
    raise SystemExit(f'error: {e}') from None


def _run_command(command: str, cfg, f) -> None:
  # Imported here: prepare's spawned workers re-import this module and need none of them.
  # pylint: disable=import-outside-toplevel
  from lm.data.documents import load_or_train_tokenizer
  from lm.data.measure import bench, report
  from lm.data.prepare_job import default_workers, prepare
  # Prepared shards carry their tokenizer; otherwise a cache directory per source + tokenizer.
  workdir = f.workdir or cfg.data.prepared_dir
  if not workdir:
    if command in ('tokenizer', 'prepare'):
      raise DataError('config key data.prepared_dir: set the output directory')
    key = json.dumps([source_key(cfg), cfg.tokenizer.to_dict()], sort_keys=True, default=list)
    workdir = str(corpus.cache_dir() / 'data_cli' / hashlib.sha256(key.encode()).hexdigest()[:16])
  if command == 'prepare' and (f.tasks > 1 or f.merge):
    # Tasks must share one tokenizer: train it once first (`tokenizer`), never per task.
    # pylint: disable=import-outside-toplevel  (not in spawned workers: see above)
    from lm import tokenizer as tokenizer_lib
    from etils import epath
    if not cfg.tokenizer.path and not (epath.Path(workdir) / tokenizer_lib.TOKENIZER_FILE).exists():
      raise DataError(f'prepare --tasks/--merge: no tokenizer in {workdir}; run `python -m '
                      'lm.data tokenizer` with the same flags first, so every task shares it')
    tokenizer = tokenizer_lib.load_or_train(cfg, workdir)
  else:
    tokenizer = load_or_train_tokenizer(cfg, workdir)
  if command == 'tokenizer':
    print(f'tokenizer: {tokenizer!r} in {workdir}')
  elif command == 'prepare':
    started = time.perf_counter()
    workers = f.workers or default_workers()
    meta = prepare(cfg, tokenizer, workers=workers, task_index=f.task, task_count=f.tasks,
                   merge=True if f.merge else None, progress=True)
    took = f'{time.perf_counter() - started:.1f}s'
    if meta is None:
      print(f'prepare task {f.task}/{f.tasks} done in {took}; when all are, run --merge')
    else:
      print(f'prepared {cfg.data.prepared_dir} in {took}: '
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
  flags.DEFINE_integer('workers', 0, 'prepare: worker processes (0 = every core).')
  flags.DEFINE_integer('task', 0, 'prepare: this task\'s index when split over --tasks jobs.')
  flags.DEFINE_integer('tasks', 1, 'prepare: independent jobs the tokenize stage is split over.')
  flags.DEFINE_bool('merge', False, 'prepare: after all --tasks: dedup, write shards and index.')
  flags.DEFINE_list('sizes_mb', ['100', '1000'], 'memory: synthetic corpus sizes in MB.')
  flags.DEFINE_list('worker_counts', ['1', '2'], 'memory: prepare worker counts to time.')
  flags.DEFINE_string('scratch', '/tmp/lm_data_scale', 'memory: where corpora are generated.')
  app.run(_main)

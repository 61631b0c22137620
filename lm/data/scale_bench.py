"""`python -m lm.data memory`: memory and speed of the data layer on synthetic corpora.

For each size (--sizes_mb, default 100 and 1000) a JSONL corpus of random-word documents (2% of
them repeated, so dedup has work) is generated under --scratch, then each measurement runs in
a fresh child process whose peak RSS (VmHWM) is reported:
  prepare         `prepare --workers=1` with one shared tokenizer and the default settings;
  start-up        make_pipeline over the prepared shards, and over the raw JSONL (streaming),
                  up to the first batch;
  prepare tokens/s  the smallest corpus prepared with each of --worker_counts;
  read tokens/s   `bench` over the largest prepared corpus at batch 32 x 1024.
The closing table gives the 1 GB / 100 MB peak-RSS ratios (the target is <= 1.25).
Corpora and shards are deleted afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from lm import config
from lm import tokenizer as tokenizer_lib
from lm.data import measure, pipeline, prepare_job

_VOCAB = 4000
_CHILD = 'from lm.data import scale_bench as b; b.child(*__import__("sys").argv[1:])'


def write_corpus(path: str, megabytes: int, seed: int = 0) -> int:
  """Random-word JSONL documents of 50-800 words; returns the document count."""
  rng = np.random.default_rng(seed)
  letters = np.array(list('abcdefghijklmnopqrstuvwxyz'))
  words = np.array([''.join(rng.choice(letters, rng.integers(2, 9))) for _ in range(_VOCAB)])
  target, written, docs, recent = megabytes * 10**6, 0, 0, []
  with open(path, 'w', encoding='utf-8') as f:
    while written < target:
      lengths = rng.integers(50, 800, size=256)
      ids = rng.zipf(1.3, size=int(lengths.sum())) % _VOCAB
      lines = []
      for chunk in np.split(words[ids], np.cumsum(lengths)[:-1]):
        text = ' '.join(chunk)
        if recent and rng.random() < 0.02:
          text = recent[int(rng.integers(len(recent)))]
        recent = (recent + [text])[-64:]
        lines.append(json.dumps({'text': text}) + '\n')
      block = ''.join(lines)
      f.write(block)
      written += len(block)
      docs += len(lines)
  return docs


def _config(corpus: str, prepared: str, tokenizer_path: str, *, seq_len=1024, batch=32):
  cfg = config.base_config()
  cfg.data.source, cfg.data.paths, cfg.data.prepared_dir = 'jsonl', (corpus,), prepared
  cfg.data.seq_len, cfg.data.batch_size, cfg.data.validation_share = seq_len, batch, 0.01
  cfg.tokenizer.path = tokenizer_path
  return cfg


def child(mode: str, corpus: str, prepared: str, tokenizer_path: str, workers: str = '1') -> None:
  """Runs one measurement in this (fresh) process and prints a JSON line."""
  tok = tokenizer_lib.Tokenizer.load(tokenizer_path)
  start = time.perf_counter()
  result = {}
  if mode == 'prepare':
    meta = prepare_job.prepare(_config(corpus, prepared, tokenizer_path), tok, workers=int(workers))
    result = {'tokens': meta['splits']['train']['tokens'] + meta['splits']['validation']['tokens'],
              'duplicates': meta['stats']['filtered'].get('duplicate', 0)}
  elif mode in ('startup_prepared', 'startup_raw'):
    cfg = _config(corpus, prepared if mode == 'startup_prepared' else '', tokenizer_path)
    next(pipeline.make_pipeline(cfg, tok, 'train'))
  elif mode == 'read':
    bench = measure.bench(_config(corpus, prepared, tokenizer_path), tok, runs=3, batches=100)
    result = {'tokens_per_s': bench['median_tokens_per_s']}
  result['seconds'] = time.perf_counter() - start
  result['peak_rss_mb'] = _peak_rss_mb()
  print(json.dumps(result))


def _peak_rss_mb() -> float:
  """This process's peak RSS since exec (VmHWM; ru_maxrss would include the forking parent's)."""
  with open('/proc/self/status', encoding='ascii') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) / 1024
  raise RuntimeError('no VmHWM in /proc/self/status (Linux only)')


def _measure(*args: str) -> dict:
  process = subprocess.Popen([sys.executable, '-c', _CHILD, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
  output = process.stdout.read()
  if process.wait():
    raise RuntimeError(f'{args[0]} failed (status {process.returncode}): {output[-2000:]}')
  return json.loads(output.strip().splitlines()[-1])


def main(flags) -> None:
  sizes = [int(s) for s in flags.sizes_mb]
  worker_counts = [int(w) for w in flags.worker_counts]
  scratch = flags.scratch
  os.makedirs(scratch, exist_ok=True)
  rows = {}
  try:
    corpora = {}
    for size in sizes:
      corpora[size] = os.path.join(scratch, f'corpus_{size}mb.jsonl')
      docs = write_corpus(corpora[size], size)
      print(f'corpus {size} MB: {docs:,} documents', flush=True)
    tok_cfg = config.base_config().tokenizer
    tok_cfg.vocab_size = 8000
    with open(corpora[sizes[0]], encoding='utf-8') as f:
      sample = [json.loads(next(f))['text'] for _ in range(2000)]
    tok_path = os.path.join(scratch, 'tokenizer.model')
    tokenizer_lib.train_tokenizer(sample, tok_cfg, tok_path)
    for size in sizes:
      prepared = os.path.join(scratch, f'prepared_{size}mb')
      rows[size] = {'prepare': _measure('prepare', corpora[size], prepared, tok_path, '1'),
                    'startup_prepared': _measure('startup_prepared', corpora[size], prepared,
                                                 tok_path),
                    'startup_raw': _measure('startup_raw', corpora[size], prepared, tok_path)}
      print(f'{size} MB: {json.dumps(rows[size])}', flush=True)
    small = sizes[0]
    for workers in worker_counts:
      prepared = os.path.join(scratch, f'prepared_{small}mb_w{workers}')
      result = _measure('prepare', corpora[small], prepared, tok_path, str(workers))
      rows.setdefault('workers', {})[workers] = result
      rate = result['tokens'] / result['seconds']
      print(f'prepare {small} MB with {workers} workers: {rate:,.0f} '
            f'tokens/s ({result["seconds"]:.1f}s)', flush=True)
      shutil.rmtree(prepared, ignore_errors=True)
    large = sizes[-1]
    read = _measure('read', corpora[large], os.path.join(scratch, f'prepared_{large}mb'), tok_path)
    rows['read'] = read
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  print(f"\n| measurement | {' | '.join(f'{s} MB' for s in sizes)} | ratio |")
  print('|---|' + '---:|' * (len(sizes) + 1))
  for key, label in (('prepare', 'prepare peak RSS (MB)'), ('startup_prepared',
                     'start-up from prepared shards, peak RSS (MB)'),
                     ('startup_raw', 'start-up streaming raw JSONL, peak RSS (MB)')):
    values = [rows[s][key]['peak_rss_mb'] for s in sizes]
    print(f"| {label} | {' | '.join(f'{v:,.0f}' for v in values)} | {values[-1] / values[0]:.2f} |")
  for workers, result in rows.get('workers', {}).items():
    print(f'prepare {sizes[0]} MB, {workers} worker(s): '
          f"{result['tokens'] / result['seconds']:,.0f} tokens/s")
  print(f"read from prepared shards ({sizes[-1]} MB), batch 32 x 1024: "
        f"{rows['read']['tokens_per_s']:,.0f} tokens/s")

"""python -m lm.convert bench: peak host memory and wall time of import and export.

Writes a synthetic bf16 Llama-shaped checkpoint of about `--gb` GB in 3 safetensors shards (random
values, written one tensor at a time), then times `lm.convert hf` (safetensors -> Orbax) and
`lm.convert export` (Orbax -> bf16 safetensors), each in a fresh interpreter that reports its
resident memory after importing everything (the baseline: jax, orbax, lm) and its peak (VmHWM).
The streaming design's bound: peak - baseline stays near the largest tensor, not the model.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import subprocess
import sys
import tempfile

import ml_dtypes
import numpy as np

from lm import config as lm_config
from lm.convert import expected_shapes, families, source_shape
from lm.convert.safetensors_io import plan_shards, write_streaming

BF16 = np.dtype(ml_dtypes.bfloat16)

_CHILD = r'''
import json, sys, time
def status(key):
  for line in open('/proc/self/status'):
    if line.startswith(key):
      return int(line.split()[1]) * 1024
import jax, orbax.checkpoint
from lm.convert import hf, export
jax.devices()
baseline = status('VmRSS:')
start = time.perf_counter()
if sys.argv[1] == 'import':
  hf.convert_hf(sys.argv[2], sys.argv[3], no_tokenizer=True, force=True, log=lambda *_: None)
else:
  export.export_checkpoint(sys.argv[2], sys.argv[3], log=lambda *_: None)
print(json.dumps({'seconds': time.perf_counter() - start, 'baseline': baseline,
                  'peak': status('VmHWM:')}))
'''


def llama_shaped(gb: float):
  """A Llama-2-style model config (d 2048, MHA, untied) with as many layers as make ~gb GB."""
  m = lm_config.model_config()
  m.update(vocab_size=32_000, d_model=2048, n_heads=16, n_kv_heads=16, mlp_dim=5632,
           tie_embeddings=False, norm_eps=1e-5, hf_model_type='llama', param_dtype='bfloat16')
  per_layer = 4 * m.d_model ** 2 + 3 * m.d_model * m.mlp_dim + 2 * m.d_model
  fixed = 2 * m.vocab_size * m.d_model + m.d_model
  m.n_layers = max(1, round((gb * 1e9 / 2 - fixed) / per_layer))
  return m


def write_synthetic(src: pathlib.Path, m) -> int:
  """config.json + 3 bf16 safetensors shards; returns the bytes of weights written."""
  src.mkdir(parents=True, exist_ok=True)
  table = families.tensor_table('llama', m)
  shapes = expected_shapes(m)
  entries = [(name, source_shape(layout, shapes[path]), BF16) for name, (path, layout) in table.items()]
  total = sum(math.prod(s) * 2 for _, s, _ in entries)
  block = (np.random.default_rng(0).standard_normal(1 << 20, np.float32) * 0.02).astype(BF16)
  shape_of = {name: shape for name, shape, _ in entries}
  shard_bytes = total // 3 + 1
  while len(plan_shards(entries, shard_bytes)) > 3:  # Whole tensors per shard: grow until 3.
    shard_bytes += total // 100
  write_streaming(src, entries, lambda name: np.resize(block, shape_of[name]), shard_bytes)
  (src / 'config.json').write_text(json.dumps(families.hf_config_from_lm(m), indent=1))
  return total


def _child(kind: str, a: pathlib.Path, b: pathlib.Path) -> dict:
  result = subprocess.run([sys.executable, '-c', _CHILD, kind, str(a), str(b)],
                          capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f'{kind} failed:\n{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(gb: float = 2.0, directory: str = '') -> dict:
  work = pathlib.Path(directory or tempfile.mkdtemp(prefix='lm_convert_bench_'))
  try:
    m = llama_shaped(gb)
    total = write_synthetic(work / 'src', m)
    shards = sorted(p.name for p in (work / 'src').glob('*.safetensors'))
    print(f'synthetic Llama-shaped checkpoint: {m.n_layers} layers, d_model {m.d_model}, '
          f'{total / 1e9:.2f} GB bf16 in {len(shards)} shards')
    rows = {'import': _child('import', work / 'src', work / 'lm'),
            'export': _child('export', work / 'lm', work / 'hf')}
    for kind, r in rows.items():
      r['above_baseline_gb'] = (r['peak'] - r['baseline']) / 1e9
      print(f"{kind:7s} {r['seconds']:7.1f} s   baseline RSS {r['baseline'] / 1e9:5.2f} GB   "
            f"peak RSS {r['peak'] / 1e9:5.2f} GB   peak above baseline {r['above_baseline_gb']:5.2f} GB")
    return {'gb': total / 1e9, 'shards': len(shards), **rows}
  finally:
    if not directory:
      shutil.rmtree(work, ignore_errors=True)

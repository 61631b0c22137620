"""Prints the markdown table of a directory of `lm.bench --json` results (scripts/bench_accel.sh).

  python scripts/bench_table.py runs/bench_accel
"""

import glob
import json
import os
import sys


def rows(out_dir: str) -> list[str]:
  lines = ['| run | attention | remat | tokens/step | step | tokens/s | model TFLOP/s | MFU | HFU |',
           '|---|---|---|---:|---:|---:|---:|---:|---:|']
  peak = ''
  for log in sorted(glob.glob(os.path.join(out_dir, '*.log'))):
    name = os.path.basename(log)[:-4]
    path = os.path.join(out_dir, name + '.json')
    if not os.path.exists(path):
      with open(log) as f:
        last = (f.read().strip().splitlines() or ['no output'])[-1][:80]
      lines.append(f'| {name} | | | | failed: {last} | | | | |')
      continue
    with open(path) as f:
      r = json.load(f)
    tokens = r['tokens_per_step']
    lines.append(f"| {name} | {r['attention']} | {r['remat']} | {tokens:,} | {r['step_ms']:.1f} ms "
                 f"| {r['tokens_per_s']:,} | {r['model_tflops']:.3g} | {100 * r['mfu']:.1f}% "
                 f"| {100 * r['hfu']:.1f}% |")
    peak = f"peak {r['peak_tflops']:.3g} TFLOP/s ({r['peak_source']})"
  return lines + ([peak] if peak else [])


if __name__ == '__main__':
  print('\n'.join(rows(sys.argv[1] if len(sys.argv) > 1 else 'runs/bench_accel')))

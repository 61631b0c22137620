"""Loop overhead: train.py's steady-state step time over lm.bench's, interleaved, median of N.

  python scripts/loop_overhead.py --config=configs/bench_loop.py --rounds=5
  python scripts/loop_overhead.py --config=configs/tiny.py --rounds=5 --steps=100

train.py's step time is the mean over each log interval after the first (which holds the
compilation), from metrics.jsonl's train/step_ms; lm.bench's is its median step. Both run the
same model on the same devices; train.py also reads real data, logs and keeps a step in flight.
A ratio near 1 means the loop adds nothing the step does not already cost.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_step_ms(config: str, workdir: str, steps: int, log_every: int, extra: list[str]) -> float:
  shutil.rmtree(os.path.join(workdir, 'checkpoints'), ignore_errors=True)
  if os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
    os.remove(os.path.join(workdir, 'metrics.jsonl'))
  subprocess.run([sys.executable, 'train.py', f'--config={config}', f'--workdir={workdir}',
                  f'--config.train.steps={steps}', f'--config.train.log_every={log_every}',
                  '--config.train.eval_every=0', '--config.train.sample_tokens=0',
                  '--config.train.checkpoint_every=1000000', *extra],
                 check=True, cwd=ROOT, capture_output=True)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f if 'train/step_ms' in line]
  return statistics.median(r['train/step_ms'] for r in records[1:])


def bench_step_ms(config: str, extra: list[str]) -> float:
  with tempfile.NamedTemporaryFile(suffix='.json') as out:
    subprocess.run([sys.executable, '-m', 'lm.bench', f'--config={config}', f'--json={out.name}',
                    '--steps=10', '--repeats=3', *extra], check=True, cwd=ROOT, capture_output=True)
    return json.load(open(out.name))['step_ms']


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/bench_loop.py')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=400)
  parser.add_argument('--log_every', type=int, default=50)
  args, extra = parser.parse_known_args()
  workdir = tempfile.mkdtemp(prefix='loop_overhead_')
  ratios = []
  try:
    for i in range(args.rounds):
      train_ms = train_step_ms(args.config, workdir, args.steps, args.log_every, extra)
      bench_ms = bench_step_ms(args.config, extra)
      ratios.append(train_ms / bench_ms)
      print(f'round {i + 1}: train.py {train_ms:.2f} ms/step, lm.bench {bench_ms:.2f} ms/step, '
            f'ratio {ratios[-1]:.3f}', flush=True)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  print(f'loop overhead ({args.config}): median {statistics.median(ratios):.3f}, '
        f'range {min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} rounds')


if __name__ == '__main__':
  main()

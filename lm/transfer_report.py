"""The transfer study's report: best learning rate per cell, mean +/- spread over seeds, the
effective data transferred, and the learning/forgetting frontier.

  python -m lm.transfer_report --workdir=runs/transfer [--out=docs/transfer_study]

Reads the sweep's results.csv (configs/sweeps/transfer.py: columns recipe,
data.train_fraction, optim.lr, seed, domain_loss, general_loss, *_before, train_tokens) and
writes to --out (default: the workdir):

  transfer_results.csv   one row per (recipe, domain share) at its best learning rate
  transfer.md            the tables below
  transfer_domain.png    domain loss vs domain tokens, one line per recipe (+/- spread)
  transfer_frontier.png  domain gain vs general-loss change per fine-tuned cell

Best learning rate per cell: the lowest mean domain validation loss over the seeds (the same
validation batches the table reports, so the selected cell is slightly optimistic; with a
2-point grid the effect is small). Spread = sample standard deviation over seeds.
Effective data: lm.transfer on the from-scratch curve (every scratch share, each at its best
learning rate, mean over seeds); '> N' where the fine-tuned loss is below every from-scratch
loss (D_E is more than the largest size N), '< N' where it is above every one.
"""

from __future__ import annotations

import argparse
import collections
import csv
import math
import os
import statistics
import sys

from lm import transfer

KEYS = ('recipe', 'data.train_fraction')
METRICS = ('domain_loss', 'general_loss', 'domain_gain', 'general_change')


def _float(value: str) -> float | None:
  try:
    out = float(value)
  except (TypeError, ValueError):
    return None
  return out if math.isfinite(out) else None


def read_rows(path: str) -> list[dict]:
  """Finished trials of results.csv, numbers parsed, with per-trial gain and change."""
  with open(path, newline='') as f:
    rows = [r for r in csv.DictReader(f) if r.get('status') == 'done' and r.get('recipe')]
  out = []
  for r in rows:
    row = {'recipe': r['recipe'], 'data.train_fraction': _float(r['data.train_fraction']),
           'optim.lr': _float(r['optim.lr']), 'seed': r.get('seed'),
           'train_tokens': _float(r.get('train_tokens'))}
    for key in ('domain_loss', 'general_loss', 'domain_loss_before', 'general_loss_before'):
      row[key] = _float(r.get(key))
    row['domain_gain'] = (row['domain_loss_before'] - row['domain_loss']
                          if row['domain_loss_before'] is not None and row['domain_loss'] is not None
                          else None)
    row['general_change'] = (row['general_loss'] - row['general_loss_before']
                             if row['general_loss_before'] is not None
                             and row['general_loss'] is not None else None)
    out.append(row)
  return out


def _mean_sd(values: list) -> tuple[float | None, float | None]:
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def best_cells(rows: list[dict]) -> list[dict]:
  """Per (recipe, share): the learning rate with the lowest mean domain loss, and its stats."""
  by_lr = collections.defaultdict(list)
  for r in rows:
    by_lr[(r['recipe'], r['data.train_fraction'], r['optim.lr'])].append(r)
  best: dict[tuple, tuple] = {}
  for (recipe, share, lr), trials in by_lr.items():
    mean, _ = _mean_sd([t['domain_loss'] for t in trials])
    if mean is not None and ((recipe, share) not in best or mean < best[(recipe, share)][0]):
      best[(recipe, share)] = (mean, lr, trials)
  cells = []
  for (recipe, share), (_, lr, trials) in best.items():
    cell = {'recipe': recipe, 'data.train_fraction': share, 'best_lr': lr, 'seeds': len(trials),
            'lrs_tried': sorted({k[2] for k in by_lr if k[:2] == (recipe, share)}),
            'train_tokens': trials[0]['train_tokens']}
    for m in METRICS:
      cell[f'{m}_mean'], cell[f'{m}_sd'] = _mean_sd([t[m] for t in trials])
    cells.append(cell)
  return sorted(cells, key=lambda c: (c['recipe'] != 'scratch', c['recipe'],
                                      c['data.train_fraction']))


def add_effective_data(cells: list[dict]) -> transfer.ScalingCurve | None:
  """Effective data transferred per fine-tuned cell, from the scratch cells' curve."""
  scratch = [c for c in cells if c['recipe'] == 'scratch' and c['domain_loss_mean'] is not None]
  try:
    curve = transfer.ScalingCurve.fit([c['train_tokens'] for c in scratch],
                                      [c['domain_loss_mean'] for c in scratch])
  except transfer.TransferError as e:
    print(f'transfer_report: no effective data: {e}', file=sys.stderr)
    return None
  for c in cells:
    if c['recipe'] != 'scratch' and c['domain_loss_mean'] is not None:
      c.update(transfer.effective_data(curve, c['domain_loss_mean'], c['train_tokens']))
  return curve


def _pm(mean, sd, digits=3) -> str:
  return '' if mean is None else f'{mean:.{digits}f} ± {sd:.{digits}f}'


def _tokens(n) -> str:
  return '' if n is None else f'{n:,.0f}'


def markdown(cells: list[dict]) -> str:
  lines = ['| recipe | domain share | tokens | best lr | seeds | domain loss | general loss | '
           'domain gain | general-loss change | effective data (D_E) | transferred (D_T) |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for c in cells:
    d_e = c.get('effective_data')
    bound = {'>': '> ', '<': '< '}.get(c.get('bound', ''), '')
    lines.append(
        f"| {c['recipe']} | {c['data.train_fraction']:g} | {_tokens(c['train_tokens'])} | "
        f"{c['best_lr']:g} | {c['seeds']} | {_pm(c['domain_loss_mean'], c['domain_loss_sd'])} | "
        f"{_pm(c['general_loss_mean'], c['general_loss_sd'])} | "
        f"{_pm(c['domain_gain_mean'], c['domain_gain_sd'])} | "
        f"{_pm(c['general_change_mean'], c['general_change_sd'])} | "
        f"{bound}{_tokens(d_e)} | {bound}{_tokens(c.get('transferred_data'))} |")
  return '\n'.join(lines)


def write_csv(cells: list[dict], path: str) -> None:
  columns = ['recipe', 'data.train_fraction', 'train_tokens', 'best_lr', 'lrs_tried', 'seeds']
  columns += [f'{m}_{s}' for m in METRICS for s in ('mean', 'sd')]
  columns += ['effective_data', 'transferred_data', 'transfer_fraction', 'bound']
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, columns, extrasaction='ignore')
    writer.writeheader()
    for c in cells:
      writer.writerow({**c, 'lrs_tried': ' '.join(f'{x:g}' for x in c['lrs_tried'])})


def plot(cells: list[dict], out_dir: str) -> list[str]:
  import matplotlib  # Local: matplotlib stays off every training process's start-up path.
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  recipes = list(dict.fromkeys(c['recipe'] for c in cells))
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for recipe in recipes:
    pts = sorted((c['train_tokens'], c['domain_loss_mean'], c['domain_loss_sd']) for c in cells
                 if c['recipe'] == recipe and c['domain_loss_mean'] is not None)
    if pts:
      x, y, e = zip(*pts)
      ax.errorbar(x, y, yerr=e, marker='o', capsize=3, label=recipe)
  ax.set_xscale('log')
  ax.set_xlabel('domain training tokens')
  ax.set_ylabel('domain validation loss (best lr, mean ± sd over seeds)')
  ax.legend()
  fig.tight_layout()
  files = ['transfer_domain.png']
  fig.savefig(os.path.join(out_dir, files[0]), dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for recipe in recipes:
    pts = [c for c in cells if c['recipe'] == recipe and c['general_change_mean'] is not None]
    if pts:
      ax.errorbar([c['general_change_mean'] for c in pts], [c['domain_gain_mean'] for c in pts],
                  xerr=[c['general_change_sd'] for c in pts],
                  yerr=[c['domain_gain_sd'] for c in pts], marker='o', ls='', capsize=3,
                  label=recipe)
      for c in pts:
        ax.annotate(f"{c['data.train_fraction']:g}", (c['general_change_mean'],
                                                       c['domain_gain_mean']), fontsize=7)
  ax.axhline(0, color='grey', lw=0.5)
  ax.axvline(0, color='grey', lw=0.5)
  ax.set_xlabel('general-loss change (forgetting; lower is better)')
  ax.set_ylabel('domain gain (loss before - after; higher is better)')
  ax.legend()
  fig.tight_layout()
  files.append('transfer_frontier.png')
  fig.savefig(os.path.join(out_dir, files[1]), dpi=120)
  plt.close(fig)
  return files


def report(workdir: str, out_dir: str | None = None) -> list[dict]:
  out_dir = out_dir or workdir
  os.makedirs(out_dir, exist_ok=True)
  cells = best_cells(read_rows(os.path.join(workdir, 'results.csv')))
  add_effective_data(cells)
  write_csv(cells, os.path.join(out_dir, 'transfer_results.csv'))
  files = plot(cells, out_dir) if cells else []
  text = ('# Transfer study: best learning rate per cell, mean ± sd over seeds\n\n'
          + markdown(cells) + '\n\n' + '\n'.join(f'![{f}]({f})' for f in files) + '\n')
  with open(os.path.join(out_dir, 'transfer.md'), 'w') as f:
    f.write(text)
  print(text)
  return cells


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m lm.transfer_report',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='the transfer sweep directory')
  parser.add_argument('--out', default='', help='output directory (default: the workdir)')
  args = parser.parse_args(argv)
  if not os.path.exists(os.path.join(args.workdir, 'results.csv')):
    print(f'error: {args.workdir}/results.csv does not exist (run the sweep first)',
          file=sys.stderr)
    return 2
  report(args.workdir, args.out or None)
  return 0


if __name__ == '__main__':
  sys.exit(main())

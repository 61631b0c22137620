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

The replay frontier: at each domain share where full fine-tuning was run with two or more replay
shares (recipe 'full' = 0, 'replay...' = finetune.replay), the domain gain kept and the
general-loss change per replay share, and the smallest share that keeps general loss within
+TARGET_FORGETTING of before while keeping >= TARGET_GAIN_KEPT of full fine-tuning's gain.

Best learning rate per cell: the lowest mean domain validation loss over the seeds (the same
validation batches the table reports, so the selected cell is slightly optimistic; with a
2-point grid the effect is small). Spread = sample standard deviation over seeds.
Effective data: lm.transfer on the from-scratch curve (every scratch share, each at its best
learning rate, mean over seeds); '> N' where the fine-tuned loss is below every from-scratch
loss (D_E is more than the largest size N), '< N' where it is above every one.
"""

from __future__ import annotations

import collections
import csv
import math
import os
import statistics
import sys

from absl import flags

from lm import cli, transfer
from lm.errors import UserError

KEYS = ('recipe', 'data.train_fraction')
TARGET_FORGETTING = 0.05  # General-loss change allowed (issue: "within +0.05 of before").
TARGET_GAIN_KEPT = 0.9  # Share of plain full fine-tuning's domain gain to keep.
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
           'train_tokens': _float(r.get('train_tokens')), 'replay': _float(r.get('replay'))}
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
            'train_tokens': trials[0]['train_tokens'], 'replay': trials[0]['replay']}
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


def replay_frontier(cells: list[dict]) -> dict[float, list[dict]]:
  """Per domain share with >= 2 replay shares of full fine-tuning: one row per replay share.

  Each row has the cell's gain and change, `gain_kept` (its mean domain gain / full
  fine-tuning's) and `meets` (both targets hold for the means).
  """
  by_share = collections.defaultdict(list)
  for c in cells:
    if c['recipe'] == 'full' or c['recipe'].startswith('replay'):
      if c['replay'] is not None and c['domain_gain_mean'] is not None:
        by_share[c['data.train_fraction']].append(c)
  frontier = {}
  for share, group in sorted(by_share.items()):
    full = [c for c in group if c['replay'] == 0]
    if len(group) < 3 or not full:  # A frontier needs full fine-tuning and >= 2 replay shares.
      continue
    full_gain, full_sd = full[0]['domain_gain_mean'], full[0]['domain_gain_sd'] or 0.0
    rows = []
    for c in sorted(group, key=lambda c: c['replay']):
      # A gain within the seeds' spread is no gain to keep a share of: no row meets the target.
      kept = c['domain_gain_mean'] / full_gain if full_gain > max(full_sd, 0.0) else None
      rows.append({**c, 'gain_kept': kept,
                   'meets': (kept is not None and c['general_change_mean'] <= TARGET_FORGETTING
                             and kept >= TARGET_GAIN_KEPT)})
    frontier[share] = rows
  return frontier


def frontier_markdown(frontier: dict[float, list[dict]]) -> str:
  parts = []
  for share, rows in frontier.items():
    lines = [f'Replay frontier at domain share {share:g} (full fine-tuning = replay 0; target: '
             f'general-loss change <= +{TARGET_FORGETTING:g} and >= {TARGET_GAIN_KEPT:.0%} of '
             'its domain gain):', '',
             '| replay share | best lr | domain gain | gain kept | general-loss change | '
             'meets both |', '|---:|---:|---:|---:|---:|---|']
    for r in rows:
      lines.append(f"| {r['replay']:g} | {r['best_lr']:g} | "
                   f"{_pm(r['domain_gain_mean'], r['domain_gain_sd'])} | "
                   f"{'' if r['gain_kept'] is None else format(r['gain_kept'], '.0%')} | "
                   f"{_pm(r['general_change_mean'], r['general_change_sd'])} | "
                   f"{'yes' if r['meets'] else 'no'} |")
    meeting = [r for r in rows if r['meets']]
    lines.append('')
    if rows[0]['gain_kept'] is None:
      lines.append('Full fine-tuning has no domain gain beyond its spread over seeds here (at '
                   'its best rate): there is no gain to keep a share of.')
    else:
      lines.append(f"Smallest replay share meeting both: {meeting[0]['replay']:g}." if meeting
                   else 'No replay share meets both targets: the table above is the frontier.')
    parts.append('\n'.join(lines))
  return '\n\n'.join(parts)


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
  frontier = frontier_markdown(replay_frontier(cells))
  text = ('# Transfer study: best learning rate per cell, mean ± sd over seeds\n\n'
          + markdown(cells) + '\n\n' + (frontier + '\n\n' if frontier else '')
          + '\n'.join(f'![{f}]({f})' for f in files) + '\n')
  with open(os.path.join(out_dir, 'transfer.md'), 'w') as f:
    f.write(text)
  print(text)
  return cells


def define_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
  del argv
  flags.DEFINE_string('workdir', None, 'The transfer sweep directory (holds results.csv).',
                      flag_values=flag_values)
  flags.DEFINE_string('out', '', 'Output directory (default: the workdir).',
                      flag_values=flag_values)


def run(args: flags.FlagValues, positional: list[str]) -> int:
  if positional or not args.workdir:
    raise UserError('usage: python -m lm.transfer_report --workdir=DIR [--out=DIR] (see --help)')
  if not os.path.exists(os.path.join(args.workdir, 'results.csv')):
    raise UserError(f'{args.workdir}/results.csv does not exist (run the sweep first)')
  report(args.workdir, args.out or None)
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run_tool(run, define_flags, argv, prog='python -m lm.transfer_report', doc=__doc__)


if __name__ == '__main__':
  sys.exit(main())

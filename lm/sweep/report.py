"""A sweep's results: results.csv, results.md (pivot tables, every trial) and the plots."""

from __future__ import annotations

import csv
import math
import os
import re
import statistics
from typing import Any

from lm.sweep.spec import Plot, Sweep, Table
from lm.sweep.state import DONE, metric_value, read_json, read_metrics, stage_metrics, status
from lm.files import write_json
from lm.sweep.state import summarize_metrics
from lm.sweep.trials import Trial



def is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

def fmt_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def _sort_key(value):
  return (0, value, '') if is_number(value) else (1, 0, str(value))


def fmt(value) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    if value != 0 and abs(value) < 1e-3:
      return f'{value:.3g}'
    if abs(value) >= 1000:
      return f'{value:,.0f}'
    return f'{value:.4f}'.rstrip('0').rstrip('.') if abs(value) < 1 else f'{value:.4f}'
  if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
    return f'{value:,}'
  return str(value)


def fmt_axis(value) -> str:
  return f'{value:g}' if isinstance(value, float) else fmt(value)


def result_rows(sweep: Sweep, trials: list[Trial]) -> tuple[list[str], list[dict]]:
  """(axes, rows): one row per trial with its status, swept values and metric columns."""
  axes: list[str] = []
  for t in trials:
    axes += [k for k in t.values if k not in axes]
  rows = []
  for t in trials:
    record = read_json(os.path.join(t.workdir, DONE))
    if record is not None and 'min' not in record:  # Written by an older lm.sweep.
      record.update(summarize_metrics(t.workdir))
    row = {'stage': t.stage, 'trial': t.name, 'status': status(t)}
    row.update({a: t.values.get(a) for a in axes})
    sources = stage_metrics(sweep, t.stage)
    row.update({m: metric_value(record, sources.get(m)) for m in all_columns(sweep)})
    row['wall_s'] = record.get('wall_s') if record else None
    row['workdir'] = t.workdir
    rows.append(row)
  return axes, rows


def all_columns(sweep: Sweep) -> list[str]:
  columns = list(sweep.metrics)
  for stage in sweep.stages:
    columns += [c for c in stage.metrics if c not in columns]
  return columns


def write_csv(path: str, columns: list[str], rows: list[dict]) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({c: ('' if row.get(c) is None else row.get(c)) for c in columns})


def markdown_table(columns: list[str], rows: list[list]) -> str:
  lines = ['| ' + ' | '.join(columns) + ' |',
           '|' + '|'.join('---:' if i else '---' for i in range(len(columns))) + '|']
  for row in rows:
    lines.append('| ' + ' | '.join(fmt(v) for v in row) + ' |')
  return '\n'.join(lines)


def pivot(rows: list[dict], table: Table) -> tuple[list, list, dict] | None:
  """(row keys, column keys, {(row, col): [values of every trial in that cell]})."""
  rows = [r for r in rows if (not table.stage or r['stage'] == table.stage)
          and r.get(table.rows) is not None and r.get(table.cols) is not None]
  if not rows:
    return None
  row_keys = list(dict.fromkeys(r[table.rows] for r in rows))  # Order of appearance.
  col_keys = sorted(dict.fromkeys(r[table.cols] for r in rows), key=_sort_key)
  cells = {}
  for r in rows:
    cells.setdefault((r[table.rows], r[table.cols]), []).append(r.get(table.value))
  return row_keys, col_keys, cells


def fmt_cell(values: list | None) -> str:
  """One trial's value; several trials (other axes swept too, e.g. seeds): their mean ± sd and
  how many, never just the last one. Trials without a value (failed) are counted apart."""
  if not values:
    return ''
  if len(values) == 1:
    return fmt(values[0])
  numbers = [v for v in values if is_number(v)]
  count = f'({len(numbers)}/{len(values)})'
  if len(numbers) < 2:
    return f'{fmt(numbers[0]) if numbers else "–"} {count}'
  return f'{fmt(statistics.fmean(numbers))} ± {fmt(statistics.stdev(numbers))} {count}'


def pivot_markdown(rows: list[dict], table: Table) -> str:
  result = pivot(rows, table)
  if result is None:
    return ''
  row_keys, col_keys, cells = result
  header = [f'{table.rows} \\ {table.cols}'] + [fmt_axis(c) for c in col_keys]
  body = [[fmt_axis(r)] + [fmt_cell(cells.get((r, c))) for c in col_keys] for r in row_keys]
  title = table.title or f'{table.value}: {table.rows} x {table.cols}'
  return f'### {title}\n\n' + markdown_table(header, body)


def _plt():
  # matplotlib (heavy, needed only when a sweep draws) stays off every other start-up path.
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def _save(plt, fig, path: str) -> None:
  """Every figure of a sweep report: tight layout, 110 dpi; closed, so a long report frees it."""
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_loss_curves(trials: list[Trial], path: str, max_lines: int = 6) -> dict:
  """train/loss (lines) and eval/loss (dots) against step: one panel per stage, or one per
  trial for a stage of more than `max_lines` trials."""
  plt = _plt()
  panels: list[tuple[str, list[Trial]]] = []
  for stage in dict.fromkeys(t.stage for t in trials):
    members = [t for t in trials if t.stage == stage]
    if len(members) <= max_lines:
      panels.append((stage, members))
    else:
      panels += [(t.name, [t]) for t in members]
  ncols = min(4, len(panels))
  nrows = math.ceil(len(panels) / ncols)
  wide = ncols == 1 or len(panels) < 4
  fig, axes = plt.subplots(nrows, ncols, figsize=((6 if wide else 3.6) * ncols, 3.2 * nrows + 0.4),
                           squeeze=False)
  series = {}
  for ax, (title, members) in zip(axes.flat, panels):
    for i, t in enumerate(members):
      m = read_metrics(t.workdir)
      color = f'C{i % 10}'
      entry = {}
      for key, style in (('train/loss', '-'), ('eval/loss', 'o--')):
        points = sorted(m.get(key, {}).items())
        if points:
          ax.plot([s for s, _ in points], [v for _, v in points], style, color=color,
                  lw=1.2 if style == '-' else 0.8, ms=3,
                  label=t.name.split('/', 1)[-1] if key == 'train/loss' else None)
          entry[key] = {'steps': [s for s, _ in points], 'values': [v for _, v in points]}
      if entry:
        series[t.name] = entry
    ax.set_title(title, fontsize=9)
    ax.set_xlabel('step', fontsize=8)
    ax.set_ylabel('loss', fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if len(members) > 1 and ax.lines:
      ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis('off')
  fig.suptitle('train loss (lines) and validation loss (dots)', fontsize=10)
  _save(plt, fig, path)
  return series


def _use_log(values, logx) -> bool:
  if logx is not None:
    return logx
  nums = [v for v in values if is_number(v)]
  return len(nums) == len(values) and bool(nums) and min(nums) > 0 and max(nums) / min(nums) >= 10


def plot_metric(rows: list[dict], plot: Plot, path: str) -> dict:
  """Each y against x, one line per value of plot.lines; returns the plotted numbers."""
  plt = _plt()
  ys = (plot.y,) if isinstance(plot.y, str) else tuple(plot.y)
  rows = [r for r in rows if (not plot.stage or r['stage'] == plot.stage)
          and r.get(plot.x) is not None]
  fig, axes = plt.subplots(1, len(ys), figsize=(5.6 * len(ys), 4.2), squeeze=False)
  out = {}
  xs_all = [r[plot.x] for r in rows]
  categorical = not all(is_number(x) for x in xs_all)
  categories = list(dict.fromkeys(xs_all))
  for ax, y in zip(axes[0], ys):
    groups: dict[str, list[tuple]] = {}
    for r in rows:
      if not is_number(r.get(y)):
        continue
      key = str(r.get(plot.lines)) if plot.lines else y
      groups.setdefault(key, []).append((r[plot.x], r[y]))
    lines = {}
    for i, (key, points) in enumerate(groups.items()):
      points.sort(key=lambda p: _sort_key(p[0]))
      xs = [categories.index(p[0]) if categorical else p[0] for p in points]
      ax.plot(xs, [p[1] for p in points], 'o' if plot.scatter else 'o-', color=f'C{i % 10}',
              label=key)
      lines[key] = {'x': [p[0] for p in points], 'y': [p[1] for p in points]}
    ref = plot.references.get(y)
    if ref:
      values = [r[ref] for r in rows if is_number(r.get(ref))]
      if values:
        level = sum(values) / len(values)
        ax.axhline(level, color='gray', ls='--', lw=1, label=plot.labels.get(ref, ref))
        lines[f'reference:{ref}'] = {'y': level}
    if categorical:
      ax.set_xticks(range(len(categories)), [str(c) for c in categories])
    elif _use_log(xs_all, plot.logx):
      ax.set_xscale('log')
    ax.set_xlabel(plot.xlabel or plot.labels.get(plot.x, plot.x))
    ax.set_ylabel(plot.labels.get(y, y))
    ax.grid(alpha=0.3)
    if lines:
      ax.legend(fontsize=8, title=None if plot.lines.startswith('_') else plot.lines or None)
    ax.set_title(plot.title or f'{plot.labels.get(y, y)}', fontsize=10)
    out[y] = lines
  _save(plt, fig, path)
  return out


def aggregate(sweep: Sweep, trials: list[Trial], sweep_dir: str) -> dict:
  """results.csv, results.md, loss_curves.png, <metric>_vs_<axis>.png, plots.json."""
  sweep_dir = os.path.abspath(sweep_dir)
  os.makedirs(sweep_dir, exist_ok=True)
  axes, rows = result_rows(sweep, trials)
  metrics = all_columns(sweep)
  columns = ['stage', 'trial', 'status'] + axes + metrics + ['wall_s', 'workdir']
  write_csv(os.path.join(sweep_dir, 'results.csv'), columns, rows)

  done = sum(r['status'] == 'done' for r in rows)
  md = [f'# Sweep {sweep.name}', '']
  if sweep.description:
    md += [sweep.description.strip(), '']
  walls = [r['wall_s'] for r in rows if is_number(r['wall_s'])]
  md += [f'{done}/{len(rows)} trials done; trial wall time {fmt_seconds(sum(walls))} in total.',
         '']
  for table in sweep.tables:
    text = pivot_markdown(rows, table)
    if text:
      md += [text, '']
  shown = ['trial', 'status'] + axes + metrics + ['wall time']
  body = [[r['trial'], r['status']] + [fmt_axis(r.get(a)) if r.get(a) is not None else None
                                       for a in axes]
          + [r.get(m) for m in metrics]
          + [fmt_seconds(r['wall_s']) if is_number(r['wall_s']) else None] for r in rows]
  md += ['### All trials', '', markdown_table(shown, body), '']
  plots: dict[str, Any] = {}
  if any(read_metrics(t.workdir) for t in trials):
    plots['loss_curves.png'] = plot_loss_curves(trials, os.path.join(sweep_dir, 'loss_curves.png'))
  finished = [r for r in rows if r['status'] == 'done']
  plots.update(plot_metrics_vs_axes(finished, axes, list(sweep.plot_metrics or metrics),
                                    sweep_dir))
  for plot in sweep.plots:
    ys = (plot.y,) if isinstance(plot.y, str) else plot.y
    name = plot.file or f'{"_".join(ys)}_vs_{_safe(plot.x)}.png'
    plots[name] = plot_metric(finished, plot, os.path.join(sweep_dir, name))
  md += ['### Plots', ''] + [f'![{n}]({n})' for n in plots] + ['']
  with open(os.path.join(sweep_dir, 'results.md'), 'w') as f:
    f.write('\n'.join(md))
  write_json(os.path.join(sweep_dir, 'plots.json'), plots)
  return {'rows': rows, 'columns': columns, 'plots': plots}


def plot_metrics_vs_axes(rows: list[dict], axes: list[str], metrics: list[str],
                         sweep_dir: str) -> dict:
  """<metric>_vs_<axis>.png for every metric and swept axis of each stage (one line per value
  of the stage's other axes); the stage is appended to the name if several stages sweep it."""
  plots = {}
  stages = list(dict.fromkeys(r['stage'] for r in rows))
  stage_axes = {s: [a for a in axes if a != 'sample' and any(
      r.get(a) is not None for r in rows if r['stage'] == s)] for s in stages}
  for stage in stages:
    subset = [dict(r) for r in rows if r['stage'] == stage]
    random_search = any(r.get('sample') is not None for r in subset)
    for axis in stage_axes[stage]:
      others = [] if random_search else [a for a in stage_axes[stage] if a != axis]
      for r in subset:
        r['_lines'] = ','.join(f'{a}={fmt_axis(r.get(a))}' for a in others)
      shared = sum(axis in a for a in stage_axes.values()) > 1
      for metric in metrics:
        if not any(is_number(r.get(metric)) for r in subset):
          continue
        name = f'{metric}_vs_{_safe(axis)}' + (f'_{stage}' if shared else '') + '.png'
        plots[name] = plot_metric(subset, Plot(x=axis, y=metric, lines='_lines' if others else '',
                                               title=f'{stage}: {metric} vs {axis}',
                                               scatter=random_search),
                                  os.path.join(sweep_dir, name))
  return plots


def _safe(name: str) -> str:
  return re.sub(r'[^\w.-]+', '_', name)


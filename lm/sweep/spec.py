"""The sweep-file language: stages, samplers, tables, plots, and loading a sweep file.

A sweep file (configs/sweeps/*.py) defines `get_sweep()` (or `get_sweep(arg)`, called with the
text after `--sweep=FILE:`) returning a `Sweep` built from these classes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import random
import sys
from typing import Sequence

from lm.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESERVED = ('script', 'config', 'evals')  # Bundle keys that are not config keys.
SCRIPTS = ('train.py', 'finetune.py')



@dataclasses.dataclass(frozen=True)
class Sampler:
  """A random-search distribution: uniform, log_uniform, randint or choice."""
  kind: str
  args: tuple

  def sample(self, rng: random.Random):
    if self.kind == 'uniform':
      return rng.uniform(*self.args)
    if self.kind == 'log_uniform':
      low, high = self.args
      return math.exp(rng.uniform(math.log(low), math.log(high)))
    if self.kind == 'randint':
      return rng.randint(*self.args)
    return rng.choice(self.args[0])


def uniform(low: float, high: float) -> Sampler:
  return Sampler('uniform', (float(low), float(high)))


def log_uniform(low: float, high: float) -> Sampler:
  if not 0 < low < high:
    raise ConfigError(f'log_uniform({low}, {high}): need 0 < low < high')
  return Sampler('log_uniform', (float(low), float(high)))


def randint(low: int, high: int) -> Sampler:
  """An integer in [low, high], both included."""
  return Sampler('randint', (int(low), int(high)))


def choice(values: Sequence) -> Sampler:
  return Sampler('choice', (tuple(values),))


@dataclasses.dataclass
class Stage:
  """Trials of one entry point; a stage starts when every earlier stage has finished.

  grid:    {key: [values]} -> cartesian product, the first key outermost; a value list may
           instead be {label: {key: value, ...}}, named bundles of overrides.
  zip:     {key: [values]} -> lists of equal length taken together (one axis).
  random:  {key: Sampler} -> `samples` draws from random.Random(seed); the first n draws do
           not change when samples grows.
  Parts that are present multiply: grid x zip x random.
  evals:   {name: {key: value}} -> after training, evaluate the final params with these
           overrides (e.g. {'general': {'data.builtin_subset': 'general'}}).
  """
  name: str
  script: str = 'train.py'
  config: str = 'configs/tiny.py'
  overrides: dict = dataclasses.field(default_factory=dict)
  grid: dict = dataclasses.field(default_factory=dict)
  zip: dict = dataclasses.field(default_factory=dict)
  random: dict = dataclasses.field(default_factory=dict)
  samples: int = 0
  seed: int = 0
  evals: dict = dataclasses.field(default_factory=dict)
  metrics: dict = dataclasses.field(default_factory=dict)  # Sweep.metrics overrides; None blanks.


@dataclasses.dataclass
class Table:
  """A pivot table of one metric in results.md: rows x cols (swept axes or metric columns)."""
  rows: str
  cols: str
  value: str
  title: str = ''
  stage: str = ''  # '' = every stage that has both axes.


@dataclasses.dataclass
class Plot:
  """metric(s) `y` against `x` (an axis or a metric column), one line per value of `lines`.

  references: {y: metric} draws that metric's mean (e.g. before fine-tuning) as a dashed line.
  labels: {column: text} for axis titles, legend entries and references.
  """
  x: str
  y: str | tuple
  lines: str = ''
  file: str = ''
  title: str = ''
  stage: str = ''
  logx: bool | None = None  # None: log scale when positive values span 10x or more.
  xlabel: str = ''
  references: dict = dataclasses.field(default_factory=dict)
  labels: dict = dataclasses.field(default_factory=dict)
  scatter: bool = False  # Points only (random search), sorted lines otherwise.


DEFAULT_METRICS = {'train_loss': 'final.train/loss', 'eval_loss': 'final.eval/loss'}


@dataclasses.dataclass
class Sweep:
  """Stages in order, the metric columns to collect, and extra tables / plots.

  metrics: {column: source or (sources, first present wins)}. A source is a path into a
  trial's done.json: final.<metrics.jsonl key> (last value), min.<key> / max.<key> (over the
  run, e.g. min.eval/loss: the early-stopping loss), report.<...> (finetune_report
  .json, e.g. report.after.general_loss), evals.<name>.<key> (Stage.evals), data.train_tokens
  (tokens in the trial's training split), wall_s, steps.
  tables / plots: extra pivot tables (results.md) and figures, besides loss_curves.png and
  <metric>_vs_<axis>.png for each metric in plot_metrics.
  """
  name: str
  stages: list
  metrics: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_METRICS))
  tables: list = dataclasses.field(default_factory=list)
  plots: list = dataclasses.field(default_factory=list)
  plot_metrics: tuple = ()  # Metrics drawn against each swept axis; () = all of them.
  description: str = ''


def load_sweep(spec: str) -> Sweep:
  """`path.py` or `path.py:arg` -> the Sweep its get_sweep() returns."""
  resolved, path, arg = resolve_spec(spec, '--sweep', 'sweep')
  module = load_module(resolved, 'lm_sweep_file')
  if not hasattr(module, 'get_sweep'):
    raise ConfigError(f'--sweep: {path} defines no get_sweep()')
  sweep = module.get_sweep(arg) if arg else module.get_sweep()
  if not isinstance(sweep, Sweep):
    raise ConfigError(f'--sweep: {path}: get_sweep() must return lm.sweep.Sweep, '
                      f'got {type(sweep).__name__}')
  return sweep


def resolve_spec(spec: str, where: str, what: str) -> tuple[str, str, str]:
  """`path.py` or `path.py:arg` -> (absolute file, path, arg); a missing file is a ConfigError
  naming `where` (the flag or trial) and `what` kind of file it should be."""
  path, _, arg = spec.partition(':')
  resolved = resolve_file(path)
  if resolved is None:
    raise ConfigError(f'{where}: no such {what} file {path!r}')
  return resolved, path, arg


def resolve_file(path: str) -> str | None:
  for candidate in (path, os.path.join(ROOT, path)):
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  return None


def load_module(path: str, name: str):
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module

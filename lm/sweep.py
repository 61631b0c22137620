"""Sweeps: run a grid / zip / random set of train.py or finetune.py trials and compare them.

  python -m lm.sweep --sweep=configs/sweeps/lr_width.py --workdir=runs/lr_width [--parallel=2]
  python -m lm.sweep --sweep=configs/sweeps/transfer.py --workdir=runs/transfer --print-commands
  python -m lm.sweep --sweep=... --workdir=... --aggregate        (tables and plots only)

A sweep file defines `get_sweep()` (or `get_sweep(arg)`, called with the text after
`--sweep=FILE:`) returning a `Sweep`: stages that run in order, each a base config file plus
overrides, expanded into trials by a grid (cartesian product), zipped lists and seeded random
samples over `config.key`s. A grid or zip axis may also take named bundles of overrides
({'lora': {...}, 'full': {...}}) whose reserved keys `script`, `config` and `evals` change the
entry point, the base config file or the extra evaluations of those trials.

Every trial is exactly one command (what --print-commands prints):

  python train.py|finetune.py --config=<file> --config.k=v ... --workdir=<sweep>/<stage>/<label>

followed, if the trial asks for `evals`, by `python -m lm.sweep --evaluate=<trial workdir>`,
which measures the final params on other data (e.g. the general corpus). '{sweep}' in a value
is the sweep's workdir, so a later stage can fine-tune an earlier stage's model.

A trial is finished when its workdir holds `done.json` (written by the sweep after the command
exits 0 with a checkpoint at train.steps; it holds the final metrics). Re-running a sweep
skips finished trials and restarts unfinished ones, which resume from their own checkpoints.
SIGTERM / Ctrl-C stops the running trials at a step boundary (they save a checkpoint) and
writes what is finished so far. Trials run elsewhere from the printed commands count as
finished once their final checkpoint exists.

Results go to <workdir>/results.csv, results.md (the sweep's pivot tables and every trial),
loss_curves.png, <metric>_vs_<axis>.png and the sweep's own plots; plots.json holds the
plotted numbers.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import importlib.util
import io
import itertools
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Sequence

from lm import config as config_lib
from lm.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESERVED = ('script', 'config', 'evals')  # Bundle keys that are not config keys.
SCRIPTS = ('train.py', 'finetune.py')
DONE = 'done.json'
TRIAL_FILE = 'sweep_trial.json'
EVALS_FILE = 'sweep_evals.json'
LOG = 'log.txt'


# --------------------------------------------------------------------------- sweep files


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
  path, _, arg = spec.partition(':')
  resolved = _resolve_file(path)
  if resolved is None:
    raise ConfigError(f'--sweep: no such sweep file {path!r}')
  module = _load_module(resolved, 'lm_sweep_file')
  if not hasattr(module, 'get_sweep'):
    raise ConfigError(f'--sweep: {path} defines no get_sweep()')
  sweep = module.get_sweep(arg) if arg else module.get_sweep()
  if not isinstance(sweep, Sweep):
    raise ConfigError(f'--sweep: {path}: get_sweep() must return lm.sweep.Sweep, '
                      f'got {type(sweep).__name__}')
  return sweep


def _resolve_file(path: str) -> str | None:
  for candidate in (path, os.path.join(ROOT, path)):
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  return None


def _load_module(path: str, name: str):
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# --------------------------------------------------------------------------- expansion


@dataclasses.dataclass
class Trial:
  stage: str
  name: str  # '<stage>/<label>', or '<stage>' for a stage of one trial.
  workdir: str
  script: str
  config: str
  overrides: dict  # Config key -> value, in command-line order.
  values: dict  # Swept axis -> value (or bundle label).
  evals: dict
  steps: int = 0  # train.steps of the built config: the step of the final checkpoint.
  cfg: Any = None

  def train_command(self, python: str = 'python') -> list[str]:
    return ([python, self.script, f'--config={self.config}']
            + [f'--config.{k}={cli_value(v)}' for k, v in self.overrides.items()]
            + [f'--workdir={self.workdir}'])

  def eval_command(self, python: str = 'python') -> list[str] | None:
    if not self.evals:
      return None
    return ([python, '-m', 'lm.sweep', f'--evaluate={self.workdir}',
             '--evals=' + json.dumps(self.evals, sort_keys=True)]
            + (['--finetuned'] if self.script == 'finetune.py' else []))

  def shell_command(self) -> str:
    commands = [self.train_command(), self.eval_command()]
    return ' && '.join(shlex.join(c) for c in commands if c)


def cli_value(value) -> str:
  """What --config.key=<text> needs so config_flags parses `value` back."""
  if isinstance(value, str):
    return value
  if isinstance(value, (tuple, list)):
    return repr(tuple(_tuples(value)))
  return repr(value)


def _tuples(value):
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def _axis(key: str, values, where: str) -> list[tuple[Any, dict]]:
  """[(value or label, overrides)] of one grid / zip axis."""
  if isinstance(values, dict):
    out = []
    for label, bundle in values.items():
      if not isinstance(bundle, dict):
        raise ConfigError(f'{where}: axis {key!r}: bundle {label!r} must be a dict of '
                          f'overrides, got {type(bundle).__name__}')
      out.append((label, dict(bundle)))
    return out
  if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
    raise ConfigError(f'{where}: axis {key!r} needs a list of values (or a dict of named '
                      f'bundles), got {values!r}')
  if not values:
    raise ConfigError(f'{where}: axis {key!r} has no values')
  return [(v, {key: v}) for v in values]


def expand(stage: Stage, where: str = '') -> list[tuple[dict, dict]]:
  """[(values, overrides)] of a stage, in order: grid (first key outermost) x zip x random."""
  where = where or f'stage {stage.name!r}'
  parts: list[list[tuple[dict, dict]]] = []
  for key, values in stage.grid.items():
    parts.append([({key: v}, o) for v, o in _axis(key, values, where)])
  if stage.zip:
    axes = {k: _axis(k, v, where) for k, v in stage.zip.items()}
    lengths = {k: len(v) for k, v in axes.items()}
    if len(set(lengths.values())) > 1:
      raise ConfigError(f'{where}: zip lists must have equal lengths, got {lengths}')
    rows = []
    for i in range(next(iter(lengths.values()))):
      values, overrides = {}, {}
      for k, axis in axes.items():
        values[k] = axis[i][0]
        overrides.update(axis[i][1])
      rows.append((values, overrides))
    parts.append(rows)
  if stage.random or stage.samples:
    if not stage.random or stage.samples < 1:
      raise ConfigError(f'{where}: random search needs both `random` and `samples` >= 1')
    for k, sampler in stage.random.items():
      if not isinstance(sampler, Sampler):
        raise ConfigError(f'{where}: random[{k!r}] must be lm.sweep.uniform/log_uniform/'
                          f'randint/choice(...), got {sampler!r}')
    rng = random.Random(stage.seed)
    rows = []
    for i in range(stage.samples):
      drawn = {k: s.sample(rng) for k, s in stage.random.items()}
      rows.append(({'sample': i, **drawn}, dict(drawn)))
    parts.append(rows)
  trials = []
  for combo in itertools.product(*parts):
    values, overrides = {}, {}
    for v, o in combo:
      values.update(v)
      overrides.update(o)
    trials.append((values, overrides))
  return trials


def _format_label_value(value) -> str:
  if isinstance(value, float):
    text = f'{value:.4g}'
  else:
    text = str(value)
  return re.sub(r'[^\w.+=-]+', '_', text).strip('_') or '_'


def trial_label(values: dict) -> str:
  shorts = [k.split('.')[-1] for k in values]
  names = [k.split('.')[-1] if shorts.count(k.split('.')[-1]) == 1 else k for k in values]
  return ','.join(f'{n}={_format_label_value(v)}' for n, v in zip(names, values.values()))


def check_key(key: str, where: str) -> None:
  """A dotted key of the base config, or ConfigError naming it (and the closest key)."""
  from lm import cli
  if not re.fullmatch(r'[\w.]+', key):
    raise ConfigError(f"{where}: unknown config key '{key}'")
  try:
    cli.check_command_line([f'--config.{key}=x'])
  except ConfigError as e:
    raise ConfigError(f'{where}: {e}') from None
  node = config_lib.base_config()
  for part in key.split('.'):
    node = node[part]
  if isinstance(node, config_lib.ConfigDict):
    raise ConfigError(f"{where}: config key '{key}' is a section; set one of its keys")


def _substitute(value, sweep_dir: str):
  if isinstance(value, str):
    return value.replace('{sweep}', sweep_dir)
  if isinstance(value, (list, tuple)):
    return tuple(_substitute(v, sweep_dir) for v in value)
  return value


_CONFIG_CACHE: dict[str, Any] = {}


def load_base_config(spec: str, where: str):
  path, _, arg = spec.partition(':')
  resolved = _resolve_file(path)
  if resolved is None:
    raise ConfigError(f'{where}: no such config file {path!r}')
  if spec not in _CONFIG_CACHE:
    module = _load_module(resolved, 'lm_sweep_base_config')
    _CONFIG_CACHE[spec] = module.get_config(arg) if arg else module.get_config()
  return copy.deepcopy(_CONFIG_CACHE[spec])


def build_config(trial: Trial, where: str):
  """The trial's config as its command builds it (file + overrides), validated."""
  cfg = load_base_config(trial.config, where)
  for key, value in trial.overrides.items():
    *sections, name = key.split('.')
    node = cfg
    for s in sections:
      node = node[s]
    try:
      node[name] = _tuples(value)
    except (TypeError, ValueError, KeyError) as e:
      raise ConfigError(f'{where}: config key {key}: cannot use {value!r} ({e})') from None
  try:
    config_lib.validate(cfg)
  except ConfigError as e:
    raise ConfigError(f'{where}: {e}') from None
  return cfg


def make_trials(sweep: Sweep, sweep_dir: str, extra: dict | None = None) -> list[Trial]:
  """Every trial of every stage, each checked (keys, types, validate()) before any runs."""
  extra = dict(extra or {})
  sweep_dir = os.path.abspath(sweep_dir)
  for key in extra:
    check_key(key, 'command line')
  names = [s.name for s in sweep.stages]
  if not sweep.stages:
    raise ConfigError(f'sweep {sweep.name!r} has no stages')
  if len(set(names)) != len(names):
    raise ConfigError(f'sweep {sweep.name!r}: stage names must be unique, got {names}')
  trials: list[Trial] = []
  for stage in sweep.stages:
    where = f'sweep {sweep.name!r}, stage {stage.name!r}'
    if not isinstance(stage, Stage):
      raise ConfigError(f'sweep {sweep.name!r}: stages must be lm.sweep.Stage objects')
    if not re.fullmatch(r'[\w.-]+', stage.name):
      raise ConfigError(f'{where}: a stage name is a directory name ([A-Za-z0-9_.-])')
    for key in stage.overrides:
      check_key(key, where)
    for key, values in itertools.chain(stage.grid.items(), stage.zip.items()):
      if isinstance(values, dict):
        for label, bundle in values.items():
          bundle = bundle if isinstance(bundle, dict) else {}
          for k in bundle:
            if k not in RESERVED:
              check_key(k, f'{where}, {key}={label}')
          for name, overrides in (bundle.get('evals') or {}).items():
            for k in overrides:
              check_key(k, f'{where}, {key}={label}, evals {name!r}')
      else:
        check_key(key, where)
    for key in stage.random:
      check_key(key, where)
    for name, overrides in stage.evals.items():
      for key in overrides:
        check_key(key, f'{where}, evals {name!r}')
    expanded = expand(stage, where)
    swept = {k for values, overrides in expanded for k in overrides}
    clash = sorted(swept & set(extra))
    if clash:
      raise ConfigError(f'command line: config key {clash[0]} is swept by {where}; it cannot '
                        f'also be set for every trial')
    labels = [trial_label(values) for values, _ in expanded]
    if len(set(labels)) != len(labels):
      raise ConfigError(f'{where}: two trials share a name ({labels}); use distinct values')
    for (values, overrides), label in zip(expanded, labels):
      merged = {**stage.overrides, **overrides, **extra}
      reserved = {k: merged.pop(k) for k in RESERVED if k in merged}
      script = reserved.get('script', stage.script)
      if script not in SCRIPTS:
        raise ConfigError(f'{where}: script must be one of {SCRIPTS}, got {script!r}')
      merged = {k: _substitute(v, sweep_dir) for k, v in merged.items()}
      name = f'{stage.name}/{label}' if label else stage.name
      trial = Trial(stage=stage.name, name=name,
                    workdir=os.path.join(sweep_dir, stage.name, label) if label
                    else os.path.join(sweep_dir, stage.name),
                    script=script, config=reserved.get('config', stage.config),
                    overrides=merged, values=values,
                    evals={n: {k: _substitute(v, sweep_dir) for k, v in o.items()}
                           for n, o in reserved.get('evals', stage.evals).items()})
      trial.cfg = build_config(trial, f'{where}, trial {name!r}')
      trial.steps = int(trial.cfg.train.steps)
      trials.append(trial)
  return trials


# --------------------------------------------------------------------------- trial state


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_json(path: str, obj) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1, default=str)
  os.replace(tmp, path)


def final_checkpoint_exists(trial: Trial) -> bool:
  return os.path.isdir(os.path.join(trial.workdir, 'checkpoints', str(trial.steps)))


def trained(trial: Trial) -> bool:
  """The command ran to train.steps (and, for fine-tuning, wrote the 'after' report)."""
  if not final_checkpoint_exists(trial):
    return False
  if trial.script == 'finetune.py':
    report = _read_json(os.path.join(trial.workdir, 'finetune_report.json')) or {}
    return 'after' in report
  return True


def evaluated(trial: Trial) -> bool:
  if not trial.evals:
    return True
  saved = _read_json(os.path.join(trial.workdir, EVALS_FILE)) or {}
  return all(name in saved for name in trial.evals)


def status(trial: Trial) -> str:
  if os.path.exists(os.path.join(trial.workdir, DONE)):
    return 'done'
  if trained(trial) and evaluated(trial):
    return 'trained'  # Run elsewhere (printed commands): finished but not yet collected.
  runs = (_read_json(os.path.join(trial.workdir, TRIAL_FILE)) or {}).get('runs')
  if runs and runs[-1].get('outcome') == 'failed':
    return 'failed'
  if os.path.isdir(os.path.join(trial.workdir, 'checkpoints')):
    return 'partial'
  return 'pending'


def check_unchanged(trial: Trial) -> None:
  """A trial's workdir from an earlier run must come from the same command."""
  saved = _read_json(os.path.join(trial.workdir, TRIAL_FILE))
  if not saved:
    return
  now = json.loads(json.dumps(trial.overrides, default=str))
  if saved.get('overrides') != now or saved.get('script') != trial.script or \
      saved.get('config') != trial.config:
    before = saved.get('overrides', {})
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    raise ConfigError(f'trial {trial.name!r} in {trial.workdir} was started with other settings '
                      f'(changed: {", ".join(changed) or "script/config"}); remove that '
                      f'directory or use another --workdir')


def read_metrics(workdir: str) -> dict[str, dict[int, float]]:
  """{key: {step: value}} from metrics.jsonl (a resumed run's repeated steps: last wins)."""
  out: dict[str, dict[int, float]] = {}
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          continue  # A line cut by a kill.
        step = record.pop('step', None)
        for key, value in record.items():
          out.setdefault(key, {})[int(step)] = value
  except OSError:
    pass
  return out


def summarize_metrics(workdir: str) -> dict:
  """{'final': last value, 'min': smallest, 'max': largest} of every metrics.jsonl key."""
  metrics = {k: v for k, v in read_metrics(workdir).items() if v}
  return {'final': {k: v[max(v)] for k, v in metrics.items()},
          'min': {k: min(v.values()) for k, v in metrics.items()},
          'max': {k: max(v.values()) for k, v in metrics.items()}}


_TOKENS_CACHE: dict[str, int] = {}


def train_tokens(trial: Trial) -> int:
  """Tokens (with bos/eos) in the trial's training split, under the trial's tokenizer."""
  from lm import data, tokenizer as tokenizer_lib
  tokenizer = tokenizer_lib.Tokenizer.load(os.path.join(trial.workdir, 'tokenizer.model'))
  task = trial.cfg.finetune.task if trial.script == 'finetune.py' else 'lm'
  key = json.dumps([tokenizer.fingerprint, data.source_key(trial.cfg, task),
                    trial.cfg.data.train_fraction, trial.cfg.data.validation_share], default=str)
  if key not in _TOKENS_CACHE:
    records = data.load_documents(trial.cfg, 'train', task)
    tokenized = data.tokenize_records(records, tokenizer, task)
    _TOKENS_CACHE[key] = int(sum(len(tokens) for tokens, _ in tokenized))
  return _TOKENS_CACHE[key]


def collect(trial: Trial, metric_sources: Sequence[str], wall_s: float | None) -> dict:
  """The done.json record of a finished trial."""
  record = {'trial': trial.name, 'stage': trial.stage, 'values': trial.values,
            'script': trial.script, 'config': trial.config, 'overrides': trial.overrides,
            'command': trial.shell_command(), 'steps': trial.steps, 'wall_s': wall_s,
            **summarize_metrics(trial.workdir)}
  report = _read_json(os.path.join(trial.workdir, 'finetune_report.json'))
  if report:
    record['report'] = {k: v for k, v in report.items() if k != 'parameters'}
  evals = _read_json(os.path.join(trial.workdir, EVALS_FILE))
  if evals:
    record['evals'] = evals
  if any(s.startswith('data.train_tokens') for s in metric_sources):
    record['data'] = {'train_tokens': train_tokens(trial)}
  return record


def lookup(record: dict, source: str):
  head, _, rest = source.partition('.')
  node = record.get(head)
  if not rest:
    return node
  if head in ('final', 'min', 'max'):  # metrics.jsonl keys hold '/', never '.'.
    return node.get(rest) if isinstance(node, dict) else None
  for part in rest.split('.'):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def metric_value(record: dict | None, sources) -> Any:
  if record is None or not sources:
    return None
  for source in (sources,) if isinstance(sources, str) else sources:
    value = lookup(record, source)
    if value is not None:
      return value
  return None


def stage_metrics(sweep: Sweep, stage_name: str) -> dict:
  """{column: sources} of one stage: the sweep's metrics with the stage's overrides."""
  for stage in sweep.stages:
    if stage.name == stage_name:
      return {**sweep.metrics, **stage.metrics}
  return dict(sweep.metrics)


def all_sources(sweep: Sweep) -> list[str]:
  specs = list(sweep.metrics.values()) + [v for st in sweep.stages for v in st.metrics.values()]
  return [s for v in specs if v for s in ((v,) if isinstance(v, str) else v)]


# --------------------------------------------------------------------------- running


def _die_with_parent():
  """Linux: a trial gets SIGTERM (save and stop) if the sweep process is killed outright."""
  try:
    import ctypes
    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


class _Running:
  """One trial in flight: its train command, then its eval command."""

  def __init__(self, trial: Trial, commands: list[list[str]], env: dict):
    self.trial, self.commands, self.env = trial, commands, env
    self.proc: subprocess.Popen | None = None
    self.started = time.time()
    self.rc = 0
    self._log = None

  def start_next(self) -> bool:
    if not self.commands:
      return False
    command = self.commands.pop(0)
    if self._log is None:
      self._log = open(os.path.join(self.trial.workdir, LOG), 'a')
    self._log.write(f'\n$ {shlex.join(command)}\n')
    self._log.flush()
    self.proc = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=self._log,
                                 stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    path = os.path.join(self.trial.workdir, TRIAL_FILE)
    _write_json(path, {**(_read_json(path) or {}), 'pid': self.proc.pid})
    return True

  def close(self):
    if self._log is not None:
      self._log.close()


def _alive(pid, needle: str) -> bool:
  """Process `pid` exists and its command line contains `needle` (Linux /proc; else False)."""
  try:
    with open(f'/proc/{int(pid)}/cmdline', 'rb') as f:
      return needle in f.read().decode('utf-8', 'replace')
  except (OSError, TypeError, ValueError):
    return False


class SweepLock:
  """<workdir>/sweep.lock: one lm.sweep process at a time per sweep directory."""

  def __init__(self, sweep_dir: str):
    self.path = os.path.join(sweep_dir, 'sweep.lock')

  def __enter__(self):
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    try:
      with open(self.path) as f:
        pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
      pid = 0
    if pid and pid != os.getpid() and _alive(pid, 'lm.sweep'):
      raise ConfigError(f'another lm.sweep (pid {pid}) is running in {os.path.dirname(self.path)}')
    with open(self.path, 'w') as f:
      f.write(str(os.getpid()))
    return self

  def __exit__(self, *exc):
    try:
      os.unlink(self.path)
    except OSError:
      pass


def log_tail(trial: Trial, lines: int = 6) -> str:
  try:
    with open(os.path.join(trial.workdir, LOG)) as f:
      text = f.read().rstrip().splitlines()
  except OSError:
    return ''
  return '\n'.join('    ' + line for line in [t for t in text if t.strip()][-lines:])


def _fmt_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


class Runner:
  """Runs the trials stage by stage, `parallel` at a time, and collects the finished ones."""

  def __init__(self, sweep: Sweep, trials: list[Trial], sweep_dir: str, *, parallel: int = 1,
               env: dict | None = None, out=None):
    self.sweep, self.trials, self.sweep_dir = sweep, trials, os.path.abspath(sweep_dir)
    self.parallel = max(1, parallel)
    self.env = dict(os.environ if env is None else env)
    self.env['PYTHONPATH'] = os.pathsep.join(
        p for p in (ROOT, self.env.get('PYTHONPATH', '')) if p)
    # Trials of a sweep compile the same programs: a shared persistent compilation cache
    # halves the start-up of every trial after the first of each shape.
    self.env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(self.sweep_dir, 'jax_cache'))
    self.env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
    self.out = out or sys.stdout
    self.stop_requested = False
    self.running: list[_Running] = []
    self.failed: list[str] = []
    self.sources = all_sources(sweep)

  def say(self, text: str) -> None:
    print(text, file=self.out, flush=True)

  def _on_signal(self, signum, frame):
    del frame
    if not self.stop_requested:
      self.say(f'sweep: signal {signum}: stopping the running trials (they save a checkpoint); '
               f'run the same command again to resume')
    self.stop_requested = True
    for r in self.running:
      if r.proc is not None and r.proc.poll() is None:
        try:
          r.proc.send_signal(signal.SIGTERM)
        except OSError:
          pass

  def finish(self, trial: Trial, wall_s: float | None) -> dict:
    record = collect(trial, self.sources, wall_s)
    _write_json(os.path.join(trial.workdir, DONE), record)
    return record

  def run(self) -> int:
    """0 when every trial is done; 1 if any failed or the sweep was stopped."""
    previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    start = time.time()
    try:
      for stage in self.sweep.stages:
        self.run_stage([t for t in self.trials if t.stage == stage.name])
        if self.stop_requested or self.failed:
          break
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)
    done = sum(status(t) == 'done' for t in self.trials)
    self.say(f'sweep: {done}/{len(self.trials)} trials done in this workdir; this run took '
             f'{_fmt_seconds(time.time() - start)}')
    if self.failed:
      self.say(f'sweep: failed: {", ".join(self.failed)} (see their {LOG}); later stages not run')
    elif self.stop_requested:
      self.say('sweep: stopped; run the same command again to finish the remaining trials')
    return 0 if done == len(self.trials) else 1

  def run_stage(self, trials: list[Trial]) -> None:
    queue = []
    for trial in trials:
      state = status(trial)
      if state == 'done':
        self.say(f'[{trial.name}] done (skipped)')
        continue
      if state == 'trained':
        self.finish(trial, None)
        self.say(f'[{trial.name}] finished elsewhere; collected')
        continue
      queue.append(trial)
    while (queue or self.running) and not (self.stop_requested and not self.running):
      while queue and len(self.running) < self.parallel and not self.stop_requested:
        self.launch(queue.pop(0))
      time.sleep(0.2)
      for r in list(self.running):
        if r.proc is not None and r.proc.poll() is None:
          continue
        r.rc = r.proc.returncode if r.proc is not None else 0
        if r.rc == 0 and not self.stop_requested and r.commands and trained(r.trial):
          r.start_next()  # The eval helper.
          continue
        self.running.remove(r)
        r.close()
        self.complete(r)

  def launch(self, trial: Trial) -> None:
    os.makedirs(trial.workdir, exist_ok=True)
    state = status(trial)
    saved = _read_json(os.path.join(trial.workdir, TRIAL_FILE)) or {}
    if _alive(saved.get('pid'), trial.workdir):
      # A sweep killed outright (SIGKILL): its trial got SIGTERM and may still be saving.
      self.say(f'[{trial.name}] waiting for the previous run (pid {saved["pid"]}) to exit')
      while _alive(saved.get('pid'), trial.workdir):
        time.sleep(0.5)
    _write_json(os.path.join(trial.workdir, TRIAL_FILE),
                {'trial': trial.name, 'script': trial.script, 'config': trial.config,
                 'overrides': trial.overrides, 'values': trial.values,
                 'command': trial.shell_command(), 'runs': saved.get('runs', [])})
    python = sys.executable
    commands = []
    if not trained(trial):
      commands.append(trial.train_command(python))
    if trial.evals:
      commands.append(trial.eval_command(python))
    r = _Running(trial, commands, self.env)
    self.running.append(r)
    resuming = os.path.isdir(os.path.join(trial.workdir, 'checkpoints'))
    self.say(f'[{trial.name}] {"resuming" if resuming else "starting"}'
             f'{" (failed before)" if state == "failed" else ""} '
             f'(log: {os.path.join(trial.workdir, LOG)})')
    r.start_next()

  def complete(self, r: _Running) -> None:
    trial = r.trial
    wall = time.time() - r.started
    finished = r.rc == 0 and trained(trial) and evaluated(trial)
    outcome = 'done' if finished else 'stopped' if self.stop_requested else 'failed'
    saved = _read_json(os.path.join(trial.workdir, TRIAL_FILE)) or {}
    saved.setdefault('runs', []).append({'started': r.started, 'wall_s': wall, 'rc': r.rc,
                                         'outcome': outcome})
    _write_json(os.path.join(trial.workdir, TRIAL_FILE), saved)
    if finished:
      total = sum(run['wall_s'] for run in saved['runs'])
      record = self.finish(trial, total)
      shown = ', '.join(f'{k} {_fmt(metric_value(record, s))}'
                        for k, s in stage_metrics(self.sweep, trial.stage).items()
                        if _is_number(metric_value(record, s)))
      self.say(f'[{trial.name}] done in {_fmt_seconds(wall)}: {shown}')
    elif self.stop_requested:
      self.say(f'[{trial.name}] stopped after {_fmt_seconds(wall)} (resumes on the next run)')
    else:
      why = (f'exit code {r.rc}' if r.rc else
             f'exited 0 without a checkpoint at step {trial.steps}')
      self.failed.append(trial.name)
      self.say(f'[{trial.name}] FAILED ({why}); last lines of its log:\n{log_tail(trial)}')


# --------------------------------------------------------------------------- the eval helper


def evaluate_trial(workdir: str, evals: dict[str, dict], is_finetune: bool = False) -> dict:
  """Loss (and accuracy, perplexity) of a trial's final params under each set of overrides.

  The trial's saved config (its last checkpoint) with each eval's overrides: same seq_len,
  batch size and train.eval_batches, so the batches are those finetune.py's report uses.
  """
  from lm import checkpoint, loop

  workdir = os.path.abspath(workdir)
  cfg = checkpoint.read_config(workdir)
  path = os.path.join(workdir, EVALS_FILE)
  results = _read_json(path) or {}
  params = None
  for name, overrides in evals.items():
    eval_cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
      *sections, leaf = key.split('.')
      node = eval_cfg
      for s in sections:
        node = node[s]
      node[leaf] = _tuples(value)
    run = loop.build_run(eval_cfg, workdir, is_finetune=is_finetune)
    if params is None:
      params = checkpoint.load_params(workdir, run.abstract_params)
    results[name] = loop.evaluate(run, loop.make_eval_fn(run), params)
    print(f'eval {name}: ' + ', '.join(f'{k} {v:.4f}' for k, v in results[name].items()))
  _write_json(path, results)
  return results


# --------------------------------------------------------------------------- results


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sort_key(value):
  return (0, value, '') if _is_number(value) else (1, 0, str(value))


def _fmt(value) -> str:
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


def _fmt_axis(value) -> str:
  return f'{value:g}' if isinstance(value, float) else _fmt(value)


def result_rows(sweep: Sweep, trials: list[Trial]) -> tuple[list[str], list[dict]]:
  """(axes, rows): one row per trial with its status, swept values and metric columns."""
  axes: list[str] = []
  for t in trials:
    axes += [k for k in t.values if k not in axes]
  rows = []
  for t in trials:
    record = _read_json(os.path.join(t.workdir, DONE))
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
    lines.append('| ' + ' | '.join(_fmt(v) for v in row) + ' |')
  return '\n'.join(lines)


def pivot(rows: list[dict], table: Table) -> tuple[list, list, dict] | None:
  rows = [r for r in rows if (not table.stage or r['stage'] == table.stage)
          and r.get(table.rows) is not None and r.get(table.cols) is not None]
  if not rows:
    return None
  row_keys = list(dict.fromkeys(r[table.rows] for r in rows))  # Order of appearance.
  col_keys = sorted(dict.fromkeys(r[table.cols] for r in rows), key=_sort_key)
  cells = {(r[table.rows], r[table.cols]): r.get(table.value) for r in rows}
  return row_keys, col_keys, cells


def pivot_markdown(rows: list[dict], table: Table) -> str:
  result = pivot(rows, table)
  if result is None:
    return ''
  row_keys, col_keys, cells = result
  header = [f'{table.rows} \\ {table.cols}'] + [_fmt_axis(c) for c in col_keys]
  body = [[_fmt_axis(r)] + [cells.get((r, c)) for c in col_keys] for r in row_keys]
  title = table.title or f'{table.value}: {table.rows} x {table.cols}'
  return f'### {title}\n\n' + markdown_table(header, body)


def _plt():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


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
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return series


def _use_log(values, logx) -> bool:
  if logx is not None:
    return logx
  nums = [v for v in values if _is_number(v)]
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
  categorical = not all(_is_number(x) for x in xs_all)
  categories = list(dict.fromkeys(xs_all))
  for ax, y in zip(axes[0], ys):
    groups: dict[str, list[tuple]] = {}
    for r in rows:
      if not _is_number(r.get(y)):
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
      values = [r[ref] for r in rows if _is_number(r.get(ref))]
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
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
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
  walls = [r['wall_s'] for r in rows if _is_number(r['wall_s'])]
  md += [f'{done}/{len(rows)} trials done; trial wall time {_fmt_seconds(sum(walls))} in total.',
         '']
  for table in sweep.tables:
    text = pivot_markdown(rows, table)
    if text:
      md += [text, '']
  shown = ['trial', 'status'] + axes + metrics + ['wall time']
  body = [[r['trial'], r['status']] + [_fmt_axis(r.get(a)) if r.get(a) is not None else None
                                       for a in axes]
          + [r.get(m) for m in metrics]
          + [_fmt_seconds(r['wall_s']) if _is_number(r['wall_s']) else None] for r in rows]
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
  _write_json(os.path.join(sweep_dir, 'plots.json'), plots)
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
        r['_lines'] = ','.join(f'{a}={_fmt_axis(r.get(a))}' for a in others)
      shared = sum(axis in a for a in stage_axes.values()) > 1
      for metric in metrics:
        if not any(_is_number(r.get(metric)) for r in subset):
          continue
        name = f'{metric}_vs_{_safe(axis)}' + (f'_{stage}' if shared else '') + '.png'
        plots[name] = plot_metric(subset, Plot(x=axis, y=metric, lines='_lines' if others else '',
                                               title=f'{stage}: {metric} vs {axis}',
                                               scatter=random_search),
                                  os.path.join(sweep_dir, name))
  return plots


def _safe(name: str) -> str:
  return re.sub(r'[^\w.-]+', '_', name)


# --------------------------------------------------------------------------- command line


def parse_overrides(argv: list[str]) -> tuple[dict, list[str]]:
  """--config.a.b=v arguments (values parsed like Python literals) and the rest."""
  import ast
  overrides, rest = {}, []
  for arg in argv:
    match = re.match(r'--config\.([\w.]+)=(.*)$', arg, re.S)
    if not match:
      rest.append(arg)
      continue
    key, text = match.groups()
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    overrides[key] = value
  return overrides, rest


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides, argv = parse_overrides(argv)
  parser = argparse.ArgumentParser(
      prog='python -m lm.sweep', description=__doc__.split('\n\n')[0],
      epilog='--config.KEY=VALUE (any number) sets KEY for every trial of every stage.')
  parser.add_argument('--sweep', help='sweep file, configs/sweeps/*.py[:arg]')
  parser.add_argument('--workdir', help='sweep directory (one sub-directory per trial)')
  parser.add_argument('--parallel', type=int, default=1, help='trials at once (processes)')
  parser.add_argument('--print-commands', '--print_commands', action='store_true',
                      dest='print_commands', help='print one command per trial and exit')
  parser.add_argument('--aggregate', action='store_true',
                      help='only (re)write results.csv / results.md / plots from the workdir')
  parser.add_argument('--evaluate', help=argparse.SUPPRESS)  # The eval helper: a trial workdir.
  parser.add_argument('--evals', default='{}', help=argparse.SUPPRESS)
  parser.add_argument('--finetuned', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--verbose', action='store_true', help='tracebacks for user errors')
  args = parser.parse_args(argv)
  try:
    if args.evaluate:
      from lm import cli
      try:
        evaluate_trial(args.evaluate, json.loads(args.evals), is_finetune=args.finetuned)
      except cli.user_error_types() as e:
        if args.verbose:
          raise
        print(f'error: {e}', file=sys.stderr)
        return 2
      return 0
    if not args.sweep or not args.workdir:
      parser.error('--sweep and --workdir are required')
    sweep = load_sweep(args.sweep)
    trials = make_trials(sweep, args.workdir, overrides)
    if args.print_commands:
      for trial in trials:
        print(trial.shell_command())
      return 0
    if not args.aggregate:
      for trial in trials:
        check_unchanged(trial)
    workdir = os.path.abspath(args.workdir)
    if args.aggregate:
      aggregate(sweep, trials, workdir)
      print(f'sweep: results in {workdir}/results.md')
      return 0
    print(f'sweep {sweep.name}: {len(trials)} trials in {len(sweep.stages)} stage(s) -> '
          f'{workdir}', flush=True)
    with SweepLock(workdir):
      runner = Runner(sweep, trials, workdir, parallel=args.parallel)
      rc = runner.run()
      aggregate(sweep, trials, workdir)
    print(f'sweep: results in {workdir}/results.csv, results.md and *.png', flush=True)
    return rc
  except ConfigError as e:
    if args.verbose:
      raise
    print(f'error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  # Run as lm.sweep, not __main__, so the sweep files' `from lm.sweep import ...` classes match.
  from lm import sweep as _sweep_module
  sys.exit(_sweep_module.main())

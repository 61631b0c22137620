"""Expansion of a sweep into trials: grid x zip x random, labels, checked configs, commands."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import random
import re
import shlex
from typing import Any

from lm import config as config_lib
from lm.config import ConfigError
from lm.sweep.spec import RESERVED, SCRIPTS, Sampler, Stage, Sweep, load_module, resolve_spec



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
    return repr(config_lib.tuples(value))
  return repr(value)


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
  try:
    config_lib.check_key(key, leaf=True)
  except ConfigError as e:
    raise ConfigError(f'{where}: {e}') from None


def _substitute(value, sweep_dir: str):
  if isinstance(value, str):
    return value.replace('{sweep}', sweep_dir)
  if isinstance(value, (list, tuple)):
    return tuple(_substitute(v, sweep_dir) for v in value)
  return value


_CONFIG_CACHE: dict[str, Any] = {}


def load_base_config(spec: str, where: str):
  resolved, _, arg = resolve_spec(spec, where, 'config')
  if spec not in _CONFIG_CACHE:
    module = load_module(resolved, 'lm_sweep_base_config')
    _CONFIG_CACHE[spec] = module.get_config(arg) if arg else module.get_config()
  return copy.deepcopy(_CONFIG_CACHE[spec])


def build_config(trial: Trial, where: str):
  """The trial's config as its command builds it (file + overrides), validated."""
  cfg = load_base_config(trial.config, where)
  try:
    config_lib.override(cfg, trial.overrides)
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


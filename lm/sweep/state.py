"""A trial's state on disk: done / trained / partial / failed, its metrics and its record."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from lm import data, files
from lm import tokenizer as tokenizer_lib
from lm.config import ConfigError
from lm.errors import UserError
from lm.evaluate import EVALS_FILE
from lm.sweep.spec import Sweep
from lm.sweep.trials import Trial

DONE = 'done.json'
TRIAL_FILE = 'sweep_trial.json'
LOG = 'log.txt'


class SweepStateError(UserError, ValueError):
  """A file of the sweep's own state (done.json, sweep_trial.json, ...) cannot be read."""


def read_json(path: str) -> dict | None:
  """The file's JSON object, or None when there is no such file.

  A file that exists but does not parse is an error, never 'no record': reading it as absent
  would re-run a finished trial or forget a failed one's history.
  """
  return files.read_json(path, SweepStateError,
                         'delete the file to re-run or re-collect that trial')


def final_checkpoint_exists(trial: Trial) -> bool:
  return os.path.isdir(os.path.join(trial.workdir, 'checkpoints', str(trial.steps)))


def trained(trial: Trial) -> bool:
  """The command ran to train.steps (and, for fine-tuning, wrote the 'after' report)."""
  if not final_checkpoint_exists(trial):
    return False
  if trial.script == 'finetune.py':
    report = read_json(os.path.join(trial.workdir, 'finetune_report.json')) or {}
    return 'after' in report
  return True


def evaluated(trial: Trial) -> bool:
  if not trial.evals:
    return True
  saved = read_json(os.path.join(trial.workdir, EVALS_FILE)) or {}
  return all(name in saved for name in trial.evals)


def status(trial: Trial) -> str:
  if os.path.exists(os.path.join(trial.workdir, DONE)):
    return 'done'
  if trained(trial) and evaluated(trial):
    return 'trained'  # Run elsewhere (printed commands): finished but not yet collected.
  runs = (read_json(os.path.join(trial.workdir, TRIAL_FILE)) or {}).get('runs')
  if runs and runs[-1].get('outcome') == 'failed':
    return 'failed'
  if os.path.isdir(os.path.join(trial.workdir, 'checkpoints')):
    return 'partial'
  return 'pending'


def check_unchanged(trial: Trial) -> None:
  """A trial's workdir from an earlier run must come from the same command."""
  saved = read_json(os.path.join(trial.workdir, TRIAL_FILE))
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
  tokenizer = tokenizer_lib.Tokenizer.load(os.path.join(trial.workdir, 'tokenizer.model'))
  task = trial.cfg.finetune.task if trial.script == 'finetune.py' else 'lm'
  key = json.dumps([tokenizer.fingerprint, data.source_key(trial.cfg, task),
                    trial.cfg.data.train_fraction, trial.cfg.data.validation_share], default=str)
  if key not in _TOKENS_CACHE:
    records = data.load_documents(trial.cfg, 'train', task)
    tokenized = data.tokenize_records(records, tokenizer, task,
                                      template=data.task_template(trial.cfg, tokenizer, task))
    _TOKENS_CACHE[key] = int(sum(len(tokens) for tokens, _ in tokenized))
  return _TOKENS_CACHE[key]


def collect(trial: Trial, metric_sources: Sequence[str], wall_s: float | None) -> dict:
  """The done.json record of a finished trial."""
  record = {'trial': trial.name, 'stage': trial.stage, 'values': trial.values,
            'script': trial.script, 'config': trial.config, 'overrides': trial.overrides,
            'command': trial.shell_command(), 'steps': trial.steps, 'wall_s': wall_s,
            **summarize_metrics(trial.workdir)}
  report = read_json(os.path.join(trial.workdir, 'finetune_report.json'))
  if report:
    record['report'] = {k: v for k, v in report.items() if k != 'parameters'}
  evals = read_json(os.path.join(trial.workdir, EVALS_FILE))
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


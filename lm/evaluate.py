"""Evaluation in one place: validation loss / accuracy / perplexity / macro-F1 of a set of params.

  evaluate(run, eval_fn, params)   mean metrics over the first train.eval_batches validation
                                   batches (classification: accuracy and macro-F1 over examples)
  make_eval_fn(run)                the jitted eval step under the run's mesh
  macro_f1(predictions, labels, n) the unweighted mean of per-class F1
  evaluate_trial(workdir, evals)   a finished run's final params under other data (the sweep's
                                   `--evaluate` helper: e.g. a domain model on the general corpus)

`evaluate`, `make_eval_fn` and `macro_f1` are still implemented in lm.loop (being reworked in
parallel); import them from here so callers do not move again when they do.
"""

from __future__ import annotations

import copy
import json
import os

from lm import checkpoint, loop
from lm import config as config_lib
from lm.loop import evaluate, macro_f1, make_eval_fn

EVALS_FILE = 'sweep_evals.json'  # In the run's workdir: {eval name: metrics}.

__all__ = ['evaluate', 'evaluate_trial', 'macro_f1', 'make_eval_fn']


def evaluate_trial(workdir: str, evals: dict[str, dict], is_finetune: bool = False) -> dict:
  """Loss (and accuracy, perplexity) of a run's final params under each set of overrides.

  The run's saved config (its last checkpoint) with each eval's overrides: same seq_len,
  batch size and train.eval_batches, so the batches are those finetune.py's report uses.
  Results are merged into <workdir>/sweep_evals.json.
  """
  workdir = os.path.abspath(workdir)
  cfg = checkpoint.read_config(workdir)
  path = os.path.join(workdir, EVALS_FILE)
  results = _read_results(path)
  params = None
  for name, overrides in evals.items():
    eval_cfg = config_lib.override(copy.deepcopy(cfg), overrides)
    run = loop.build_run(eval_cfg, workdir, is_finetune=is_finetune)
    if params is None:
      params = checkpoint.load_params(workdir, run.abstract_params)
    results[name] = evaluate(run, make_eval_fn(run), params)
    print(f'eval {name}: ' + ', '.join(f'{k} {v:.4f}' for k, v in results[name].items()))
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(results, f, indent=1)
  os.replace(tmp, path)  # Atomic: a killed evaluation leaves the previous results whole.
  return results


def _read_results(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    text = f.read()
  try:
    return json.loads(text)
  except ValueError as e:
    raise checkpoint.CheckpointError(f'{path}: not valid JSON ({e}); delete it to evaluate '
                                     f'again') from None


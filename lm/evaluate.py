"""Evaluation in one place: validation loss / accuracy / perplexity / macro-F1 of a set of params.

  evaluate(run, eval_fn, params)   mean metrics over the first train.eval_batches validation
                                   batches (classification: accuracy and macro-F1 over examples)
  make_eval_fn(run)                the jitted eval step under the run's mesh
  macro_f1(predictions, labels, n) the unweighted mean of per-class F1
  evaluate_trial(workdir, evals)   a finished run's final params under other data (the sweep's
                                   `--evaluate` helper: e.g. a domain model on the general corpus)

lm.loop calls `evaluate` every train.eval_every steps; lm.finetune measures before and after with
it. Both take a run from lm.run, which this module imports (never lm.loop).
"""

from __future__ import annotations

import copy
import os
from typing import Callable

import jax
import ml_collections
import numpy as np

from lm import checkpoint, files, sharding
from lm import config as config_lib
from lm import step as step_lib
from lm.run import Run, build_run, make_iterator

EVALS_FILE = 'sweep_evals.json'  # In the run's workdir: {eval name: metrics}.


def macro_f1(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
  scores = []
  for c in range(num_classes):
    tp = np.sum((predictions == c) & (labels == c))
    fp = np.sum((predictions == c) & (labels != c))
    fn = np.sum((predictions != c) & (labels == c))
    if tp + fp + fn:
      scores.append(2 * tp / (2 * tp + fp + fn))
  return float(np.mean(scores)) if scores else 0.0


def evaluate(run: Run, eval_fn: Callable, params, *, cfg: ml_collections.ConfigDict | None = None,
             task: str | None = None, max_batches: int | None = None) -> dict:
  """Mean loss (and perplexity / accuracy / macro-F1) over the first validation batches."""
  cfg = cfg or run.cfg
  task = task or run.task
  max_batches = max_batches or cfg.train.eval_batches
  iterator = make_iterator(run, 'validation', cfg, task)
  totals = {'nll_sum': 0.0, 'correct': 0.0, 'weight': 0.0}
  predictions, labels = [], []
  for i, batch in enumerate(iterator):
    if i >= max_batches:
      break
    stats = eval_fn(params, sharding.shard_batch(batch, run.mesh, cfg.mesh.rules))
    stats = jax.device_get(stats)
    for key in totals:
      totals[key] += float(stats[key])
    if task == 'classify':
      keep = np.asarray(stats['valid'])  # Padding rows carry no example (global rows).
      predictions.append(np.asarray(stats['predictions'])[keep])
      labels.append(np.asarray(stats['labels'])[keep])
  if hasattr(iterator, 'close'):
    iterator.close()
  weight = max(totals['weight'], 1.0)
  loss = totals['nll_sum'] / weight
  result = {'loss': loss, 'accuracy': totals['correct'] / weight}
  if task == 'classify':
    preds, labs = np.concatenate(predictions), np.concatenate(labels)
    result['accuracy'] = float(np.mean(preds == labs)) if len(labs) else 0.0
    result['macro_f1'] = macro_f1(preds, labs, cfg.model.num_classes)
  else:
    result['perplexity'] = float(np.exp(min(loss, 50.0)))
  return result


def make_eval_fn(run: Run, task: str | None = None) -> Callable:
  eval_step = step_lib.make_eval_step(run.model, task=task or run.task)
  # Replicated results: every process reads the global batch's statistics and predictions.
  jitted = jax.jit(eval_step, out_shardings=jax.sharding.NamedSharding(
      run.mesh, jax.sharding.PartitionSpec()))

  def eval_fn(params, batch):
    with sharding.activate(run.mesh, run.cfg.mesh.rules):
      return jitted(params, batch)

  return eval_fn


def evaluate_trial(workdir: str, evals: dict[str, dict], is_finetune: bool = False) -> dict:
  """Loss (and accuracy, perplexity) of a run's final params under each set of overrides.

  The run's saved config (its last checkpoint) with each eval's overrides: same seq_len,
  batch size and train.eval_batches, so the batches are those finetune.py's report uses.
  Results are merged into <workdir>/sweep_evals.json.
  """
  workdir = os.path.abspath(workdir)
  cfg = checkpoint.read_config(workdir)
  path = os.path.join(workdir, EVALS_FILE)
  results = files.read_json(path, checkpoint.CheckpointError, 'delete it to evaluate again') or {}
  params = None
  for name, overrides in evals.items():
    eval_cfg = config_lib.override(copy.deepcopy(cfg), overrides)
    run = build_run(eval_cfg, workdir, is_finetune=is_finetune)
    if params is None:
      params = checkpoint.load_params(workdir, run.abstract_params)
    results[name] = evaluate(run, make_eval_fn(run), params)
    print(f'eval {name}: ' + ', '.join(f'{k} {v:.4f}' for k, v in results[name].items()))
  files.write_json(path, results)  # Atomic: a killed evaluation leaves the previous results whole.
  return results


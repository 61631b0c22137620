"""Fine-tuning: what is trainable, and what fine-tuning changed.

finetune.py calls `finetune(cfg, workdir)`, which runs the shared loop (lm.loop.train) with
params restored from finetune.restore_from and the frozen / LoRA set from the config, and
measures the model before and after:

  domain loss / perplexity   the fine-tuning data's validation split (task 'lm' and 'sft'):
                             data.validation_paths when set, else the hash split
  general loss / perplexity  the built-in general corpus: how much general ability was kept
  task accuracy, macro-F1    classification (and next-token accuracy for lm/sft)
  probes (lm.probe)          log p(stereotyped) - log p(other) of balanced sentence pairs, with
                             bootstrap 95% CIs before, after, and of the shift

The table is printed and written to <workdir>/finetune_report.{json,md}. With LoRA the
merged model is saved as a plain params checkpoint in <workdir>/merged.
"""

from __future__ import annotations

import collections
import json
from typing import Any

import jax
import ml_collections
import numpy as np

from lm import checkpoint, lora, loop, probe, replay, selection, tasks
from lm import config as config_lib
from lm import model as model_lib
from lm.evaluate import evaluate, make_eval_fn
from lm.run import Run, preflight_workdir

REPORT = 'finetune_report'


def say(text: str) -> None:
  """Process 0 speaks for the run (as lm.metrics does for the progress lines)."""
  if jax.process_index() == 0:
    print(text, flush=True)


# --------------------------------------------------------------------------- parameters


def parameter_table(run: Run) -> str:
  """Trainable vs. frozen parameters (count and bytes) by top-level subtree; stacked (scanned)
  layers are shown per layer, as layers_<i>, like unscanned ones."""
  flat = model_lib.flatten_params(run.abstract_params)
  rows = collections.OrderedDict()
  for path, leaf in flat.items():
    itemsize = np.dtype(leaf.dtype).itemsize
    layers = selection.selected_layers(path, None, leaf.shape)
    trained = selection.selected_layers(path, run.trainable[path], leaf.shape) if (
        path in run.trainable) else []
    if layers is None:  # Not stacked: one row for the whole leaf.
      parts = [(path.split('/')[0], int(np.prod(leaf.shape)), path in run.trainable)]
    else:
      per_layer = int(np.prod(leaf.shape[1:]))
      parts = [(f'{selection.STACKED}_{i}', per_layer, i in trained) for i in layers]
    for top, size, is_trained in parts:
      row = rows.setdefault(top, [0, 0, 0, 0])
      offset = 0 if is_trained else 2
      row[offset] += size
      row[offset + 1] += size * itemsize
  totals = [sum(r[i] for r in rows.values()) for i in range(4)]
  lines = ['| subtree | trainable | trainable MB | frozen | frozen MB |', '|---|---:|---:|---:|---:|']
  for name, (t, tb, f, fb) in list(rows.items()) + [('**total**', totals)]:
    lines.append(f'| {name} | {t:,} | {tb / 2**20:.2f} | {f:,} | {fb / 2**20:.2f} |')
  return '\n'.join(lines)


def optimizer_state_bytes(run: Run) -> int:
  """Bytes of optimizer state (whole model, all devices) for the run's trainable set: frozen
  leaves hold none; a partly trainable stacked leaf holds it for its trainable slices only."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(run.abstract_opt_state)))


# --------------------------------------------------------------------------- measurements


def general_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same run evaluated on the built-in general corpus with the LM loss."""
  general = ml_collections.ConfigDict(cfg.to_dict())
  general.data = replay.general_data(cfg)
  general.finetune.task = 'lm'
  return general


def measure(run: Run, eval_fn, params) -> dict[str, float]:
  """Every 'what changed' number for one set of params."""
  cfg = run.cfg
  out: dict[str, float] = {}
  task_eval = evaluate(run, eval_fn, params)
  if run.task == 'classify':
    out.update(task_loss=task_eval['loss'], task_accuracy=task_eval['accuracy'],
               task_macro_f1=task_eval['macro_f1'])
  else:
    out.update(domain_loss=task_eval['loss'], domain_perplexity=task_eval['perplexity'],
               domain_token_accuracy=task_eval['accuracy'])
  if cfg.finetune.general_eval:
    # The LM eval step serves 'lm' and 'sft' alike; classification needs its own.
    lm_eval_fn = eval_fn if run.task != 'classify' else make_eval_fn(run, task='lm')
    general_eval = evaluate(run, lm_eval_fn, params, cfg=general_config(cfg), task='lm')
    out.update(general_loss=general_eval['loss'], general_perplexity=general_eval['perplexity'])
  return out


def format_report(before: dict, after: dict) -> str:
  lines = ['| metric | before | after | change |', '|---|---:|---:|---:|']
  for key in before:
    b, a = before[key], after.get(key, float('nan'))
    lines.append(f'| {key} | {b:.4f} | {a:.4f} | {a - b:+.4f} |')
  return '\n'.join(lines)


# --------------------------------------------------------------------------- the run


# Model keys that describe how to run, not what was trained: the fine-tuning config decides
# where it sets them; left at their defaults, they are run as the checkpoint was.
RUNTIME_MODEL_KEYS = ('dtype', 'param_dtype', 'scan_layers', 'remat', 'num_classes',
                      'attn_query_chunk', 'attention')


def inherit_architecture(cfg: ml_collections.ConfigDict) -> None:
  """The restored checkpoint's saved config fixes the architecture (and the tokenizer).

  A model key the fine-tuning config sets explicitly (to other than its default) must agree
  with the checkpoint: one ConfigError lists every key that differs. Runtime keys (dtype,
  scan_layers, remat, ...) set explicitly win; left at their defaults they follow the checkpoint.
  """
  try:
    saved = checkpoint.read_config(cfg.finetune.restore_from)
  except checkpoint.CheckpointError:
    return  # No saved config: the fine-tuning config must describe the model itself.
  defaults = config_lib.model_config()
  differing = []
  for key, value in saved.model.items():
    if key in RUNTIME_MODEL_KEYS or key not in cfg.model:
      continue
    given = cfg.model[key]
    if key in defaults and given != defaults[key] and given != value:
      differing.append(f'model.{key}: config {given!r}, checkpoint {value!r}')
  if differing:
    raise config_lib.ConfigError(
        f'finetune.restore_from {cfg.finetune.restore_from}: the config gives an architecture '
        'that differs from the checkpoint\'s (drop these keys to take the checkpoint\'s '
        'values):\n  ' + '\n  '.join(differing))
  for key, value in saved.model.items():
    if key not in cfg.model:
      continue
    if key not in RUNTIME_MODEL_KEYS or (key in defaults and cfg.model[key] == defaults[key]):
      cfg.model[key] = value
  if saved.tokenizer.path and not cfg.tokenizer.path:
    cfg.tokenizer.path = saved.tokenizer.path


def prepare_task_data(cfg: ml_collections.ConfigDict, workdir) -> None:
  """finetune.task_data builds the JSONL from the built-in corpus into the workdir."""
  if not cfg.finetune.task_data:
    return
  path = tasks.build(cfg.finetune.task_data, checkpoint.absolute(workdir) / f'{cfg.finetune.task_data}.jsonl')
  cfg.data.source = 'jsonl'
  cfg.data.paths = (str(path),)


def finetune(cfg: ml_collections.ConfigDict, workdir) -> dict[str, Any]:
  """Fine-tunes per cfg; returns the loop's summary plus the before/after report."""
  if not cfg.finetune.restore_from:
    raise config_lib.ConfigError('config key finetune.restore_from: set the checkpoint to '
                                 'fine-tune (a train.py workdir, a checkpoint dir, or a '
                                 'converted model)')
  workdir = preflight_workdir(workdir)
  checkpoint.resolve(cfg.finetune.restore_from)  # A missing checkpoint fails before anything.
  inherit_architecture(cfg)
  prepare_task_data(cfg, workdir)
  report_path = workdir / f'{REPORT}.json'
  report: dict[str, Any] = json.loads(report_path.read_text()) if report_path.exists() else {}

  def on_start(run, eval_fn, params):
    nonlocal report
    say(parameter_table(run))
    opt_mb = optimizer_state_bytes(run) / 2**20
    say(f'optimizer state: {opt_mb:.2f} MB for {len(run.trainable)} trainable tensors')
    if 'before' not in report:  # A resumed run keeps the numbers measured before step 0.
      report = {'before': measure(run, eval_fn, params), 'optimizer_state_mb': opt_mb,
                'parameters': parameter_table(run)}
      if run.cfg.finetune.probes:  # Per-pair scores: the shift's CI pairs them with 'after'.
        report['probe_scores_before'] = probe.score_run(run, params)
      # Sampling decodes on one host; with several processes the samples are left out here.
      if run.cfg.train.sample_tokens and run.task != 'classify' and jax.process_count() == 1:
        report['samples_before'] = loop.sample_text(run, params, list(run.cfg.train.sample_prompts),
                                                    run.cfg.train.sample_tokens, seed=run.cfg.seed)
        say('samples before fine-tuning:\n  ' + '\n  '.join(
            t.replace('\n', '\n  ') for t in report['samples_before']))
      if jax.process_index() == 0:
        report_path.write_text(json.dumps(report, indent=1))
    return {}

  def on_end(run, eval_fn, params):
    report['after'] = measure(run, eval_fn, params)
    table = format_report(report['before'], report['after'])
    if 'domain_loss' in report['before'] and 'general_loss' in report['before']:
      report['tradeoff'] = replay.tradeoff(report['before'], report['after'], run.cfg.finetune.replay)
      table += '\n\n' + replay.format_tradeoff(report['tradeoff'])
    if run.cfg.finetune.probes:
      report['probes'] = probe.compare(run.cfg.finetune.probes, report['probe_scores_before'],
                                       probe.score_run(run, params), run.cfg.finetune.probe_bootstrap)
      table += '\n\n' + probe.format_table(report['probes'])
    say('what fine-tuning changed:\n' + table)
    if run.cfg.finetune.lora_rank > 0:
      # Merged on the mesh, saved by every process: no host holds the whole model.
      merged = lora.merge_sharded(params, run.cfg.finetune, run.params_shardings)
      merged_dir = checkpoint.save_params(run.workdir / 'merged', merged,
                                          lora.merged_model_config(run.cfg))
      report['merged_checkpoint'] = str(merged_dir)
      say(f'LoRA merged into the base weights: {merged_dir}')
    if jax.process_index() == 0:
      report_path.write_text(json.dumps(report, indent=1))
      (run.workdir / f'{REPORT}.md').write_text(table + '\n')
    return {'report': report}

  return loop.train(cfg, workdir, is_finetune=True, on_start=on_start, on_end=on_end)

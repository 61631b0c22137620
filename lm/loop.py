"""The one training loop: pre-training (train.py) and fine-tuning (finetune.py) both run it.

They differ only in what they restore (nothing / train.init_from, or finetune.restore_from),
which parameters train (finetune.freeze / trainable / LoRA), and the task's loss.

  build mesh -> tokenizer -> model, trainable set, optimizer -> data iterators
  -> state: resume from <workdir>/checkpoints, else warm-start params, else fresh init
  -> for each step: dispatch train_step; read the previous step's metrics (one step stays in
     flight); fetch the next batch while it runs -> eval every k -> checkpoint every n
  -> on SIGTERM/SIGINT: finish the step, save, return normally (exit 0); several processes
     agree on the step to stop at every train.stop_check_every steps
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import jax
import ml_collections
from absl import logging

from lm import checkpoint, data, flops, generate, metrics as metrics_lib, selection, sharding
from lm import step as step_lib
from lm import model as model_lib
from lm.evaluate import evaluate, make_eval_fn
from lm.run import Run, build_run, data_fault, make_iterator, initial_params
from lm.guards import NanGuard, StopSignal, TrainingError  # noqa: F401  (lm.loop.TrainingError: the CLI's name)


# --------------------------------------------------------------------------- samples


def sample_text(run: Run, params, prompts, max_new_tokens: int, seed: int = 0) -> list[str]:
  """A few continuations, to see what the model learned (temperature 0.8, top-k 40)."""
  tok = run.tokenizer
  params = jax.device_get(params)
  generator = generate.Generator(run.cfg.model, params,
                                 run.cfg.finetune if run.is_finetune else None)
  prompt_ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
  outputs, _ = generator.generate(prompt_ids, max_new_tokens,
                                  generate.Sampling(temperature=0.8, top_k=40),
                                  stop_ids=[tok.eos_id], seed=seed, pad_id=tok.pad_id)
  return [p + tok.decode([t for t in out if t != tok.eos_id]) for p, out in zip(prompts, outputs)]


# --------------------------------------------------------------------------- the loop


def _next_batch(run: Run, iterator, step: int):
  """The next global batch, sharded and on its way to the devices (None when exhausted)."""
  try:
    batch = next(iterator)
  except StopIteration:
    return None
  except (data.DataError, OSError) as e:  # Lazily read sources (prepared shards).
    raise data_fault(e, f'training data, step {step + 1}') from e
  return sharding.shard_batch(batch, run.mesh, run.cfg.mesh.rules)


def _cpu_collectives_need_blocking() -> bool:
  """Several CPU devices in one process: wait for each step before dispatching the next.

  XLA:CPU runs fake devices' collectives on a small shared thread pool; two steps in flight
  can each hold threads the other's rendezvous waits for, a deadlock (seen on 2 cores). One
  CPU device, and every GPU/TPU, keeps a step in flight.
  """
  return jax.default_backend() == 'cpu' and jax.local_device_count() > 1


@contextlib.contextmanager
def _commit_saves_on_error(manager):
  """A run that stops on an error (NaN policy, data fault) lets its in-flight save commit."""
  try:
    yield
  except BaseException:
    try:
      checkpoint.wait(manager)
    except checkpoint.CheckpointError as e:  # Report the original error; this one in a line.
      logging.error('%s', e)
    raise


def restore_or_init(run: Run, manager, train_iterator):
  """(state, shardings, resumed_from_step or None)."""
  if manager.latest_step() is None:
    return run.init_state(initial_params(run)), run.state_shardings, None
  # Resuming: restored straight onto the mesh, never initialised first. The newest intact
  # step; a corrupt or truncated newer one is named in a warning and skipped.
  state, latest = checkpoint.restore_latest(manager, run.abstract_state(),
                                            data_iterator=train_iterator)
  return state, run.state_shardings, latest


def train(cfg: ml_collections.ConfigDict, workdir, *, is_finetune: bool = False,
          on_start: Callable | None = None, on_end: Callable | None = None) -> dict:
  """Runs (or resumes) training to cfg.train.steps. Returns a summary dict.

  on_start(run, eval_fn, params) / on_end(run, eval_fn, params) let fine-tuning measure what
  changed; their dicts are merged into the summary.
  """
  run = build_run(cfg, workdir, is_finetune=is_finetune)
  cfg = run.cfg
  total_steps = cfg.train.steps
  tx, schedule = run.tx, run.schedule
  manager = checkpoint.make_manager(checkpoint.checkpoint_dir(run.workdir), keep=cfg.train.keep,
                                    keep_period=cfg.train.keep_period,
                                    async_save=cfg.train.async_checkpoint)
  try:
    train_iterator = make_iterator(run, 'train')
  except (data.DataError, OSError) as e:  # A source file removed or unreadable since the save.
    latest = manager.latest_step()
    raise data_fault(e, f'training data, at start-up (step {latest or 0})') from e
  state, shardings, resumed = restore_or_init(run, manager, train_iterator)
  start_step = int(state.step)
  writer = metrics_lib.MetricsWriter(run.workdir)
  peak_total, peak_source = metrics_lib.total_peak_flops(cfg)
  step_flops = flops.count(
      cfg.model, cfg.data.seq_len,
      {p: x.shape for p, x in model_lib.flatten_params(run.abstract_params).items()},
      run.trainable, run.task)
  progress = metrics_lib.Progress(total_steps, start_step, step_flops['model'], peak_total)
  summary: dict[str, Any] = {'workdir': str(run.workdir), 'resumed_from': resumed}
  progress.print(f'lm: {"fine-tuning" if is_finetune else "pre-training"} {cfg.name} | '
                 f'{model_lib.count_params(state.params):,} params '
                 f'({_count_trainable(run):,} trainable) | '
                 f'mesh {dict(run.mesh.shape)} | vocab {cfg.model.vocab_size} | '
                 f'{"resumed at step " + str(start_step) if resumed is not None else "from step 0"}'
                 f' | peak {peak_total / 1e12:.3f} TFLOP/s ({peak_source})'
                 f' | {step_flops["model"] / 1e6:,.2f} MFLOP/token model, '
                 f'{step_flops["hardware"] / 1e6:,.2f} hardware')
  progress.print(f'data: {train_iterator.data_stats.summary()}')

  eval_fn = make_eval_fn(run)
  if on_start is not None:
    summary.update(on_start(run, eval_fn, state.params) or {})
  if cfg.train.eval_every and start_step == 0:  # Where the run starts, to compare the end with.
    try:
      summary['eval_start'] = evaluate(run, eval_fn, state.params)
    except OSError as e:
      raise data_fault(e, 'evaluation data, step 0') from e
    writer.write(0, summary['eval_start'], prefix='eval/')
    progress.print('eval step 0: ' + ', '.join(f'{k} {v:.4f}' for k, v in summary['eval_start'].items()))
  stop = StopSignal(check_every=cfg.train.stop_check_every)
  nan_guard = NanGuard(cfg, manager, run.workdir)
  last_eval: dict = {}
  step = start_step
  # One step stays in flight: step n+1 is dispatched before step n's metrics are read, and the
  # next batch is fetched and transferred while a step runs. Host decisions (checkpoint, eval,
  # stop) need no device value, so they are made when a step is dispatched; the NaN policy reads
  # the loss, so it acts one step late (a non-finite step is skipped on device regardless).
  blocking = cfg.train.blocking_loop
  wait_each_step = blocking or _cpu_collectives_need_blocking()
  compiled = None
  pending = None  # (step, metrics on device) dispatched but not yet read.
  next_batch = None
  with stop, _commit_saves_on_error(manager):
    while step < total_steps:
      batch = next_batch if next_batch is not None else _next_batch(run, train_iterator, step)
      next_batch = None
      if batch is None:
        progress.print(f'data exhausted after step {step} (data.num_epochs={cfg.data.num_epochs})')
        break
      if compiled is None:
        compiled = step_lib.jit_train_step(
            step_lib.make_train_step(run.model, tx, schedule, run.trainable, task=run.task,
                                     z_loss=cfg.train.z_loss, grad_accum=cfg.optim.grad_accum,
                                     nan_steps=tuple(cfg.train.debug_nan_steps)),
            shardings, jax.tree.map(lambda x: x.sharding, batch))
      with sharding.activate(run.mesh, cfg.mesh.rules):
        state, step_metrics = compiled(state, batch)
      step += 1
      if wait_each_step:
        jax.block_until_ready(step_metrics)
      if pending is not None:  # The previous step is done (or nearly): read it now.
        nan_guard.record(*pending, progress, writer)
      pending = (step, step_metrics)
      if blocking:  # The old loop (train.blocking_loop): read each step as soon as it is done.
        nan_guard.record(*pending, progress, writer)
        pending = None
      stop_now = stop.should_stop(step)
      evaluate_now = bool(cfg.train.eval_every) and (
          step % cfg.train.eval_every == 0 or step == total_steps)
      save_now = step % cfg.train.checkpoint_every == 0 or step == total_steps or stop_now
      if not (stop_now or evaluate_now or save_now):
        # The iterator's position is saved with a checkpoint: take the next batch only after it.
        if not blocking:
          next_batch = _next_batch(run, train_iterator, step)
        continue
      if pending is not None:
        nan_guard.record(*pending, progress, writer)
        pending = None
      if evaluate_now:
        try:
          last_eval = evaluate(run, eval_fn, state.params)
        except (data.DataError, OSError) as e:  # Validation data is re-read from its files.
          # The step itself is good: keep it, so a run resumed after the fix loses nothing.
          checkpoint.save(manager, step, state, data_iterator=train_iterator, cfg=cfg, force=True)
          raise data_fault(e, f'evaluation data, step {step} (checkpoint step {step} saved; '
                              f'fix the file and run again to resume)') from e
        writer.write(step, last_eval, prefix='eval/')
        progress.print(f'eval step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in last_eval.items()))
      if save_now:
        checkpoint.save(manager, step, state, data_iterator=train_iterator, cfg=cfg, force=True)
      if stop_now:
        progress.print(f'stopping at step {step} on request; checkpoint saved')
        summary['preempted'] = True
        break
    if pending is not None:
      nan_guard.record(*pending, progress, writer)
  checkpoint.wait(manager)
  summary.update(step=step, skipped_steps=nan_guard.skipped_total, eval=last_eval,
                 checkpoint=str(checkpoint.checkpoint_dir(run.workdir) / str(manager.latest_step())))
  if step >= total_steps and not summary.get('preempted'):
    if on_end is not None:
      summary.update(on_end(run, eval_fn, state.params) or {})
    sample_params = state.params
    if cfg.train.sample_tokens and run.task != 'classify' and jax.process_count() > 1:
      from jax.experimental import multihost_utils  # Every process takes part in the gather.
      sample_params = multihost_utils.process_allgather(state.params, tiled=True)
    if cfg.train.sample_tokens and jax.process_index() == 0 and run.task != 'classify':
      summary['samples'] = sample_text(run, sample_params, list(cfg.train.sample_prompts),
                                       cfg.train.sample_tokens, seed=cfg.seed)
      progress.print('samples:')
      for text in summary['samples']:
        progress.print('  ' + text.replace('\n', '\n  '))
  progress.print(f"checkpoint: {summary['checkpoint']}")
  writer.close()
  manager.close()
  if hasattr(train_iterator, 'close'):
    train_iterator.close()
  return summary


def _count_trainable(run: Run) -> int:
  flat = model_lib.flatten_params(run.abstract_params)
  return sum(selection.selected_size(p, i, flat[p].shape) for p, i in run.trainable.items())

"""What stops a run: a SIGTERM that every process agrees on, and the non-finite-step policy.

The loop (lm/loop.py) keeps one step in flight, so both act on host-side knowledge: the stop
flag at the step being dispatched, a step's loss one step after it was dispatched.
"""

from __future__ import annotations

import signal

import jax
import numpy as np
from absl import logging

from lm import checkpoint
from lm.errors import UserError


class TrainingError(UserError, RuntimeError):
  """The run cannot go on (non-finite loss under the 'stop' policy, too many skipped steps)."""


class StopSignal:
  """Turns SIGTERM/SIGINT into a stop after a step (then save and exit 0).

  One process stops at the step after the signal. Several processes must stop at the same
  step: they agree every `check_every` steps (an allgather of the flag, which waits for the
  devices, so not every step), or sooner at JAX's preemption sync point (a local check).
  """

  def __init__(self, check_every: int = 1):
    self.requested = False
    self.check_every = max(1, check_every)
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread (e.g. under some test runners).
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning('signal %d: stopping at the next agreed step and saving a checkpoint', signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    try:
      if multihost_utils.reached_preemption_sync_point(step):
        return True
    except (RuntimeError, ValueError) as e:  # No preemption service in this job.
      logging.log_first_n(logging.INFO, 'no preemption sync point: %s', 1, e)
    if step % self.check_every:
      return False
    local = np.array([self.requested], np.int32)
    return bool(np.max(multihost_utils.process_allgather(local)))


class NanGuard:
  """Reads a finished step's metrics: counts non-finite (skipped) steps, applies
  train.nan_policy, and writes the step's record on log steps (and on the step that stops).

  The loop reads step n after dispatching n+1, so a stop for NaN comes one step late: step
  n+1 has run (its update skipped on device too, or applied if finite) but is never saved
  or recorded; the last good checkpoint is what a rerun resumes from.
  """

  def __init__(self, cfg, manager, workdir):
    self.cfg, self.manager, self.workdir = cfg, manager, workdir
    self.consecutive, self.skipped_total = 0, 0

  def record(self, step: int, step_metrics, progress, writer) -> None:
    cfg = self.cfg
    step_metrics = jax.device_get(step_metrics)
    progress.add_tokens(int(step_metrics['tokens']))
    stop_error = None
    if step_metrics['skipped']:
      self.consecutive += 1
      self.skipped_total += 1
      message = (f"non-finite loss or gradient at step {step} (loss {step_metrics['loss']}, "
                 f"grad_norm {step_metrics['grad_norm']}; params and optimizer state unchanged)")
      latest = self.manager.latest_step()
      kept = (f'the last good checkpoint (step {latest}) is kept in '
              f'{checkpoint.checkpoint_dir(self.workdir)}' if latest is not None
              else 'no checkpoint was saved before it')
      logging.warning(message)
      if cfg.train.nan_policy == 'stop':
        stop_error = TrainingError(f'{message}; train.nan_policy=stop: {kept}')
      elif self.consecutive >= cfg.train.max_consecutive_nan:
        stop_error = TrainingError(
            f'{self.consecutive} consecutive non-finite steps (up to step {step}; '
            f'train.max_consecutive_nan={cfg.train.max_consecutive_nan}); {kept}')
    else:
      self.consecutive = 0
    step_metrics['skipped_total'] = self.skipped_total
    if step % cfg.train.log_every == 0 or step == cfg.train.steps or stop_error:
      step_metrics.update(progress.throughput(step))
      writer.write(step, step_metrics, prefix='train/')
      progress.print(progress.line(step, step_metrics))
    if stop_error:  # Raised after the step's metrics are written: the record shows it.
      raise stop_error

"""Runs a sweep's trials as subprocesses, stage by stage, and collects the finished ones."""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time

from lm.config import ConfigError
from lm.files import write_json
from lm.sweep.report import fmt, fmt_seconds, is_number
from lm.sweep.spec import ROOT, Sweep
from lm.sweep.state import (DONE, LOG, TRIAL_FILE, all_sources, collect, evaluated, metric_value,
                            read_json, stage_metrics, status, trained)
from lm.sweep.trials import Trial



def _die_with_parent():
  """Linux: a trial gets SIGTERM (save and stop) if the sweep process is killed outright."""
  try:
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
    write_json(path, {**(read_json(path) or {}), 'pid': self.proc.pid})
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
    write_json(os.path.join(trial.workdir, DONE), record)
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
             f'{fmt_seconds(time.time() - start)}')
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
    saved = read_json(os.path.join(trial.workdir, TRIAL_FILE)) or {}
    if _alive(saved.get('pid'), trial.workdir):
      # A sweep killed outright (SIGKILL): its trial got SIGTERM and may still be saving.
      self.say(f'[{trial.name}] waiting for the previous run (pid {saved["pid"]}) to exit')
      while _alive(saved.get('pid'), trial.workdir):
        time.sleep(0.5)
    write_json(os.path.join(trial.workdir, TRIAL_FILE),
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
    saved = read_json(os.path.join(trial.workdir, TRIAL_FILE)) or {}
    saved.setdefault('runs', []).append({'started': r.started, 'wall_s': wall, 'rc': r.rc,
                                         'outcome': outcome})
    write_json(os.path.join(trial.workdir, TRIAL_FILE), saved)
    if finished:
      total = sum(run['wall_s'] for run in saved['runs'])
      record = self.finish(trial, total)
      shown = ', '.join(f'{k} {fmt(metric_value(record, s))}'
                        for k, s in stage_metrics(self.sweep, trial.stage).items()
                        if is_number(metric_value(record, s)))
      self.say(f'[{trial.name}] done in {fmt_seconds(wall)}: {shown}')
    elif self.stop_requested:
      self.say(f'[{trial.name}] stopped after {fmt_seconds(wall)} (resumes on the next run)')
    else:
      why = (f'exit code {r.rc}' if r.rc else
             f'exited 0 without a checkpoint at step {trial.steps}')
      self.failed.append(trial.name)
      self.say(f'[{trial.name}] FAILED ({why}); last lines of its log:\n{log_tail(trial)}')


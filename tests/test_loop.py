"""The loop keeps one step in flight (lm/loop.py): same losses as the blocking loop, bitwise
exact resume after SIGTERM, and several processes agreeing on the step to stop at.

One CPU device per process keeps a step in flight for real (several fake CPU devices in one
process wait for each step: their collectives can deadlock otherwise, see loop.py).
"""

import os
import signal
import subprocess
import sys

import pytest

from lm import data
from helpers import (ROOT, TINY_OVERRIDES, assert_same_params, cli_args, losses, sigterm_at_step,
                     subprocess_env, tiny_config)

OVERRIDES = {**TINY_OVERRIDES, 'mesh.data': 1, 'train.steps': 16, 'train.checkpoint_every': 6,
             'train.eval_every': 8}


def command(workdir, **overrides):
  return ([sys.executable, os.path.join(ROOT, 'train.py'), f'--workdir={workdir}',
           '--config=' + os.path.join(ROOT, 'configs/tiny.py'), '--config.name=loop_test']
          + cli_args({**OVERRIDES, **overrides}))


def env(devices=1):
  return subprocess_env(devices)


def train(workdir, **overrides):
  result = subprocess.run(command(workdir, **overrides), capture_output=True, text=True,
                          env=env(), cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  return result


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp('loop')
  train(base / 'in_flight')
  train(base / 'blocking', **{'train.blocking_loop': True})
  return base


def test_in_flight_loop_gives_the_blocking_loops_losses(runs):
  base = runs
  in_flight, blocking = losses(base / 'in_flight'), losses(base / 'blocking')
  assert sorted(in_flight) == list(range(1, 17))
  assert in_flight == blocking  # Bitwise: the same steps on the same batches.
  assert_same_params(base / 'in_flight', base / 'blocking')


def test_sigterm_mid_flight_then_resume_is_bitwise_exact(runs, tmp_path):
  base = runs
  workdir = tmp_path / 'interrupted'
  output = sigterm_at_step(command(workdir), 3, env())
  stopped_at = max(losses(workdir))
  assert 'stopping at step' in output and 3 <= stopped_at < 16
  assert os.path.isdir(workdir / 'checkpoints' / str(stopped_at))
  resumed = train(workdir)
  assert f'resumed at step {stopped_at}' in resumed.stdout, resumed.stdout
  assert losses(workdir) == losses(base / 'in_flight')
  assert_same_params(workdir, base / 'in_flight')


def test_processes_agree_on_the_stop_step_when_one_gets_sigterm(tmp_path):
  """SIGTERM to process 1 only: both stop at the next multiple of train.stop_check_every,
  save that step together and exit 0."""
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  workdir = tmp_path / 'two'
  workdir.mkdir()  # With the tokenizer already trained: the processes must not both train it.
  data.load_or_train_tokenizer(tiny_config(**OVERRIDES), workdir)
  overrides = {'train.steps': 40, 'train.stop_check_every': 4, 'train.checkpoint_every': 100,
               'train.eval_every': 0, 'mesh.data': -1, 'mesh.fsdp': 1, 'data.shard_count': 2}
  cmd = command(workdir, **overrides) + [f'--coordinator=127.0.0.1:{port}', '--num_processes=2']
  log1 = open(tmp_path / 'process1.log', 'w')
  p1 = subprocess.Popen(cmd + ['--process_id=1'], stdout=log1, stderr=subprocess.STDOUT,
                        text=True, env=env(devices=4), cwd=ROOT)
  p0 = subprocess.Popen(cmd + ['--process_id=0'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, env=env(devices=4), cwd=ROOT)
  output = []
  try:
    for line in p0.stdout:
      output.append(line)
      if line.startswith('step') and line.split()[1].startswith('5/'):
        p1.send_signal(signal.SIGTERM)
    assert p0.wait(timeout=300) == 0, ''.join(output)
    assert p1.wait(timeout=60) == 0, (tmp_path / 'process1.log').read_text()
  finally:
    for p in (p0, p1):
      if p.poll() is None:
        p.kill()
  text = ''.join(output)
  stopped = [int(l.split()[3].rstrip(';')) for l in text.splitlines() if l.startswith('stopping at step')]
  assert len(stopped) == 1 and stopped[0] % 4 == 0 and 8 <= stopped[0] < 40, text
  assert os.path.isdir(workdir / 'checkpoints' / str(stopped[0]))
  assert max(losses(workdir)) == stopped[0]

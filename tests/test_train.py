"""train.py end to end: exact resume after SIGTERM, mesh change, warm start, configs, errors."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest

from lm import checkpoint, config, evaluate, loop
from lm.run import build_run
from helpers import (ROOT, TINY_OVERRIDES, assert_same_params, cli_args, load_config_file, losses,
                     sigterm_at_step, subprocess_env, tiny_config)


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  """20 steps without interruption, in-process."""
  workdir = tmp_path_factory.mktemp('straight')
  summary = loop.train(tiny_config(), workdir)
  return workdir, summary


# Covered in the default run by test_loop.py::test_sigterm_mid_flight_then_resume_is_bitwise_exact
# (SIGTERM, save, resume: the same losses and bitwise params, on one device, in-flight loop), by
# test_loop.py's two-process SIGTERM test (sharded state, 8 devices, saved at the agreed step) and
# by test_multihost.py's restores of sharded checkpoints. This one adds 8 devices in one process.
@pytest.mark.slow
def test_sigterm_then_resume_reproduces_the_uninterrupted_run(straight_run, tmp_path):
  straight_dir, _ = straight_run
  workdir = tmp_path / 'interrupted'
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'), f'--workdir={workdir}',
         '--config=' + os.path.join(ROOT, 'configs/tiny.py'), '--config.name=tiny_test']
  cmd += cli_args(TINY_OVERRIDES)
  text = sigterm_at_step(cmd, 10, subprocess_env())
  assert 'stopping at step' in text, text
  stopped_at = max(losses(workdir))
  assert 10 <= stopped_at < 20
  assert os.path.isdir(workdir / 'checkpoints' / str(stopped_at))

  resumed = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert f'resumed at step {stopped_at}' in resumed.stdout
  assert losses(workdir) == losses(straight_dir)
  assert_same_params(workdir, straight_dir)


# Covered in the default run by test_multihost.py::test_restore_onto_a_2x2x2_mesh_continues_with_
# the_same_losses (a (8,1,1) checkpoint restored on (2,2,2): 5 steps with the uninterrupted run's
# losses), which also checks what this one does not: the optimizer state and the data position.
@pytest.mark.slow
def test_checkpoint_restores_on_another_mesh_with_the_same_loss(straight_run, tmp_path):
  straight_dir, summary = straight_run
  # Continue the (8,1,1) run on a (2,2,2) mesh for one more step: same loss as on (8,1,1).
  results = {}
  for dims in ((8, 1, 1), (2, 2, 2)):
    workdir = tmp_path / f'mesh_{dims[0]}{dims[1]}{dims[2]}'
    os.makedirs(workdir / 'checkpoints')
    os.symlink(straight_dir / 'checkpoints' / '20', workdir / 'checkpoints' / '20')
    os.symlink(straight_dir / 'tokenizer.model', workdir / 'tokenizer.model')
    cfg = tiny_config(**{'train.steps': 21, 'mesh.data': dims[0], 'mesh.fsdp': dims[1],
                         'mesh.tensor': dims[2]})
    cfg.train.checkpoint_every = 1000
    run_summary = loop.train(cfg, workdir)
    assert run_summary['resumed_from'] == 20
    results[dims] = losses(workdir)[21]
  np.testing.assert_allclose(results[(2, 2, 2)], results[(8, 1, 1)], rtol=1e-5)


def test_warm_start_gives_the_source_runs_eval_loss_at_step_zero(straight_run, tmp_path):
  straight_dir, _ = straight_run
  source = tiny_config()
  run = build_run(source, straight_dir, is_finetune=False)
  params = checkpoint.load_params(straight_dir, run.abstract_params)
  source_eval = evaluate.evaluate(run, evaluate.make_eval_fn(run), params)

  cfg = tiny_config(**{'train.steps': 1, 'train.eval_every': 1})
  cfg.train.init_from = str(straight_dir)
  captured = {}

  def at_start(new_run, eval_fn, start_params):
    captured.update(evaluate.evaluate(new_run, eval_fn, start_params))

  loop.train(cfg, tmp_path / 'warm', on_start=at_start)
  np.testing.assert_allclose(captured['loss'], source_eval['loss'], rtol=1e-6)


def test_tiny_model_learns(straight_run):
  _, summary = straight_run
  run_losses = [v for _, v in sorted(summary_losses(summary).items())]
  assert run_losses[-1] < run_losses[0] - 0.5, run_losses


def summary_losses(summary):
  return losses(summary['workdir'])


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                                    + glob.glob(os.path.join(ROOT, 'configs', '*', '*.py'))))
def test_every_shipped_config_loads_and_validates(path, tmp_path):
  if os.sep + 'sweeps' + os.sep in path:  # A sweep: every trial's config must validate.
    from lm import sweep
    assert sweep.make_trials(sweep.load_sweep(path), str(tmp_path))
    return
  config.validate(load_config_file(path))


def run_train_cli(*args, timeout=120):
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'), *args]
  return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT,
                        timeout=timeout)


@pytest.mark.parametrize('args, message', [
    (['--config.model.d_modle=64'], "unknown config key 'model.d_modle' (did you mean 'd_model'?)"),
    (['--config.trian.steps=3'], "unknown config key 'trian' (did you mean 'train'?)"),
    (['--config=configs/nope.py'], "no such config file 'configs/nope.py'"),
    (['--config.model.n_heads=3'], 'config key model.n_heads'),
    (['--config.mesh.data=3'], 'config key mesh'),
    (['--config.optim.schedule=cosin'], 'config key optim.schedule'),
])
def test_bad_config_is_one_clear_line_before_compilation(args, message, tmp_path):
  result = run_train_cli(f'--workdir={tmp_path}', *args)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_unwritable_workdir_fails_before_compilation(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  result = run_train_cli(f'--workdir={blocker}/run')
  assert result.returncode == 2
  assert 'is not writable' in result.stderr and 'Traceback' not in result.stderr

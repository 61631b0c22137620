"""lm.sweep: expansion, key checks before anything runs, a 2x2 sweep end to end, kill + resume."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lm import sweep as sweep_lib
from lm.sweep.__main__ import main as sweep_main
from lm.config import ConfigError
from lm.errors import UserError
from lm.sweep import Stage, Sweep
from helpers import TINY_OVERRIDES, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# helpers.TINY_OVERRIDES on one device, without model.d_model (the grid sweeps it). Its
# checkpoint_every (100) is past the end of these runs: they save on the way out only.
TINY = {**{k: v for k, v in TINY_OVERRIDES.items() if k != 'model.d_model'}, 'mesh.data': 1}
# Long enough to stop the second trial part-way: ~2 s at ~60 ms a step (one device, the suite's
# XLA flags).
STEPS = 30


def stage(**kw):
  return Stage(**{'name': 'main', 'script': 'train.py', 'config': 'configs/tiny.py', **kw})


# --------------------------------------------------------------------------- expansion


def test_grid_zip_and_random_expand_to_the_expected_override_sets():
  grid = sweep_lib.expand(stage(grid={'optim.lr': [1e-3, 3e-3], 'model.d_model': [64, 128]}))
  assert [o for _, o in grid] == [
      {'optim.lr': 1e-3, 'model.d_model': 64}, {'optim.lr': 1e-3, 'model.d_model': 128},
      {'optim.lr': 3e-3, 'model.d_model': 64}, {'optim.lr': 3e-3, 'model.d_model': 128}]

  zipped = sweep_lib.expand(stage(zip={'model.d_model': [64, 128, 256],
                                       'model.mlp_dim': [128, 256, 512]}))
  assert [o for _, o in zipped] == [{'model.d_model': d, 'model.mlp_dim': 2 * d}
                                    for d in (64, 128, 256)]
  both = sweep_lib.expand(stage(grid={'optim.lr': [1e-3, 3e-3]},
                                zip={'model.d_model': [64, 128], 'model.mlp_dim': [128, 256]}))
  assert len(both) == 4 and both[1][1] == {'optim.lr': 1e-3, 'model.d_model': 128,
                                           'model.mlp_dim': 256}
  with pytest.raises(ConfigError, match='equal lengths'):
    sweep_lib.expand(stage(zip={'model.d_model': [64, 128], 'model.mlp_dim': [128]}))

  def draws(n, seed=0):
    return sweep_lib.expand(stage(random={'optim.lr': sweep_lib.log_uniform(1e-4, 1e-2),
                                          'optim.warmup_steps': sweep_lib.randint(0, 9),
                                          'model.mlp_activation': sweep_lib.choice(['silu', 'gelu'])},
                                  samples=n, seed=seed))
  five = draws(5)
  assert draws(5) == five  # Seeded.
  assert draws(3) == five[:3]  # More samples keep the first ones.
  assert draws(5, seed=1) != five
  for values, overrides in five:
    assert 1e-4 <= overrides['optim.lr'] <= 1e-2 and 0 <= overrides['optim.warmup_steps'] <= 9
    assert overrides['model.mlp_activation'] in ('silu', 'gelu')
    assert values == {'sample': values['sample'], **overrides}
  assert [v['sample'] for v, _ in five] == list(range(5))

  # Named bundles: a label on the axis, several keys (and reserved keys) per value.
  bundles = sweep_lib.expand(stage(grid={'recipe': {'a': {'optim.lr': 1.0, 'script': 'finetune.py'},
                                                    'b': {'optim.lr': 2.0}},
                                         'data.train_fraction': [0.5, 1.0]}))
  assert [(v['recipe'], v['data.train_fraction']) for v, _ in bundles] == [
      ('a', 0.5), ('a', 1.0), ('b', 0.5), ('b', 1.0)]
  assert bundles[0][1] == {'optim.lr': 1.0, 'script': 'finetune.py', 'data.train_fraction': 0.5}


def test_trials_carry_stage_overrides_placeholders_and_commands(tmp_path):
  sweep = Sweep(name='s', stages=[
      stage(name='pre', overrides={'train.steps': 5}),
      Stage(name='ft', script='finetune.py', config='configs/finetune_domain.py',
            overrides={'finetune.restore_from': '{sweep}/pre', 'train.steps': 3},
            grid={'recipe': {'scratch': {'script': 'train.py', 'config': 'configs/tiny.py',
                                         'evals': {'general': {'data.builtin_subset': 'general'}}},
                             'lora': {'finetune.lora_rank': 4,
                                      'finetune.freeze': ('embed/.*', 'layers_0/.*')}},
                  'data.train_fraction': [0.1, 1.0]})])
  trials = sweep_lib.make_trials(sweep, str(tmp_path), {'train.log_every': 7})
  assert [t.name for t in trials] == [
      'pre', 'ft/recipe=scratch,train_fraction=0.1', 'ft/recipe=scratch,train_fraction=1',
      'ft/recipe=lora,train_fraction=0.1', 'ft/recipe=lora,train_fraction=1']
  pre, scratch, _, lora, _ = trials
  assert pre.workdir == str(tmp_path / 'pre') and pre.steps == 5 and scratch.steps == 3
  assert scratch.script == 'train.py' and scratch.config == 'configs/tiny.py'
  assert lora.script == 'finetune.py' and lora.cfg.finetune.lora_rank == 4
  assert lora.overrides['finetune.restore_from'] == str(tmp_path / 'pre')
  assert lora.cfg.train.log_every == 7 and lora.cfg.data.train_fraction == 0.1
  assert scratch.evals == {'general': {'data.builtin_subset': 'general'}} and not lora.evals
  command = lora.shell_command()
  assert command.startswith('python finetune.py --config=configs/finetune_domain.py ')
  assert "'--config.finetune.freeze=('\"'\"'embed/.*'\"'\"', " in command  # shlex-quoted tuple.
  assert command.endswith(f"--workdir={tmp_path}/ft/recipe=lora,train_fraction=0.1")
  assert '&& python -m lm.sweep --evaluate=' in scratch.shell_command()


@pytest.mark.parametrize('where, expected', [
    (dict(grid={'optim.lrr': [1e-3, 3e-3]}), "unknown config key 'optim.lrr' (did you mean 'lr'?)"),
    (dict(overrides={'trian.steps': 3}), "unknown config key 'trian'"),
    (dict(grid={'recipe': {'x': {'finetune.lora_rnak': 4}}}), "'finetune.lora_rnak'"),
    (dict(evals={'general': {'data.subset': 'general'}}), "'data.subset'"),
    (dict(grid={'recipe': {'x': {'evals': {'g': {'data.subst': 1}}}}}), "'data.subst'"),
    (dict(overrides={'train.steps': 'ten'}), 'config key train.steps'),
    (dict(grid={'train.steps': [5, 0]}), 'config key train.steps: must be > 0'),
])
def test_a_bad_key_or_value_fails_before_any_trial_runs_naming_the_key(tmp_path, where, expected):
  sweep = Sweep(name='bad', stages=[stage(name='first'), stage(name='second', **where)])
  with pytest.raises(ConfigError) as error:
    sweep_lib.make_trials(sweep, str(tmp_path / 'sweep'))
  assert expected in str(error.value) and "stage 'second'" in str(error.value)
  assert not (tmp_path / 'sweep').exists()


def test_corrupt_trial_state_is_one_error_naming_the_file_not_a_missing_record(tmp_path):
  trial, = sweep_lib.make_trials(Sweep(name='s', stages=[stage(overrides={'train.steps': 5})]),
                                 str(tmp_path))
  assert sweep_lib.status(trial) == 'pending'  # No state file: no record.
  os.makedirs(trial.workdir)
  path = os.path.join(trial.workdir, 'sweep_trial.json')
  with open(path, 'w') as f:
    f.write('{"runs": [{"outcome": "fai')  # Cut short, e.g. by a full disk.
  with pytest.raises(sweep_lib.SweepStateError, match=f'{path}: not valid JSON'):
    sweep_lib.status(trial)
  assert issubclass(sweep_lib.SweepStateError, UserError)


def write_sweep_file(path, **stage_kw):
  path.write_text(f'''
from lm.sweep import Stage, Sweep, Table

def get_sweep():
  return Sweep(name='lr_width', stages=[Stage(
      name='main', script='train.py', config='configs/tiny.py',
      overrides={{**{TINY!r}, 'train.steps': {STEPS}}},
      grid={{'optim.lr': [1e-3, 3e-3], 'model.d_model': [32, 64]}}, **{stage_kw!r})],
      metrics={{'train_loss': 'final.train/loss'}},
      tables=[Table(rows='model.d_model', cols='optim.lr', value='train_loss')])
''')
  return str(path)


def test_cli_bad_key_exits_2_naming_it_and_runs_nothing(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('from lm.sweep import Stage, Sweep\n'
                 'def get_sweep():\n'
                 "  return Sweep(name='b', stages=[Stage(name='s', grid={'optim.lrr': [1, 2]})])\n")
  proc = subprocess.run([sys.executable, '-m', 'lm.sweep', f'--sweep={bad}',
                         f'--workdir={tmp_path / "w"}'], capture_output=True, text=True, cwd=ROOT,
                        timeout=60)
  assert proc.returncode == 2, proc.stderr
  assert "unknown config key 'optim.lrr'" in proc.stderr and 'Traceback' not in proc.stderr
  assert not (tmp_path / 'w').exists()


def test_print_commands_prints_one_train_command_per_trial(tmp_path, capsys):
  path = write_sweep_file(tmp_path / 'sweep.py')
  assert sweep_main([f'--sweep={path}', f'--workdir={tmp_path / "w"}', '--print-commands',
                         '--config.train.log_every=5']) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 4 and all(l.startswith('python train.py --config=configs/tiny.py ') for l in lines)
  assert lines[1].endswith(f'--workdir={tmp_path}/w/main/lr=0.001,d_model=64')
  assert all('--config.train.log_every=5' in l and f'--config.train.steps={STEPS}' in l for l in lines)
  assert not (tmp_path / 'w').exists()


# --------------------------------------------------------------------------- end to end


def sweep_env():
  return subprocess_env(None)  # One CPU device per trial: the fastest for a tiny model.


def metric_steps(workdir, key='train/loss'):
  steps = []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if key in record:
        steps.append((record['step'], record[key]))
  return steps


def test_2x2_sweep_stopped_midway_then_rerun_finishes_only_what_was_left(tmp_path):
  path = write_sweep_file(tmp_path / 'sweep.py')
  workdir = tmp_path / 'w'
  names = ['lr=0.001,d_model=32', 'lr=0.001,d_model=64', 'lr=0.003,d_model=32',
           'lr=0.003,d_model=64']
  dirs = [workdir / 'main' / n for n in names]
  command = [sys.executable, '-m', 'lm.sweep', f'--sweep={path}', f'--workdir={workdir}']

  # First run: stop it (as Ctrl-C / a scheduler would) once the second trial is part-way.
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=sweep_env(), cwd=ROOT)
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if (dirs[0] / 'done.json').exists() and (dirs[1] / 'metrics.jsonl').exists() and \
        len(metric_steps(dirs[1])) >= 2:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  first_out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 1, first_out
  assert 'stopped' in first_out
  assert (dirs[0] / 'done.json').exists() and not (dirs[1] / 'done.json').exists(), first_out
  stopped_at = max(s for s, _ in metric_steps(dirs[1]))
  assert 2 <= stopped_at < STEPS
  assert os.path.isdir(dirs[1] / 'checkpoints' / str(stopped_at))  # Saved on the way out.
  assert not dirs[2].exists() and not dirs[3].exists()
  done_mtime = os.path.getmtime(dirs[0] / 'done.json')

  # Second run: skips the finished trial, resumes the stopped one, runs the other two.
  rerun = subprocess.run(command + ['--parallel=3'], capture_output=True, text=True,
                         env=sweep_env(), cwd=ROOT, timeout=240)
  out = rerun.stdout + rerun.stderr
  assert rerun.returncode == 0, out
  assert f'[main/{names[0]}] done (skipped)' in out
  assert f'[main/{names[1]}] resuming' in out
  assert os.path.getmtime(dirs[0] / 'done.json') == done_mtime
  assert (dirs[0] / 'log.txt').read_text().count('\n$ ') == 1  # Trial 1 ran once.
  log1 = (dirs[1] / 'log.txt').read_text()
  assert log1.count('\n$ ') == 2 and f'resumed at step {stopped_at}' in log1
  for d in dirs:  # Every step trained exactly once.
    assert [s for s, _ in metric_steps(d)] == list(range(1, STEPS + 1)), d

  # results.csv: one row per trial with the swept values and the last logged loss.
  with open(workdir / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['trial'] for r in rows] == [f'main/{n}' for n in names]
  assert [(float(r['optim.lr']), int(r['model.d_model'])) for r in rows] == [
      (1e-3, 32), (1e-3, 64), (3e-3, 32), (3e-3, 64)]
  for row, d in zip(rows, dirs):
    assert row['status'] == 'done' and float(row['wall_s']) > 0
    assert float(row['train_loss']) == pytest.approx(metric_steps(d)[-1][1])
  loss = {(float(r['optim.lr']), int(r['model.d_model'])): float(r['train_loss']) for r in rows}

  # results.md: the pivot table (d_model rows x lr columns) and the table of all trials.
  md = (workdir / 'results.md').read_text()
  assert '4/4 trials done' in md
  assert '| model.d_model \\ optim.lr | 0.001 | 0.003 |' in md
  for d_model in (32, 64):
    assert f'| {d_model} | {loss[(1e-3, d_model)]:.4f} | {loss[(3e-3, d_model)]:.4f} |' in md
  assert md.count('| main/lr=') == 4

  # Plots: the PNGs are real images, and plots.json holds exactly what they draw.
  import matplotlib.image
  plots = json.loads((workdir / 'plots.json').read_text())
  for name in ('loss_curves.png', 'train_loss_vs_optim.lr.png', 'train_loss_vs_model.d_model.png'):
    image = matplotlib.image.imread(workdir / name)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300, name
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 10, name  # Not blank.
    assert f'![{name}]({name})' in md
  curves = plots['loss_curves.png']
  assert sorted(curves) == sorted(f'main/{n}' for n in names)
  for n, d in zip(names, dirs):
    assert curves[f'main/{n}']['train/loss']['steps'] == list(range(1, STEPS + 1))
    assert curves[f'main/{n}']['train/loss']['values'] == [v for _, v in metric_steps(d)]
  by_lr = plots['train_loss_vs_optim.lr.png']['train_loss']
  assert sorted(by_lr) == ['model.d_model=32', 'model.d_model=64']
  for d_model in (32, 64):
    line = by_lr[f'model.d_model={d_model}']
    assert line['x'] == [1e-3, 3e-3]
    assert line['y'] == pytest.approx([loss[(1e-3, d_model)], loss[(3e-3, d_model)]])


@pytest.mark.parametrize('spec', ['configs/sweeps/transfer.py', 'configs/sweeps/transfer.py:smoke',
                                  'configs/sweeps/transfer.py:large', 'configs/sweeps/lr_width.py'])
def test_shipped_sweeps_expand_and_validate(spec, tmp_path):
  sweep = sweep_lib.load_sweep(os.path.join(ROOT, spec))
  trials = sweep_lib.make_trials(sweep, str(tmp_path))
  assert len({t.workdir for t in trials}) == len(trials)
  if spec.startswith('configs/sweeps/transfer.py'):
    recipes = {t.values['recipe'] for t in trials if t.stage == 'domain'}
    assert recipes == {'scratch', 'full', 'frozen', 'lora', 'replay'}
    domain = [t for t in trials if t.stage == 'domain']
    assert len({t.steps for t in domain}) == 1  # An equal step budget.
    assert all(t.cfg.data.builtin_subset == 'email' for t in domain)
    assert {t.cfg.train.eval_batches for t in trials} == {trials[0].cfg.train.eval_batches}
    for t in domain:
      if t.values['recipe'] == 'scratch':
        assert t.script == 'train.py'  # Its domain loss is its own final evaluation.
        assert t.cfg.tokenizer.path == str(tmp_path / 'pretrain' / 'tokenizer.model')
      else:
        assert t.script == 'finetune.py'
        assert t.cfg.finetune.restore_from == str(tmp_path / 'pretrain')


def test_a_pivot_cell_of_several_trials_shows_their_mean_sd_and_count():
  from lm.sweep import Table
  from lm.sweep.report import pivot_markdown
  rows = [{'stage': 'main', 'lr': 1e-3, 'recipe': 'full', 'seed': s, 'loss': v}
          for s, v in enumerate((4.0, 4.2, 4.4))]
  rows += [{'stage': 'main', 'lr': 1e-3, 'recipe': 'lora', 'seed': 0, 'loss': 5.0},
           {'stage': 'main', 'lr': 3e-3, 'recipe': 'full', 'seed': 0, 'loss': None},
           {'stage': 'main', 'lr': 3e-3, 'recipe': 'full', 'seed': 1, 'loss': 4.5}]
  md = pivot_markdown(rows, Table(rows='recipe', cols='lr', value='loss'))
  assert '| full | 4.2000 ± 0.2 (3/3) | 4.5000 (1/2) |' in md  # Not the last trial's 4.4.
  assert '| lora | 5.0000 |  |' in md  # One trial: its value; no trial: empty.

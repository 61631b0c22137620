"""Multi-process JAX on one machine: 2 processes x 4 CPU devices behave like 1 process x 8.

Each multi-process run launches train.py twice (process 0 and 1) with --coordinator,
--num_processes and --process_id, 4 fake CPU devices each and gloo collectives: one global
mesh of 8 devices. data.shard_count=2 makes both runs read the same global batches (process p
reads logical shard p), so their losses agree, and checkpoints move between process counts.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from lm import checkpoint, config, data, loop
from lm import tokenizer as tokenizer_lib
from lm import model as model_lib
from helpers import (ROOT, TINY_OVERRIDES, assert_same_losses, cli_args, data_cfg, load_config_file,
                     losses, make_texts, subprocess_env, tiny_config, write_jsonl)

# The tiny run of test_train, 4 steps, checkpoints at 2 and 4, two logical data shards.
OVERRIDES = {**TINY_OVERRIDES, 'train.steps': 4, 'train.checkpoint_every': 2,
             'train.eval_every': 0, 'train.peak_flops': 1e9, 'data.shard_count': 2}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(workdir, num_processes=2, timeout=150, script='train.py', config_file='configs/tiny.py',
           devices=4, overrides=None):
  """Runs `script` as `num_processes` processes of one job; returns each one's output."""
  port = free_port()
  env = subprocess_env(devices)
  cmd = [sys.executable, os.path.join(ROOT, script), f'--workdir={workdir}',
         '--config=' + os.path.join(ROOT, config_file), '--config.name=tiny_test',
         f'--coordinator=127.0.0.1:{port}', f'--num_processes={num_processes}']
  cmd += cli_args(OVERRIDES if overrides is None else overrides)
  procs = [subprocess.Popen(cmd + [f'--process_id={i}'], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
           for i in range(num_processes)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=timeout)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out
  return outputs


def new_workdir(path, tokenizer_from, checkpoint_from=None):
  """A workdir holding a copy of a run's tokenizer (and of one of its checkpoint steps)."""
  os.makedirs(path / 'checkpoints')
  shutil.copy(tokenizer_from / 'tokenizer.model', path / 'tokenizer.model')
  if checkpoint_from is not None:
    shutil.copytree(checkpoint_from, path / 'checkpoints' / checkpoint_from.name)
  return path


def final_params(workdir, step):
  """A checkpoint's params on this process's first device, whoever wrote them."""
  return params_at(workdir / 'checkpoints' / str(step))


def params_at(path):
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = model_lib.unflatten_params({
      p: jax.ShapeDtypeStruct(shape, dtype, sharding=here)
      for p, (shape, dtype) in checkpoint.params_metadata(path).items()})
  return model_lib.flatten_params(jax.device_get(checkpoint.load_params(path, abstract)))


@pytest.fixture(scope='module')
def one_process(tmp_path_factory):
  """The reference: 1 process, 8 devices, in this pytest process."""
  workdir = tmp_path_factory.mktemp('one_process')
  loop.train(tiny_config(**OVERRIDES), workdir)
  return workdir


@pytest.fixture(scope='module')
def two_processes(one_process, tmp_path_factory):
  workdir = new_workdir(tmp_path_factory.mktemp('runs') / 'two_processes', one_process)
  outputs = launch(workdir)
  return workdir, outputs


def test_one_process_reading_two_shards_saves_both_positions_in_one_file(one_process):
  state = json.loads((one_process / 'checkpoints/4/data/process_0-of-1.json').read_text())
  assert state['shard_count'] == 2 and sorted(state['shards']) == ['0', '1']


def test_two_processes_train_like_one_process_with_eight_devices(one_process, two_processes):
  workdir, (out0, out1) = two_processes
  assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in out0
  assert_same_losses(losses(workdir), losses(one_process), range(1, 5))
  # Only process 0 logs: one metrics file, and no progress lines from process 1.
  assert 'step      4/4' in out0 and 'step ' not in out1
  # Each process wrote its own data-iterator state, holding only its own shard.
  for p in range(2):
    state = json.loads((workdir / 'checkpoints/4/data' / f'process_{p}-of-2.json').read_text())
    assert state['shard_count'] == 2 and list(state['shards']) == [str(p)]
  # Both wrote one checkpoint with the same parameters as the one-process run.
  ours, reference = final_params(workdir, 4), final_params(one_process, 4)
  for path, value in reference.items():
    np.testing.assert_allclose(ours[path], value, rtol=1e-5, atol=1e-6, err_msg=path)


def test_two_processes_resume_their_own_checkpoint(one_process, two_processes, tmp_path):
  source, _ = two_processes
  workdir = new_workdir(tmp_path / 'resumed', source, source / 'checkpoints' / '2')
  out0, _ = launch(workdir)
  assert 'resumed at step 2' in out0
  assert_same_losses(losses(workdir), losses(one_process), (3, 4))


def test_checkpoints_move_between_one_and_two_processes(one_process, two_processes, tmp_path):
  source, _ = two_processes
  # Written by 2 processes, restored by 1 (its data state merged from both processes' files).
  workdir = new_workdir(tmp_path / 'two_to_one', source, source / 'checkpoints' / '2')
  summary = loop.train(tiny_config(**OVERRIDES), workdir)
  assert summary['resumed_from'] == 2
  assert_same_losses(losses(workdir), losses(one_process), (3, 4))
  # Written by 1 process, restored by 2.
  workdir = new_workdir(tmp_path / 'one_to_two', one_process, one_process / 'checkpoints' / '2')
  out0, _ = launch(workdir)
  assert 'resumed at step 2' in out0
  assert_same_losses(losses(workdir), losses(one_process), (3, 4))


# --------------------------------------------------------------------------- fine-tuning


PROBE = ('gender_occupation',)  # A built-in probe set (configs/probes/).


def finetune_overrides(pretrained) -> dict:
  """configs/finetune_classify.py on the tiny run: LoRA adapters on q and v of every layer,
  the classification head, probe and general eval; 3 steps over two logical data shards."""
  return {'finetune.restore_from': str(pretrained), 'finetune.lora_rank': 4,
          'finetune.lora_targets': ('.*attn/(q|v)/kernel',), 'finetune.freeze': ('embed/.*',),
          'finetune.probes': PROBE, 'finetune.general_eval': True,
          'data.seq_len': 32, 'data.batch_size': 8, 'data.shard_count': 2,
          'train.steps': 3, 'train.log_every': 1, 'train.eval_every': 0, 'train.eval_batches': 2,
          'train.checkpoint_every': 100, 'train.sample_tokens': 0, 'train.peak_flops': 1e9,
          'optim.warmup_steps': 0, 'mesh.data': 8, 'mesh.fsdp': 1}


@pytest.fixture(scope='module')
def finetuned_one_process(one_process, tmp_path_factory):
  from lm import finetune
  cfg = load_config_file(os.path.join(ROOT, 'configs', 'finetune_classify.py'))
  cfg.name = 'tiny_test'
  for key, value in finetune_overrides(one_process).items():
    section, name = key.split('.')
    cfg[section][name] = value
  workdir = new_workdir(tmp_path_factory.mktemp('ft_runs') / 'one', one_process)
  finetune.finetune(cfg, workdir)
  return workdir


def test_two_processes_finetune_probe_merge_and_classify_like_one(one_process,
                                                                  finetuned_one_process,
                                                                  tmp_path):
  workdir = new_workdir(tmp_path / 'two', one_process)
  out0, _ = launch(workdir, script='finetune.py', config_file='configs/finetune_classify.py',
                   overrides=finetune_overrides(one_process), timeout=300)
  assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in out0
  assert_same_losses(losses(workdir), losses(finetuned_one_process), range(1, 4))
  ours = json.loads((workdir / 'finetune_report.json').read_text())
  reference = json.loads((finetuned_one_process / 'finetune_report.json').read_text())
  for when in ('before', 'after'):
    assert {'task_accuracy', 'task_macro_f1', 'general_loss'} <= set(ours[when])
    for key, value in reference[when].items():
      np.testing.assert_allclose(ours[when][key], value, rtol=1e-5, err_msg=f'{when} {key}')
  # The bias probe, scored in place on params no process holds whole.
  probe, probe_reference = (r['probes']['gender_occupation'] for r in (ours, reference))
  for key in ('before', 'after', 'shift'):
    np.testing.assert_allclose(probe[key], probe_reference[key], rtol=1e-4, atol=1e-6,
                               err_msg=f'probe {key}')
  assert ours['parameters'] == reference['parameters']
  # The merged checkpoint, written by both processes, holds the same weights and no adapters.
  merged, merged_reference = (params_at(w / 'merged' / '0') for w in (workdir, finetuned_one_process))
  assert not any('lora' in p for p in merged) and sorted(merged) == sorted(merged_reference)
  for path, value in merged_reference.items():
    np.testing.assert_allclose(merged[path], value, rtol=1e-5, atol=1e-6, err_msg=path)


# --------------------------------------------------------------------------- restore elsewhere


# 8 steps, a checkpoint at step 3: a restored run has 5 steps to agree with this one.
RESTORE_OVERRIDES = {**OVERRIDES, 'train.steps': 8, 'train.checkpoint_every': 3,
                     'data.shard_count': 1}


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """8 steps on 1 process x 8 devices, mesh (8, 1, 1)."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  loop.train(tiny_config(**RESTORE_OVERRIDES), workdir)
  return workdir


def test_restore_onto_a_2x2x2_mesh_continues_with_the_same_losses(uninterrupted, tmp_path):
  workdir = new_workdir(tmp_path / 'mesh_222', uninterrupted, uninterrupted / 'checkpoints' / '3')
  cfg = tiny_config(**{**RESTORE_OVERRIDES, 'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2})
  summary = loop.train(cfg, workdir)
  assert summary['resumed_from'] == 3
  # Params, optimizer state and data position all have to be right for 5 steps to agree.
  assert_same_losses(losses(workdir), losses(uninterrupted), range(4, 9))


def test_restore_onto_four_devices_continues_with_the_same_losses(uninterrupted, tmp_path):
  workdir = new_workdir(tmp_path / 'four', uninterrupted, uninterrupted / 'checkpoints' / '3')
  out, = launch(workdir, num_processes=1, devices=4,
                overrides={**RESTORE_OVERRIDES, 'mesh.data': 4}, timeout=300)
  assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1}" in out and 'resumed at step 3' in out
  assert_same_losses(losses(workdir), losses(uninterrupted), range(4, 9))


# --------------------------------------------------------------------------- data shards (in-process)


@pytest.fixture(scope='module')
def shard_setup(tmp_path_factory):
  tok_cfg = config.base_config().tokenizer
  tok_cfg.model_type, tok_cfg.vocab_size, tok_cfg.byte_fallback = 'bpe', 200, False
  tok = tokenizer_lib.train_tokenizer(make_texts(50), tok_cfg)
  path = write_jsonl(tmp_path_factory.mktemp('shards') / 'd.jsonl',
                     [{'text': t} for t in make_texts(80)])
  cfg = data_cfg(source='jsonl', paths=(path,), batch_size=8, shard_count=4)
  return cfg, tok


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_any_process_count_dividing_shard_count_gives_the_same_global_batches(shard_setup):
  cfg, tok = shard_setup
  reference = take(data.make_pipeline(cfg, tok, 'train'), 6)
  for count in (2, 4):
    per_process = [take(data.make_pipeline(cfg, tok, 'train', process_index=p,
                                           process_count=count), 6) for p in range(count)]
    for k, batch in enumerate(reference):
      for key, value in batch.items():
        np.testing.assert_array_equal(
            np.concatenate([per_process[p][k][key] for p in range(count)]), value, err_msg=key)
  # Processes read disjoint documents (each text starts 'doc <i>:').
  seen = [set(re.findall(r'doc (\d+):', ' '.join(tok.decode(list(r)) for b in batches
                                                   for r in b['inputs'])))
          for batches in per_process]
  assert all(seen) and all(not (seen[i] & seen[j]) for i in range(4) for j in range(i + 1, 4))


def test_iterator_state_restores_under_another_process_count(shard_setup, tmp_path):
  cfg, tok = shard_setup
  uninterrupted = data.make_pipeline(cfg, tok, 'train')
  take(uninterrupted, 3)
  expected = take(uninterrupted, 2)
  # Four processes save (as grain's Orbax handler names the files); one process restores.
  directory = tmp_path / '3' / 'data'
  directory.mkdir(parents=True)
  for p in range(4):
    it = data.make_pipeline(cfg, tok, 'train', process_index=p, process_count=4)
    take(it, 3)
    (directory / f'process_{p}-of-4.json').write_text(json.dumps(it.get_state()))
  resumed = data.make_pipeline(cfg, tok, 'train')
  data.restore_iterator(resumed, directory, step=3)
  for got, want in zip(take(resumed, 2), expected):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_changed_shard_count_restarts_the_data_and_skips_the_steps_done(shard_setup, tmp_path):
  cfg, tok = shard_setup
  directory = tmp_path / '3' / 'data'
  directory.mkdir(parents=True)
  saved = data.make_pipeline(cfg, tok, 'train')  # shard_count 4
  take(saved, 3)
  (directory / 'process_0-of-1.json').write_text(json.dumps(saved.get_state()))
  cfg = cfg.copy_and_resolve_references()
  cfg.data.shard_count = 2
  fresh = data.make_pipeline(cfg, tok, 'train')
  take(fresh, 3)
  expected = next(fresh)
  resumed = data.make_pipeline(cfg, tok, 'train')
  data.restore_iterator(resumed, directory, step=3)
  got = next(resumed)
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_bad_shard_count_names_the_key(shard_setup):
  cfg, tok = shard_setup
  cfg = cfg.copy_and_resolve_references()
  cfg.data.shard_count = 3
  with pytest.raises(data.DataError, match='data.shard_count'):
    data.make_pipeline(cfg, tok, 'train', process_index=0, process_count=2)

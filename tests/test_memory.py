"""The dry-run memory plan (lm.memory, python -m lm.bench --dry-run): estimate vs compiled step."""

import os
import subprocess
import sys

import pytest

from lm import build, memory
from helpers import ROOT, load_config_file

MB = 2**20


def shipped(name, **overrides):
  cfg = load_config_file(os.path.join(ROOT, 'configs', f'{name}.py'))
  for key, value in overrides.items():
    section, field = key.split('.')
    cfg[section][field] = value
  return cfg


@pytest.mark.parametrize('overrides', [
    {},  # configs/tiny.py as shipped: FSDP over the 8 devices.
    {'mesh.data': 8, 'mesh.fsdp': 1},  # Data parallel: replicated state.
    {'mesh.fsdp': 4, 'mesh.tensor': 2, 'model.remat': 'full', 'model.scan_layers': True},
])
def test_tiny_estimate_is_within_20_percent_of_the_compiled_step(overrides):
  plan = memory.plan(shipped('tiny', **overrides), 8)
  compiled = plan['compiled']
  assert compiled is not None, plan.get('compiled_note')
  ratio = plan['bytes']['total'] / compiled['peak']
  assert 0.8 <= ratio <= 1.2, memory.format_plan(plan)
  # The state the step takes as arguments is exactly params + optimizer state + batch (+ the
  # step counter and rng key, a few bytes).
  b = plan['bytes']
  state = b['params'] + b['optimizer'] + b['batch']
  assert state <= compiled['arguments'] <= state + 1024


def test_plans_for_more_devices_than_exist_without_allocating():
  cfg = shipped('llama_1b')
  plan = memory.plan(cfg, 256)
  assert plan['compiled'] is None and '256' in plan['compiled_note']
  assert plan['mesh'] == {'data': 1, 'fsdp': 256, 'tensor': 1}
  assert 1.0e9 < plan['params'] < 1.1e9
  # float32 params, FSDP over 256 devices: 1/256 of them each (norm scales are replicated).
  assert plan['bytes']['params'] == pytest.approx(plan['params'] * 4 / 256, rel=0.02)
  assert plan['bytes']['optimizer'] == pytest.approx(2 * plan['bytes']['params'], rel=0.01)
  # Tensor parallelism: the same state per device; 4x the tokens per device (the batch is
  # split 64 ways, not 256), but each token's head and MLP activations split 4 ways.
  cfg.mesh.tensor = 4
  tp = memory.plan(cfg, 256)
  assert tp['mesh'] == {'data': 1, 'fsdp': 64, 'tensor': 4}
  assert tp['bytes']['params'] == pytest.approx(plan['bytes']['params'], rel=0.02)
  assert tp['tokens_per_device'] == 4 * plan['tokens_per_device']
  per_token = lambda p: p['bytes']['activations_working'] / p['tokens_per_device']
  assert per_token(tp) < per_token(plan) / 2


def test_remat_and_batch_scale_the_activations_as_the_formula_says():
  sizes = {'data': 8, 'fsdp': 1, 'tensor': 1}

  def activations(**overrides):
    cfg = shipped('small', **overrides)
    return memory.activation_bytes(build.build(cfg, memory.abstract_mesh(cfg, 8)), sizes)

  base = activations()
  assert activations(**{'data.batch_size': 128})['total'] == pytest.approx(base['total'] / 2)
  full = activations(**{'model.remat': 'full'})
  none = activations(**{'model.remat': 'none'})
  assert full['saved'] < base['saved'] < none['saved']


def test_dry_run_cli_prints_the_table(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'lm.bench', '--dry-run', '--config=configs/llama_7b.py',
       '--devices=256', f'--json={tmp_path / "plan.json"}'],
      capture_output=True, text=True, cwd=ROOT, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))
  assert out.returncode == 0, out.stderr
  assert 'llama_7b: 6,738.4M params' in out.stdout and 'fsdp=256' in out.stdout
  for row in ('params', 'optimizer', 'gradients', 'activations', 'total'):
    assert f'  {row}' in out.stdout
  assert (tmp_path / 'plan.json').exists()


def test_plan_follows_the_attention_kernel_query_chunk_and_logits_chunk():
  """Fused kernels keep no attention probabilities; xla keeps each query chunk's block; the
  loss's logits are live one model.logits_chunk at a time (no compilation needed)."""
  def acts(platform=None, **overrides):
    cfg = shipped('tiny', **{'model.vocab_size': 4096, 'data.seq_len': 512, **overrides})
    return memory.plan(cfg, 8, compile=False, platform=platform)['bytes']

  one_block, chunked = acts(**{'model.attn_query_chunk': 0}), acts(**{'model.attn_query_chunk': 128})
  assert chunked['activations_saved'] < one_block['activations_saved']
  assert chunked['activations_working'] < one_block['activations_working']
  fused = acts('tpu', **{'model.attention': 'auto'})
  assert fused['activations_saved'] < chunked['activations_saved']
  assert fused['activations_working'] == 0
  rows = 16 / 8  # data.batch_size over 8 devices.
  assert acts(**{'model.logits_chunk': 0})['logits'] == rows * 512 * 4096 * 4 * 3
  assert acts(**{'model.logits_chunk': 128})['logits'] == rows * 128 * 4096 * 4 * 3

"""The speed benchmark (python -m lm.bench): its MFU denominator and the PyTorch yardstick."""

import json
import os
import subprocess
import sys

import jax
import pytest

from lm import config, metrics, model as model_lib, op_profile, step, torch_reference
from helpers import ROOT, load_config_file, subprocess_env


def bench_config(**model_overrides):
  cfg = load_config_file(os.path.join(ROOT, 'configs', 'bench_cpu.py'))
  cfg.model.update(model_overrides)
  return cfg


def test_cpu_peak_is_counted_once_per_host_not_per_fake_device():
  cfg = config.base_config()
  assert jax.device_count() == 8
  peak, source = metrics.total_peak_flops(cfg)
  assert 'whole host' in source
  assert 1e9 < peak < 1e13  # One host's measured f32 matmul rate, not 8 of them.
  cfg.train.peak_flops = 1e12  # A configured peak is per device.
  assert metrics.total_peak_flops(cfg) == (8e12, 'config')


@pytest.mark.parametrize('overrides', [{}, dict(n_kv_heads=2, tie_embeddings=True)])
def test_torch_reference_is_the_same_model(overrides):
  cfg = bench_config(**overrides)
  model = model_lib.build_model(cfg.model)
  abstract = jax.eval_shape(step.init_fn(model, cfg.data.seq_len), jax.random.key(0))
  reference = torch_reference.build(cfg.model, cfg.data.seq_len)
  assert (sum(p.numel() for p in reference.parameters())
          == model_lib.count_params(abstract))


def test_torch_reference_refuses_options_it_does_not_implement():
  with pytest.raises(ValueError, match='model.sliding_window'):
    torch_reference.check_supported(bench_config(sliding_window=64).model)


def test_op_names_fall_into_the_categories_a_reader_expects():
  fwd = 'jit(train_step)/jvp(Transformer)/Transformer._layers/layers_1/'
  bwd = 'jit(train_step)/transpose(jvp(Transformer))/Transformer._layers/layers_1/'
  cases = {
      fwd + 'mlp/wi_0/wi_0._flat_matmul/dot_general': 'linear layers (fwd)',
      bwd + 'attn/attention/bkgts,bksd->bkgtd/dot_general': 'attention (bwd)',
      fwd + 'attn/rope/concatenate': 'rope (fwd)',
      fwd + 'pre_mlp_norm/mul': 'norms (fwd)',
      bwd + 'mlp/jit(silu)/mul': 'mlp activation (bwd)',
      'jit(train_step)/jit(_where)/select_n': 'other',
  }
  for op_name, category in cases.items():
    assert op_profile.categorize(op_name) == category, op_name


def test_bench_cli_reports_mfu_the_torch_ratio_and_the_op_profile(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'lm.bench', '--config=configs/bench_cpu.py', '--torch',
       '--steps=2', '--repeats=1', '--config.model.n_layers=1', '--config.data.batch_size=2',
       f'--profile={tmp_path / "trace"}', f'--json={tmp_path / "bench.json"}'],
      capture_output=True, text=True, cwd=ROOT, timeout=300,
      env=subprocess_env(None))  # One device, the suite's XLA flags.
  assert out.returncode == 0, out.stderr
  result = json.loads((tmp_path / 'bench.json').read_text())
  assert result['devices'] == 1 and 'whole host' in result['peak_source']
  assert 0 < result['mfu'] < 1.5 and 0 < result['torch_mfu'] < 1.5
  assert result['speed_vs_torch'] > 0
  assert 'speed_vs_torch' in out.stdout
  # A real trace of the real step: every part of the model shows up with some op time.
  for part in ('linear layers', 'attention', 'rope', 'norms', 'mlp activation'):
    assert result['op_time_ms'][f'{part} (fwd)'] > 0 and result['op_time_ms'][f'{part} (bwd)'] > 0
  assert 'op time' in out.stdout and list((tmp_path / 'trace').glob('plugins/profile/*/*.pb'))


def test_bench_runs_a_config_whose_vocabulary_comes_from_the_tokenizer(tmp_path):
  """configs/tiny.py has model.vocab_size 0 ('the tokenizer's'); bench builds no tokenizer."""
  out = subprocess.run(
      [sys.executable, '-m', 'lm.bench', '--config=configs/tiny.py', '--steps=1', '--repeats=1',
       '--config.model.n_layers=1', f'--json={tmp_path / "tiny.json"}'],
      capture_output=True, text=True, cwd=ROOT, timeout=300,
      env=subprocess_env(None))  # One device, the suite's XLA flags.
  assert out.returncode == 0, out.stderr
  result = json.loads((tmp_path / 'tiny.json').read_text())
  assert result['tokens_per_step'] == 16 * 128 and result['hfu'] >= result['mfu'] > 0


@pytest.mark.parametrize('name', sorted(os.listdir(os.path.join(ROOT, 'configs'))))
def test_every_shipped_config_gets_a_vocabulary_for_bench(name):
  from lm import bench
  if not name.endswith('.py'):
    return
  cfg = load_config_file(os.path.join(ROOT, 'configs', name))
  bench.fill_vocab(cfg)
  assert cfg.model.vocab_size > 0


@pytest.mark.slow
def test_bench_accel_script_end_to_end_at_tiny_sizes(tmp_path):
  """scripts/bench_accel.sh with LM_BENCH_TINY=1: every row runs on the CPU (splash in
  interpret mode, cudnn falling back to xla) and the table lists them (~15 min on 2 cores)."""
  out = subprocess.run(['bash', 'scripts/bench_accel.sh', str(tmp_path)], capture_output=True,
                       text=True, cwd=ROOT, timeout=3000,
                       env=dict(os.environ, LM_BENCH_TINY='1', PYTHON=sys.executable,
                                JAX_PLATFORMS='cpu', XLA_FLAGS=''))
  assert out.returncode == 0, out.stderr
  table = out.stdout.splitlines()
  rows = [l for l in table if l.startswith('| small') or l.startswith('| llama_1b')]
  assert len(rows) == 14 and not any('failed' in r for r in rows), out.stdout
  for kernel in ('xla', 'splash', 'cudnn'):
    assert any(f'_{kernel}_' in r for r in rows)
  assert table[-1].startswith('peak ')

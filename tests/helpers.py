"""Helpers shared by the test modules (no test module imports another)."""

import importlib.util
import json
import os
import signal
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm import checkpoint, config
from lm import model as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny, fast pre-training run on the built-in corpus. One layer: what these runs check (resume,
# sharding, the loop, the CLI) does not depend on depth, and each layer adds ~30% to a tiny run's
# compile and step time; a test about layers (freezing one, stacking them) asks for more. A
# configured peak: measuring it (a 1024^3 matmul timed 20 times, 0.6 s) is test_bench's, not
# every launch's.
TINY_OVERRIDES = {
    'model.d_model': 64, 'model.n_layers': 1, 'model.n_heads': 4, 'model.n_kv_heads': 2,
    'model.mlp_dim': 128, 'tokenizer.vocab_size': 320, 'tokenizer.byte_fallback': False,
    'tokenizer.character_coverage': 0.995, 'data.seq_len': 32, 'data.batch_size': 8,
    'data.train_fraction': 0.1, 'train.steps': 20, 'train.log_every': 1, 'train.eval_every': 0,
    'train.eval_batches': 2, 'train.checkpoint_every': 100, 'train.sample_tokens': 0,
    'optim.warmup_steps': 5, 'mesh.data': 8, 'mesh.fsdp': 1, 'train.peak_flops': 1e12,
}


def load_config_file(path):
  spec = importlib.util.spec_from_file_location('shipped_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_config(**overrides):
  """configs/tiny.py shrunk by TINY_OVERRIDES: what train.py builds from the same flags."""
  cfg = load_config_file(os.path.join(ROOT, 'configs', 'tiny.py'))
  cfg.name = 'tiny_test'
  for key, value in {**TINY_OVERRIDES, **overrides}.items():
    section, name = key.split('.')
    cfg[section][name] = value
  return cfg


def cli_args(overrides: dict) -> list[str]:
  return [f'--config.{k}={v}' for k, v in overrides.items()]


def final_params(workdir) -> dict:
  """{path: host array} of the params in a checkpoint (a step directory, or a run's workdir:
  its latest)."""
  return model_lib.flatten_params(jax.device_get(checkpoint.load_params(workdir)))


def assert_same_params(a, b):
  """Two checkpoints (step directories or run workdirs) hold bitwise-equal params."""
  params_a, params_b = final_params(a), final_params(b)
  assert params_a.keys() == params_b.keys()
  for path, value in params_a.items():
    np.testing.assert_array_equal(value, params_b[path], err_msg=path)


def sigterm_at_step(cmd, step: int, env, timeout: int = 300) -> str:
  """Runs `cmd` (a train.py command), sends SIGTERM once it prints step `step`'s progress
  line, checks it then exits 0 (saved and stopped), and returns everything it printed."""
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=ROOT)
  output = []
  for line in proc.stdout:
    output.append(line)
    if line.startswith('step') and line.split()[1].startswith(f'{step}/'):
      proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=timeout) == 0, ''.join(output)
  return ''.join(output)


def losses(workdir) -> dict[int, float]:
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if 'train/loss' in record:
        out[record['step']] = record['train/loss']
  return out


def assert_same_losses(got: dict, expected: dict, steps, rtol: float = 1e-5):
  """The runs logged exactly `steps`, with the same losses to rtol."""
  assert sorted(got) == list(steps), got
  np.testing.assert_allclose([got[s] for s in steps], [expected[s] for s in steps], rtol=rtol)


def xla_flags(devices: int | None = 8, llvm_opt_level: int | None = None) -> str:
  """This test run's XLA_FLAGS (set by conftest.py) with `devices` fake CPU devices, or the
  platform's one device for None: what a subprocess gets to compute what this process does.
  llvm_opt_level replaces the suite's -O0, for a long run that is compared bitwise with nothing."""
  drop = ['--xla_force_host_platform_device_count=']
  add = [] if devices is None else [f'--xla_force_host_platform_device_count={devices}']
  if llvm_opt_level is not None:
    drop.append('--xla_backend_optimization_level=')
    add.append(f'--xla_backend_optimization_level={llvm_opt_level}')
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith(tuple(drop))]
  return ' '.join(flags + add)


def subprocess_env(devices: int | None = 8, llvm_opt_level: int | None = None) -> dict[str, str]:
  """The environment of a train.py / finetune.py / lm tool subprocess: this run's XLA flags with
  `devices` fake CPU devices (None: one) and, if given, that LLVM level, the repository
  importable, CPU only. The run's compilation cache (conftest.py) comes with os.environ: a later
  launch compiles less."""
  return dict(os.environ, XLA_FLAGS=xla_flags(devices, llvm_opt_level), PYTHONPATH=ROOT,
              JAX_PLATFORMS='cpu')


# --------------------------------------------------------------------------- model tests


def tiny_model_cfg(**overrides):
  m = config.model_config()
  # Query chunks of 8 on 16-token rows: every model test also runs the chunked attention path.
  m.update(dict(vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, mlp_dim=128,
                attn_query_chunk=8))
  m.update(overrides)
  return m


def random_batch(B=8, T=16, vocab=256, seed=0, docs_per_row=1):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (B, T + 1)).astype(np.int32)
  segment_ids = np.ones((B, T), np.int32)
  positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
  if docs_per_row == 2:
    segment_ids[:, T // 2:] = 2
    positions[:, T // 2:] -= T // 2
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=segment_ids,
              positions=positions, loss_mask=np.ones((B, T), np.float32))


def host_params(model, T=16, seed=0):
  """The model's own init, on the host: for a test about the init (its values, dtypes, the
  zero LoRA B a fine-tune starts from)."""
  # Under jit: one compiled program, not one per operation (eager, each op compiles alone).
  variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, T), jnp.int32))
  return jax.device_get(nn.meta.unbox(variables['params']))


def random_params(model, std=0.1, seed=0) -> dict:
  """Random float32 numpy values for every param of `model` (norm scales, biases and LoRA B
  included: none is zero), from its shapes alone. For a test whose claim holds for any weights
  (an equivalence, a mask, a round trip): no init program is compiled, which costs 1-3 s per
  model config at the suite's XLA flags."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: rng.normal(0, std, s.shape).astype(np.float32),
                      nn.meta.unbox(shapes['params']))


# --------------------------------------------------------------------------- data


WORDS = ('alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi '
         'rho sigma tau upsilon phi chi psi omega').split()


def data_cfg(**data_overrides):
  """The base config with small data settings (T 32, 4 rows, no prefetch, a 64-document shuffle
  window) and data.* overrides. The default window of 10,000 documents reads a small test file
  over and over (125 epochs of 80 documents) before its first batch."""
  cfg = config.base_config()
  cfg.data.seq_len, cfg.data.batch_size, cfg.data.prefetch_batches = 32, 4, 0
  cfg.data.shuffle_window = 64
  for key, value in data_overrides.items():
    cfg.data[key] = value
  return cfg


def make_texts(n, seed=0, min_words=8, max_words=120):
  rng = np.random.default_rng(seed)
  return [f'doc {i}: ' + ' '.join(rng.choice(WORDS, rng.integers(min_words, max_words)))
          for i in range(n)]


def write_jsonl(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)

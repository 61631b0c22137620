"""Benchmarks: train-step speed and MFU, and a no-allocation memory plan (--dry-run).

  python -m lm.bench --config=configs/bench_cpu.py            # step time, tokens/s, MFU
  python -m lm.bench --config=configs/bench_cpu.py --torch    # ... and the PyTorch yardstick
  python -m lm.bench --config=configs/llama_1b.py --dry-run --devices=32

MFU is model FLOPs (lm/flops.py) per second over the peak, HFU the same with hardware FLOPs
(recomputation included): on CPU the peak is measured in the same run as the float32
throughput of a large jnp.dot on the same devices, so the ratio says how close the step comes
to the machine's own matmul speed; on GPU/TPU it comes from the device-kind table in
lm/metrics.py (or --config.train.peak_flops, per device), and a bf16 matmul is measured in the
same run and printed beside it (peak_source).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import jax
import numpy as np
from lm import cli

if __name__ == '__main__':
  cli.precheck()  # Unknown keys / missing config file: one line, before the flags parse them.

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lm import config as config_lib
from lm import model as model_lib
from lm import attention, build, memory, metrics, op_profile, sharding, step
from lm import flops as flops_lib
from lm import torch_reference  # Imports torch only when the comparison runs.

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/bench_cpu.py', 'Config file.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repeats (median reported).')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Memory plan only: nothing is allocated or run.')
_DEVICES = flags.DEFINE_integer('devices', 0, 'Dry run: plan for this many devices '
                                '(default: the local ones).')
_PLATFORM = flags.DEFINE_string('platform', '', "Dry run: plan for this platform's attention "
                                'kernel (tpu, gpu, cpu; default: this backend).')
_JSON = flags.DEFINE_string('json', '', 'Also write the results to this JSON file.')
_PROFILE = flags.DEFINE_string('profile', '', 'Also trace 3 steps into this directory and print '
                               'where the op time goes (lm/op_profile.py).')
_TORCH = flags.DEFINE_bool('torch', False, 'Also time the same model written plainly in PyTorch '
                           '(lm/torch_reference.py) and report the speed ratio.')
flags.DEFINE_bool('verbose', False, 'Show tracebacks for user errors.')

def random_batch(cfg, rows: int) -> dict:
  rng = np.random.default_rng(0)
  T, V = cfg.data.seq_len, cfg.model.vocab_size
  tokens = rng.integers(0, V, (rows, T + 1)).astype(np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
              segment_ids=np.ones((rows, T), np.int32),
              positions=np.tile(np.arange(T, dtype=np.int32), (rows, 1)),
              loss_mask=np.ones((rows, T), np.float32))


def fill_vocab(cfg) -> None:
  """model.vocab_size 0 means 'the tokenizer's size': bench builds no tokenizer (its tokens are
  random), so it takes the size the tokenizer would be trained to, tokenizer.vocab_size."""
  if not cfg.model.vocab_size:
    cfg.model.vocab_size = cfg.tokenizer.vocab_size


def run_benchmark(cfg) -> dict:
  fill_vocab(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  rules = cfg.mesh.rules
  built = build.build(cfg, mesh, finetune=False)
  model, tx, schedule, paths = built.model, built.tx, built.schedule, built.trainable
  state, shardings = built.init_state(), built.state_shardings
  batch = sharding.shard_batch(random_batch(cfg, cfg.data.batch_size // jax.process_count()),
                               mesh, rules)
  train_step = step.jit_train_step(
      step.make_train_step(model, tx, schedule, paths, z_loss=cfg.train.z_loss,
                           grad_accum=cfg.optim.grad_accum),
      shardings, jax.tree.map(lambda x: x.sharding, batch))
  with sharding.activate(mesh, rules):
    t0 = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    state, _ = jax.block_until_ready(compiled(state, batch))  # Warm-up.
    medians = []
    for _ in range(_REPEATS.value):
      times = []
      for _ in range(_STEPS.value):
        t0 = time.perf_counter()
        state, step_metrics = jax.block_until_ready(compiled(state, batch))
        times.append(time.perf_counter() - t0)
      medians.append(statistics.median(times))
  step_s = statistics.median(medians)
  tokens = cfg.data.batch_size * cfg.data.seq_len
  per_token = flops_lib.per_token(cfg.model, cfg.data.seq_len)
  flops, hardware_flops = per_token['model'] * tokens, per_token['hardware'] * tokens
  peak_total, peak_source = metrics.total_peak_flops(cfg)
  memory = compiled.memory_analysis()
  result = {
      'config': cfg.name, 'params': model_lib.count_params(state.params),
      'devices': jax.device_count(), 'mesh': dict(mesh.shape), 'compile_s': round(compile_s, 2),
      'tokens_per_step': tokens, 'step_ms': round(1e3 * step_s, 2), 'step_ms_per_repeat': [round(1e3 * m, 2) for m in medians],
      'tokens_per_s': round(tokens / step_s), 'model_tflops': round(flops / step_s / 1e12, 4),
      'peak_tflops': round(peak_total / 1e12, 4), 'peak_source': peak_source,
      'mfu': round(flops / step_s / peak_total, 4),
      'hardware_tflops': round(hardware_flops / step_s / 1e12, 4),
      'hfu': round(hardware_flops / step_s / peak_total, 4),
      'attention': attention.resolve_kernel(cfg.model.attention), 'remat': cfg.model.remat,
      'loss': float(step_metrics['loss']),
      'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
  }
  if memory is not None:
    result['compiled_temp_mb'] = round(memory.temp_size_in_bytes / 2**20, 1)
    result['compiled_args_mb'] = round(memory.argument_size_in_bytes / 2**20, 1)
  if _PROFILE.value:
    def one_step():
      nonlocal state  # The step donates its state: each call consumes the last one's.
      state, step_metrics = compiled(state, batch)
      return step_metrics

    with sharding.activate(mesh, rules):
      op_times = op_profile.trace_op_times(one_step, _PROFILE.value)
    rows = op_profile.breakdown(op_times, compiled.as_text())
    result['op_time_ms'] = {name: round(ms, 1) for name, ms, _ in rows}
  if _TORCH.value:
    ref = torch_reference.benchmark(cfg, _STEPS.value, _REPEATS.value)
    result.update({
        'torch_step_ms': round(1e3 * ref['step_s'], 2), 'torch_threads': ref['threads'],
        'torch_mfu': round(flops / ref['step_s'] / peak_total, 4),
        # > 1: this codebase's step is faster than the plain PyTorch one.
        'speed_vs_torch': round(ref['step_s'] / step_s, 3),
    })
  return result


def main(argv):
  del argv
  cfg = _CONFIG.value
  config_lib.validate(cfg)
  if _DRY_RUN.value:
    result = memory.plan(cfg, _DEVICES.value or jax.device_count(),
                         platform=_PLATFORM.value or None)
    print(memory.format_plan(result))
  else:
    result = run_benchmark(cfg)
    width = max(len(k) for k in result)
    for key, value in result.items():
      if key != 'op_time_ms':
        print(f'{key:<{width}}  {value}')
    if 'op_time_ms' in result:
      total = sum(result['op_time_ms'].values()) or 1.0
      print(op_profile.format_breakdown(
          [(name, ms, ms / total) for name, ms in result['op_time_ms'].items()]))
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(result, f, indent=1, default=str)


if __name__ == '__main__':
  # absl spells flags with underscores; accept the documented --dry-run as well.
  sys.argv = ['--dry_run' + a[len('--dry-run'):] if a.startswith('--dry-run') else a
              for a in sys.argv]
  cli.run(main)

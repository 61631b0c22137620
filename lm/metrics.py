"""What a run shows a person: a progress line, TensorBoard events and metrics.jsonl.

Only process 0 writes; other processes get a writer that does nothing, so multi-host runs
produce one set of files.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
from etils import epath


# Dense bf16 peak FLOP/s per chip, for MFU on accelerators.
PEAK_FLOPS = {'tpu v4': 275e12, 'tpu v5 lite': 197e12, 'tpu v5': 459e12, 'tpu v6 lite': 918e12,
              'h100': 989e12, 'h200': 989e12, 'a100': 312e12}


def measure_matmul_peak(n: int = 2048, repeats: int = 10) -> float:
  """FLOP/s of a float32 n x n matmul on the default device (the CPU peak for MFU).

  The best of `repeats` timings: a peak is what the machine can do, and on a shared machine
  slower runs measure the neighbours.
  """
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / min(times)


def device_peak_flops(cfg) -> tuple[float, str]:
  if cfg.train.peak_flops:
    return cfg.train.peak_flops, 'config'
  kind = jax.devices()[0].device_kind.lower()
  if jax.default_backend() == 'cpu':
    return measure_matmul_peak(), 'measured f32 matmul'
  for name, peak in PEAK_FLOPS.items():
    if name in kind:
      return peak, f'table ({name})'
  return measure_matmul_peak(8192), 'measured matmul'


def total_peak_flops(cfg) -> tuple[float, str]:
  """Peak FLOP/s of all devices together, the MFU denominator, and where it came from.

  On CPU the measured matmul already uses every core of the host, and the host's (fake)
  devices share those cores: the total is one measurement per process, not per device.
  """
  peak, source = device_peak_flops(cfg)
  if jax.default_backend() == 'cpu' and source != 'config':
    return peak * jax.process_count(), source + ', whole host'
  return peak * jax.device_count(), source


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return '?'
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


class MetricsWriter:
  """Appends {step, **metrics} to metrics.jsonl and TensorBoard scalars under <workdir>/tb."""

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = epath.Path(workdir)
    self._tb = None
    if self.enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(self.workdir / 'tb'))
      self._jsonl = open(self.workdir / 'metrics.jsonl', 'a')

  def write(self, step: int, metrics: dict, prefix: str = '') -> None:
    if not self.enabled:
      return
    scalars = {f'{prefix}{k}': float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) or getattr(v, 'ndim', 1) == 0}
    self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self._jsonl.flush()
    for key, value in scalars.items():
      self._tb.add_scalar(key, value, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """One line per log interval: step, loss, lr, tokens/s, MFU, ETA."""

  def __init__(self, total_steps: int, start_step: int, flops_per_token: float,
               peak_flops_total: float, *, enabled: bool | None = None, stream=None):
    self.total_steps = total_steps
    self.flops_per_token = flops_per_token
    self.peak = peak_flops_total
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.stream = stream or sys.stdout
    self._mark_step, self._mark_time, self._tokens = start_step, time.perf_counter(), 0

  def add_tokens(self, tokens: int) -> None:
    self._tokens += tokens

  def throughput(self, step: int) -> dict:
    """Tokens/s and MFU since the last call, and the ETA at that rate."""
    now = time.perf_counter()
    elapsed = max(now - self._mark_time, 1e-9)
    steps = max(step - self._mark_step, 1)
    tokens_per_s = self._tokens / elapsed
    eta = (self.total_steps - step) * elapsed / steps
    self._mark_step, self._mark_time, self._tokens = step, now, 0
    mfu = tokens_per_s * self.flops_per_token / self.peak if self.peak else 0.0
    return {'tokens_per_s': tokens_per_s, 'mfu': mfu, 'eta_s': eta}

  def line(self, step: int, metrics: dict) -> str:
    parts = [f'step {step:>6d}/{self.total_steps}', f"loss {metrics['loss']:.4f}",
             f"lr {metrics['lr']:.2e}", f"tok/s {metrics['tokens_per_s']:,.0f}",
             f"MFU {100 * metrics['mfu']:.1f}%", f"ETA {format_duration(metrics['eta_s'])}"]
    if metrics.get('skipped_total'):
      parts.append(f"skipped {int(metrics['skipped_total'])}")
    return ' | '.join(parts)

  def print(self, text: str) -> None:
    if self.enabled:
      print(text, file=self.stream, flush=True)

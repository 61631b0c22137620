"""What a run shows a person: a progress line, TensorBoard events and metrics.jsonl.

Only process 0 writes; other processes get a writer that does nothing, so multi-host runs
produce one set of files.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
from etils import epath
# TensorBoard's own event writer (the `tensorboard` package users already install to read the
# events): tensorboardX would import torch whenever it is installed, ~2 s on every start-up.
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter


# Dense bf16 peak FLOP/s per chip (datasheets, no sparsity), for MFU on accelerators. The first
# row whose words all appear in jax's device_kind (lower-cased) wins, so the PCIe / NVL variants
# come before the SXM row they would otherwise match.
PEAK_FLOPS = (
    (('h100', 'pcie'), 756e12, 'H100 PCIe'),
    (('h100', 'nvl'), 835e12, 'H100 NVL'),
    (('h100',), 989e12, 'H100 SXM'),
    (('h200',), 989e12, 'H200'),
    (('gh200',), 989e12, 'GH200'),
    (('a100',), 312e12, 'A100'),
    (('tpu v4',), 275e12, 'TPU v4'),
    (('tpu v5 lite',), 197e12, 'TPU v5e'),
    (('tpu v5e',), 197e12, 'TPU v5e'),
    (('tpu v5p',), 459e12, 'TPU v5p'),
    (('tpu v5',), 459e12, 'TPU v5p'),
    (('tpu v6 lite',), 918e12, 'TPU v6e'),
    (('tpu v6e',), 918e12, 'TPU v6e'),
)


def table_peak(device_kind: str) -> tuple[float, str] | None:
  """(peak FLOP/s, name) of a device kind in PEAK_FLOPS, or None."""
  kind = device_kind.lower()
  for words, peak, name in PEAK_FLOPS:
    if all(w in kind for w in words):
      return peak, name
  return None


@functools.cache
def measure_matmul_peak(n: int = 1024, repeats: int = 20, dtype=jnp.float32) -> float:
  """FLOP/s of an n x n matmul on the default device (float32: the CPU peak for MFU).

  The best of `repeats` timings: a peak is what the machine can do, and on a shared machine
  slower runs measure the neighbours. Measured once per process (a machine's peak does not
  change between the runs a sweep or a test makes in it). On CPU 1024 reaches the same peak as
  2048 (within 5% on 2 cores) in a quarter of the time.
  """
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / min(times)


def device_peak_flops(cfg) -> tuple[float, str]:
  """Per-device peak for MFU: the config's, else the table's (accelerators), else measured.

  On an accelerator in the table a bf16 8192^3 matmul is also measured and named in the
  source, so a log shows both (datasheet peaks are rarely reached: ~80% on an H200).
  """
  if cfg.train.peak_flops:
    return cfg.train.peak_flops, 'config'
  if jax.default_backend() == 'cpu':
    return measure_matmul_peak(), 'measured f32 matmul'
  measured = measure_matmul_peak(8192, dtype=jnp.bfloat16)
  found = table_peak(jax.devices()[0].device_kind)
  if found is None:
    return measured, f'measured bf16 matmul ({jax.devices()[0].device_kind} not in the table)'
  peak, name = found
  return peak, (f'table: {name}; measured bf16 matmul {measured / 1e12:.0f} TFLOP/s = '
                f'{100 * measured / peak:.0f}% of it')


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
      self._tb = EventFileWriter(str(self.workdir / 'tb'))
      self._jsonl = open(self.workdir / 'metrics.jsonl', 'a')

  def write(self, step: int, metrics: dict, prefix: str = '') -> None:
    if not self.enabled:
      return
    scalars = {f'{prefix}{k}': float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) or getattr(v, 'ndim', 1) == 0}
    self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self._jsonl.flush()
    self._tb.add_event(Event(wall_time=time.time(), step=int(step), summary=Summary(
        value=[Summary.Value(tag=key, simple_value=value) for key, value in scalars.items()])))
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
    """Tokens/s, MFU and mean step time since the last call, and the ETA at that rate."""
    now = time.perf_counter()
    elapsed = max(now - self._mark_time, 1e-9)
    steps = max(step - self._mark_step, 1)
    tokens_per_s = self._tokens / elapsed
    eta = (self.total_steps - step) * elapsed / steps
    self._mark_step, self._mark_time, self._tokens = step, now, 0
    mfu = tokens_per_s * self.flops_per_token / self.peak if self.peak else 0.0
    return {'tokens_per_s': tokens_per_s, 'mfu': mfu, 'eta_s': eta,
            'step_ms': 1e3 * elapsed / steps}

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

"""Where a compiled step's time goes: `python -m lm.bench --profile=DIR`.

Traces a few calls of the compiled step with the JAX profiler (TensorBoard / Perfetto files in
DIR), then sums the traced duration of every XLA op by what it computes, read from the op's
`op_name` metadata in the compiled HLO: linear-layer matmuls, attention, RMSNorm, RoPE, the MLP
activation, loss, optimizer. Forward and backward are kept apart.

The durations are op time, not wall time: on CPU an op that runs beside another is slowed by it,
and the shares are what to compare, not the sums against the step time.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from typing import Callable, Sequence

import jax
from etils import epath

# (category, pattern on the op_name metadata): the first match wins.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ('linear layers', r'_flat_matmul'),
    ('attention', r'/attention/'),
    ('rope', r'/rope/'),
    ('attention, other', r'/attn/'),
    ('mlp activation', r'/mlp/'),
    ('norms', r'norm/'),
    ('logits and loss', r'logits_loss/'),
    ('embedding', r'/embed/'),
)


def op_metadata(hlo_text: str) -> dict[str, str]:
  """{HLO instruction name: its op_name metadata} for every instruction of the module."""
  names = {}
  for line in hlo_text.splitlines():
    match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', line)
    if match:
      names.setdefault(match.group(1), match.group(2))
  return names


def categorize(op_name: str) -> str:
  pass_name = 'bwd' if 'transpose(jvp(' in op_name else 'fwd' if 'jvp(' in op_name else ''
  for category, pattern in CATEGORIES:
    if re.search(pattern, op_name):
      return f'{category} ({pass_name})' if pass_name and category != 'optimizer' else category
  return 'other'


def trace_op_times(call: Callable[[], object], trace_dir: str, calls: int = 3) -> dict[str, float]:
  """{op name: mean microseconds per call} from a Perfetto trace of `calls` calls."""
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  for _ in range(calls):
    jax.block_until_ready(call())
  jax.profiler.stop_trace()
  # The profiler writes <dir>/plugins/profile/<timestamp>/perfetto_trace.json.gz.
  traces = sorted(epath.Path(trace_dir).glob('plugins/profile/*/perfetto_trace.json.gz'))
  events = json.loads(gzip.decompress(traces[-1].read_bytes()))
  events = events['traceEvents'] if isinstance(events, dict) else events
  times = collections.Counter()
  for event in events:
    if event.get('ph') == 'X' and 'dur' in event:
      times[event['name']] += event['dur'] / calls
  return dict(times)


def breakdown(op_times: dict[str, float], hlo_text: str) -> list[tuple[str, float, float]]:
  """[(category, ms per step, share)] over the ops of this HLO module, largest first."""
  metadata = op_metadata(hlo_text)
  ms = collections.Counter()
  for op, micros in op_times.items():
    if op in metadata:
      ms[categorize(metadata[op])] += micros / 1e3
  total = sum(ms.values()) or 1.0
  return [(name, value, value / total) for name, value in ms.most_common()]


def format_breakdown(rows: Sequence[tuple[str, float, float]]) -> str:
  width = max([len(r[0]) for r in rows] + [8])
  lines = [f'{"op time":<{width}}  {"ms/step":>8}  share']
  lines += [f'{name:<{width}}  {value:8.1f}  {share:5.1%}' for name, value, share in rows]
  return '\n'.join(lines)

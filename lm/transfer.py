"""Effective data transferred (Hernandez et al. 2021, "Scaling Laws for Transfer").

A fine-tuned model reaches domain loss L_ft with D_F domain tokens. Read off a from-scratch
data-scaling curve (domain loss of models trained from scratch on D tokens, >= 4 sizes) the
data D_E a from-scratch model would need to reach L_ft; the effective data transferred is
D_T = D_E - D_F (negative: pre-training hurt, "ossification").

The curve is interpolated piecewise-linearly in (log D, loss) through the points made
monotone (a running minimum over increasing D: more data, trained with early stopping, is
never worse; a larger loss at more data is noise). A fine-tuned loss outside the measured
range gives a bound, not a number: below every from-scratch loss, D_E > the largest size
(`bound` '>'); above every one, D_E < the smallest (`bound` '<'). Extending a nearly flat
curve would give absurd figures (1e20 tokens), and a power-law fit to 4-5 noisy points is
no better founded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from lm.errors import UserError

MIN_SIZES = 4


class TransferError(UserError, ValueError):
  """A from-scratch curve that cannot be read (too few sizes, flat, non-positive data)."""


@dataclasses.dataclass(frozen=True)
class ScalingCurve:
  log_data: tuple[float, ...]  # Increasing.
  loss: tuple[float, ...]  # Non-increasing.

  @classmethod
  def fit(cls, data: Sequence[float], loss: Sequence[float]) -> 'ScalingCurve':
    """From (tokens, loss) points; several points at one size are averaged."""
    if len(data) != len(loss):
      raise TransferError(f'{len(data)} data sizes but {len(loss)} losses')
    by_size: dict[float, list[float]] = {}
    for d, l in zip(data, loss):
      if not d > 0:
        raise TransferError(f'data size {d}: sizes must be > 0 tokens')
      if not math.isfinite(l):
        raise TransferError(f'loss {l} at {d} tokens is not finite')
      by_size.setdefault(float(d), []).append(float(l))
    if len(by_size) < MIN_SIZES:
      raise TransferError(f'the from-scratch curve needs >= {MIN_SIZES} data sizes, got '
                          f'{len(by_size)} ({sorted(by_size)})')
    sizes = sorted(by_size)
    monotone, best = [], math.inf
    for d in sizes:
      best = min(best, sum(by_size[d]) / len(by_size[d]))
      monotone.append(best)
    if monotone[0] == monotone[-1]:
      raise TransferError('the from-scratch loss does not fall with more data: no curve to read')
    return cls(tuple(math.log(d) for d in sizes), tuple(monotone))

  def loss_at(self, data: float) -> float:
    x = math.log(data)
    i = self._segment_for_x(x)
    (x0, x1), (y0, y1) = self.log_data[i:i + 2], self.loss[i:i + 2]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)

  def _segment_for_x(self, x: float) -> int:
    for i in range(len(self.log_data) - 2):
      if x <= self.log_data[i + 1]:
        return i
    return len(self.log_data) - 2

  def data_for_loss(self, loss: float) -> tuple[float, str]:
    """(tokens from scratch that reach `loss`, bound): bound '' inside the measured range;
    '>' (more than the largest size) or '<' (less than the smallest) outside it."""
    xs, ys = self.log_data, self.loss
    if loss < ys[-1]:
      return math.exp(xs[-1]), '>'
    if loss > ys[0]:
      return math.exp(xs[0]), '<'
    # The first sloped segment holding `loss` (flat stretches come from the running minimum).
    i = next(i for i in range(len(xs) - 1) if ys[i] > ys[i + 1] and ys[i + 1] <= loss <= ys[i])
    x = xs[i] + (loss - ys[i]) * (xs[i + 1] - xs[i]) / (ys[i + 1] - ys[i])
    return math.exp(x), ''


def effective_data(curve: ScalingCurve, finetuned_loss: float, finetune_data: float) -> dict:
  """D_E, D_T = D_E - D_F and D_T / D_E for one fine-tuned result; `bound` '>' / '<' marks
  D_E (and so D_T) as a lower / upper bound (see the module docstring)."""
  d_e, bound = curve.data_for_loss(finetuned_loss)
  return {'effective_data': d_e, 'transferred_data': d_e - finetune_data,
          'transfer_fraction': (d_e - finetune_data) / d_e, 'bound': bound}

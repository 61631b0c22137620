"""Effective data transferred: read off a synthetic from-scratch curve with a known answer."""

import math

import pytest

from lm import transfer

SIZES = (1e3, 1e4, 1e5, 1e6)


def log_linear(d):  # A curve straight in log data: interpolation is exact everywhere.
  return 6.0 - 0.25 * math.log(d)


def test_effective_data_on_a_known_curve():
  curve = transfer.ScalingCurve.fit(SIZES, [log_linear(d) for d in SIZES])
  # A fine-tuned model that, with 1k domain tokens, matches from-scratch training on 30k.
  out = transfer.effective_data(curve, log_linear(3e4), finetune_data=1e3)
  assert out['effective_data'] == pytest.approx(3e4, rel=1e-9)
  assert out['transferred_data'] == pytest.approx(2.9e4, rel=1e-9)
  assert out['transfer_fraction'] == pytest.approx(29 / 30)
  assert not out['extrapolated']
  # Better than from scratch on all the data: the last segment extended, and flagged.
  out = transfer.effective_data(curve, log_linear(5e6), finetune_data=1e5)
  assert out['effective_data'] == pytest.approx(5e6, rel=1e-9) and out['extrapolated']
  # Worse than its own data from scratch: negative transfer.
  out = transfer.effective_data(curve, log_linear(2e4), finetune_data=1e5)
  assert out['transferred_data'] == pytest.approx(-8e4, rel=1e-9)


def test_power_law_curve_is_read_within_interpolation_error():
  def power(d):
    return 2.0 + 40.0 * d ** -0.3
  sizes = [1e3, 3e3, 1e4, 3e4, 1e5]
  curve = transfer.ScalingCurve.fit(sizes, [power(d) for d in sizes])
  for d in (2e3, 5e3, 2e4, 6e4):
    assert curve.data_for_loss(power(d))[0] == pytest.approx(d, rel=0.1)  # 3x spacing.


def test_noise_and_seeds():
  # Three seeds per size are averaged; a size whose mean is worse than a smaller one's (noise)
  # is held at the smaller one's loss, so the curve stays invertible.
  data = [d for d in SIZES for _ in range(3)]
  loss = [log_linear(d) + e for d in SIZES for e in (-0.01, 0.0, 0.01)]
  loss[6:9] = [log_linear(1e4) + 0.05] * 3  # 1e5 measured worse than 1e4.
  curve = transfer.ScalingCurve.fit(data, loss)
  assert curve.loss[2] == pytest.approx(log_linear(1e4))
  d, _ = curve.data_for_loss(log_linear(3e5))  # On the 1e4 -> 1e6 stretch, as it now reads.
  assert 1e5 < d < 1e6


def test_bad_curves_name_the_problem():
  with pytest.raises(transfer.TransferError, match='>= 4 data sizes'):
    transfer.ScalingCurve.fit(SIZES[:3], [5, 4, 3])
  with pytest.raises(transfer.TransferError, match='does not fall'):
    transfer.ScalingCurve.fit(SIZES, [5, 5, 5, 5])
  with pytest.raises(transfer.TransferError, match='> 0 tokens'):
    transfer.ScalingCurve.fit((0, 1, 2, 3), [5, 4, 3, 2])

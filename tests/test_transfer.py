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
  assert out['bound'] == ''
  # Better than from scratch on all the data: a lower bound (more than the largest size).
  out = transfer.effective_data(curve, log_linear(5e6), finetune_data=1e5)
  assert out['effective_data'] == pytest.approx(1e6) and out['bound'] == '>'
  assert out['transferred_data'] == pytest.approx(9e5)  # At least.
  # Worse than from scratch on the least data: an upper bound.
  assert transfer.effective_data(curve, log_linear(10), finetune_data=1e3)['bound'] == '<'
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


def test_report_picks_the_best_lr_per_cell_and_reads_effective_data(tmp_path):
  from lm import transfer_report
  columns = ['stage', 'trial', 'status', 'recipe', 'data.train_fraction', 'optim.lr', 'seed',
             'domain_loss', 'general_loss', 'domain_loss_before', 'general_loss_before',
             'train_tokens']
  rows = []
  shares = {0.01: 1e3, 0.1: 1e4, 0.3: 3e4, 1.0: 1e5}
  for share, tokens in shares.items():
    for lr, offset in ((1e-3, 0.0), (3e-3, 0.2)):  # 1e-3 is best from scratch.
      for seed, noise in ((0, -0.01), (1, 0.0), (2, 0.01)):
        rows.append(['domain', 'x', 'done', 'scratch', share, lr, seed,
                     log_linear(tokens) + offset + noise, '', '', '', tokens])
  for lr, loss in ((1e-3, log_linear(5e4) + 0.1), (3e-3, log_linear(5e4))):  # 3e-3 best.
    for seed, noise in ((0, -0.02), (1, 0.0), (2, 0.02)):
      rows.append(['domain', 'x', 'done', 'full', 0.01, lr, seed, loss + noise, 4.1 + noise, 5.0,
                   4.0, 1e3])
  rows.append(['domain', 'x', 'failed', 'full', 0.01, 1e-2, 0, 1.0, 1.0, 5.0, 4.0, 1e3])
  with open(tmp_path / 'results.csv', 'w') as f:
    f.write('\n'.join(','.join(str(v) for v in r) for r in [columns] + rows) + '\n')
  cells = {(c['recipe'], c['data.train_fraction']): c
           for c in transfer_report.report(str(tmp_path))}
  full = cells[('full', 0.01)]
  assert full['best_lr'] == 3e-3 and full['seeds'] == 3  # The failed trial is not counted.
  assert full['domain_loss_mean'] == pytest.approx(log_linear(5e4))
  assert full['domain_loss_sd'] == pytest.approx(0.02)
  assert full['general_change_mean'] == pytest.approx(0.1)
  assert full['domain_gain_mean'] == pytest.approx(5.0 - log_linear(5e4))
  assert full['effective_data'] == pytest.approx(5e4, rel=1e-6)
  assert full['transferred_data'] == pytest.approx(4.9e4, rel=1e-6)
  assert cells[('scratch', 0.1)]['best_lr'] == 1e-3
  assert (tmp_path / 'transfer_frontier.png').exists() and (tmp_path / 'transfer.md').exists()


def test_replay_frontier_picks_the_smallest_share_meeting_both_targets(tmp_path):
  from lm import transfer_report
  columns = ['stage', 'trial', 'status', 'recipe', 'data.train_fraction', 'optim.lr', 'seed',
             'domain_loss', 'general_loss', 'domain_loss_before', 'general_loss_before',
             'train_tokens', 'replay']
  # replay share: (domain loss after, general loss after); before = (5.0, 4.0). Full gains 1.0.
  outcomes = {0.0: (4.0, 4.5), 0.1: (4.02, 4.2), 0.25: (4.05, 4.04), 0.5: (4.2, 4.01)}
  rows = []
  for share, (domain, general) in outcomes.items():
    recipe = 'full' if share == 0 else f'replay{share:g}'
    for lr, offset in ((1e-3, 0.0), (3e-3, 0.3)):
      for seed in range(3):
        rows.append(['replay_frontier', 'x', 'done', recipe, 0.1, lr, seed, domain + offset,
                     general, 5.0, 4.0, 1e4, share])
  with open(tmp_path / 'results.csv', 'w') as f:
    f.write('\n'.join(','.join(str(v) for v in r) for r in [columns] + rows) + '\n')
  cells = transfer_report.best_cells(transfer_report.read_rows(str(tmp_path / 'results.csv')))
  frontier = transfer_report.replay_frontier(cells)[0.1]
  assert [r['replay'] for r in frontier] == [0.0, 0.1, 0.25, 0.5]
  assert [r['gain_kept'] for r in frontier] == pytest.approx([1.0, 0.98, 0.95, 0.8])
  # 0.1 keeps the gain but forgets 0.2; 0.5 forgets little but keeps 80%: 0.25 is the answer.
  assert [r['meets'] for r in frontier] == [False, False, True, False]
  text = transfer_report.frontier_markdown({0.1: frontier})
  assert 'Smallest replay share meeting both: 0.25.' in text
  del frontier[2]
  assert 'No replay share meets both' in transfer_report.frontier_markdown({0.1: frontier})
  for c in cells:  # Full fine-tuning that made the domain worse has no gain to keep.
    c['domain_gain_mean'] -= 2.0
  assert not any(r['meets'] for r in transfer_report.replay_frontier(cells)[0.1])
  assert 'no domain gain' in transfer_report.frontier_markdown(transfer_report.replay_frontier(cells))
  for c in cells:  # A gain smaller than its spread over seeds is no gain either.
    c['domain_gain_mean'], c['domain_gain_sd'] = c['domain_gain_mean'] + 2.0, 1.5
  assert not any(r['meets'] for r in transfer_report.replay_frontier(cells)[0.1])


def test_study_arms_share_weight_decay_lr_grid_seeds_and_the_curve_has_4_sizes(tmp_path):
  import collections
  from lm import sweep as sweep_lib
  sweep = sweep_lib.load_sweep('configs/sweeps/transfer.py')
  trials = [t for t in sweep_lib.make_trials(sweep, str(tmp_path)) if t.stage != 'pretrain']
  assert {t.cfg.optim.weight_decay for t in trials} == {0.1}
  grid = collections.defaultdict(set)
  for t in trials:
    grid[(t.values['recipe'], t.cfg.data.train_fraction)].add((t.cfg.optim.lr, t.cfg.seed,
                                                               t.cfg.data.shuffle_seed))
  seeds = {(0, 0), (1, 1), (2, 2)}
  def lr_grid(*lrs):
    return {(lr, *s) for lr in lrs for s in seeds}
  for (recipe, share), cell in grid.items():  # lrs x seeds: scratch higher, fine-tuned lower.
    expected = lr_grid(1e-3, 3e-3) if recipe == 'scratch' else lr_grid(1e-4, 3e-4, 1e-3)
    assert cell == expected, (recipe, share)
  frontier = sweep_lib.make_trials(sweep_lib.load_sweep('configs/sweeps/transfer.py:frontier'),
                                   str(tmp_path / 'frontier'))
  shares = {t.values['recipe']: t.cfg.finetune.replay for t in frontier if t.stage != 'pretrain'}
  assert shares == {'full': 0.0, 'replay0.1': 0.1, 'replay0.25': 0.25, 'replay0.5': 0.5}
  scratch_sizes = {share for recipe, share in grid if recipe == 'scratch'}
  assert len(scratch_sizes) >= 4
  replay = [t for t in trials if t.values['recipe'] == 'replay']
  assert replay and all(t.cfg.finetune.replay == 0.25 for t in replay)

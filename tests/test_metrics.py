"""lm.metrics: metrics.jsonl and TensorBoard events carry the same scalars."""

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm import metrics


def test_tensorboard_events_hold_what_metrics_jsonl_holds(tmp_path):
  writer = metrics.MetricsWriter(tmp_path, enabled=True)
  writer.write(1, {'loss': 2.5, 'lr': 1e-3}, prefix='train/')
  writer.write(2, {'loss': 2.0, 'lr': 2e-3}, prefix='train/')
  writer.write(2, {'loss': 2.25}, prefix='eval/')
  writer.close()
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert records == [{'step': 1, 'train/loss': 2.5, 'train/lr': 1e-3},
                     {'step': 2, 'train/loss': 2.0, 'train/lr': 2e-3},
                     {'step': 2, 'eval/loss': 2.25}]
  events = EventAccumulator(str(tmp_path / 'tb'))
  events.Reload()
  assert sorted(events.Tags()['scalars']) == ['eval/loss', 'train/loss', 'train/lr']
  for tag in ('train/loss', 'train/lr', 'eval/loss'):
    expected = [(r['step'], r[tag]) for r in records if tag in r]
    got = [(e.step, e.value) for e in events.Scalars(tag)]
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert all(abs(v - w) <= 1e-6 * abs(w) for (_, v), (_, w) in zip(got, expected))  # float32.


def test_a_disabled_writer_writes_nothing(tmp_path):
  writer = metrics.MetricsWriter(tmp_path / 'w', enabled=False)
  writer.write(1, {'loss': 1.0})
  writer.close()
  assert not (tmp_path / 'w').exists()


def test_the_cpu_peak_is_measured_once_per_process():
  first = metrics.measure_matmul_peak()
  assert first > 0 and metrics.measure_matmul_peak() == first

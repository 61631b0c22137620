"""Replay: every batch holds the configured share of replay rows, and resumes exactly."""

import json

import grain
import numpy as np
import pytest

from lm import config, data, finetune, replay
from lm import tokenizer as tokenizer_lib
from lm.config import ConfigError
from helpers import data_cfg

# Two sources with disjoint words, so every row can be traced to its source by its tokens.
DOMAIN_WORDS = 'alpha beta gamma delta epsilon zeta theta kappa lambda sigma'.split()
REPLAY_WORDS = 'apple banana cherry grape lemon mango olive peach plum melon'.split()


def texts(words, n, seed):
  rng = np.random.default_rng(seed)
  return [' '.join(rng.choice(words, rng.integers(8, 60))) for _ in range(n)]


def write_jsonl(path, rows):
  path.write_text(''.join(json.dumps({'text': t}) + '\n' for t in rows))
  return str(path)


@pytest.fixture(scope='module')
def tok():
  tok_cfg = config.base_config().tokenizer
  tok_cfg.model_type, tok_cfg.vocab_size, tok_cfg.byte_fallback = 'bpe', 120, False
  return tokenizer_lib.train_tokenizer(texts(DOMAIN_WORDS, 50, 0) + texts(REPLAY_WORDS, 50, 1),
                                       tok_cfg)


@pytest.fixture
def cfg(tmp_path):
  c = data_cfg(source='jsonl', paths=(write_jsonl(tmp_path / 'domain.jsonl',
                                                  texts(DOMAIN_WORDS, 80, 2)),), batch_size=8)
  c.finetune.replay = 0.25
  c.finetune.replay_data.update(source='jsonl', paths=(write_jsonl(tmp_path / 'replay.jsonl',
                                                                   texts(REPLAY_WORDS, 80, 3)),),
                                shuffle_window=c.data.shuffle_window)  # data_cfg's small window.
  return c


def source_tokens(tok, words):
  return {t for w in words for t in tok.encode(' ' + w) + tok.encode(w)}


def row_sources(batch, tok):
  """'d' / 'r' per row, from the tokens only one source's words produce."""
  domain, other = source_tokens(tok, DOMAIN_WORDS), source_tokens(tok, REPLAY_WORDS)
  only_domain, only_replay = domain - other, other - domain
  marks = []
  for row in batch['inputs']:
    ids = set(row.tolist())
    is_d, is_r = bool(ids & only_domain), bool(ids & only_replay)
    assert is_d != is_r, f'row mixes sources or has no marker: {row}'
    marks.append('d' if is_d else 'r')
  return ''.join(marks)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_every_batch_holds_the_configured_share(cfg, tok):
  it = replay.make_train_iterator(cfg, tok)
  for batch in take(it, 20):
    assert batch['inputs'].shape == (8, 32)
    assert row_sources(batch, tok) == 'dddddd' + 'rr'  # round(0.75 * 8) domain rows.
  cfg.finetune.replay = 0.5
  cfg.data.batch_size = 12
  for batch in take(replay.make_train_iterator(cfg, tok), 5):
    assert row_sources(batch, tok) == 'd' * 6 + 'r' * 6


def test_share_holds_per_shard_and_global_batches_match_across_process_counts(cfg, tok):
  cfg.data.shard_count = 2
  one = take(replay.make_train_iterator(cfg, tok), 6)
  per_process = [take(replay.make_train_iterator(cfg, tok, process_index=i, process_count=2), 6)
                 for i in range(2)]
  for step, batch in enumerate(one):
    # Each shard: its 3 domain rows, then its replay row.
    assert row_sources(batch, tok) == 'dddr' * 2
    for key in batch:
      np.testing.assert_array_equal(
          batch[key], np.concatenate([per_process[0][step][key], per_process[1][step][key]]))


@pytest.mark.parametrize('prefetch', [0, 2])
def test_resume_from_state_is_exact(cfg, tok, prefetch):
  cfg.data.prefetch_batches = prefetch
  uninterrupted = replay.make_train_iterator(cfg, tok)
  take(uninterrupted, 4)
  expected = take(uninterrupted, 5)
  first = replay.make_train_iterator(cfg, tok)
  take(first, 4)
  state = json.loads(json.dumps(first.get_state()))
  assert set(state) == {'domain', 'replay'}
  resumed = replay.make_train_iterator(cfg, tok)
  resumed.set_state(state)
  for got, want in zip(take(resumed, 5), expected):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_checkpointed_state_restores_under_another_process_count(cfg, tok, tmp_path):
  """The checkpoint's own path: grain's handler writes it, lm.data.restore_iterator reads it."""
  cfg.data.shard_count = 2
  uninterrupted = replay.make_train_iterator(cfg, tok)
  take(uninterrupted, 3)
  expected = take(uninterrupted, 4)
  saved = tmp_path / 'data'
  saved.mkdir()
  for i in range(2):  # Two processes save their own files, as on a pod.
    it = replay.make_train_iterator(cfg, tok, process_index=i, process_count=2)
    take(it, 3)
    (saved / f'process_{i}-of-2.json').write_text(json.dumps(it.get_state()))
  resumed = replay.make_train_iterator(cfg, tok)  # One process continues both shards.
  data.restore_iterator(resumed, saved, step=3)
  for got, want in zip(take(resumed, 4), expected):
    np.testing.assert_array_equal(got['inputs'], want['inputs'])
  # And grain's Orbax handler (what lm.checkpoint.save uses) accepts the iterator.
  own = tmp_path / 'own'
  own.mkdir()
  grain.checkpoint.CheckpointHandler().save(own, args=grain.checkpoint.CheckpointSave(resumed))
  assert set(json.loads(next(own.iterdir()).read_text())) == {'domain', 'replay'}


def test_default_source_is_general_split_like_the_general_eval(cfg):
  cfg.finetune.replay_data.source = ''
  cfg.data.validation_share = 0.1
  cfg.data.train_fraction = 0.01
  source = replay.replay_config(cfg, 2).data
  assert (source.source, source.builtin_subset) == ('builtin', 'general')
  assert source.validation_share == 0.1 and source.train_fraction == 1.0
  assert source.batch_size == 2 and source.seq_len == cfg.data.seq_len
  # The domain's validation files are not the general corpus's: replay and the report's general
  # loss split it by its own hash, so replay never trains on what that loss reads.
  cfg.data.validation_paths = ('domain_validation.jsonl',)
  source = replay.replay_config(cfg, 2).data
  assert source.validation_paths == () and source.validation_share == 0.1
  general = finetune.general_config(cfg).data
  assert general.validation_paths == () and general.builtin_subset == 'general'


def test_bad_settings_name_the_key(cfg, tok, tmp_path):
  cfg.finetune.replay = 0.05  # round(0.95 * 8) = 8: no replay row at all.
  with pytest.raises(ConfigError, match='finetune.replay.*8 domain \\+ 0 replay'):
    replay.make_train_iterator(cfg, tok)
  cfg.finetune.replay = 0.25
  cfg.data.shard_count = 4  # 6 domain rows over 4 shards.
  with pytest.raises(ConfigError, match='finetune.replay.*4 data shards'):
    replay.make_train_iterator(cfg, tok)
  cfg.data.shard_count = 0
  cfg.finetune.replay_data.paths = (str(tmp_path / 'missing.jsonl'),)
  with pytest.raises(data.DataError, match='finetune.replay_data .*missing.jsonl'):
    replay.make_train_iterator(cfg, tok)
  cfg.finetune.replay = 1.0
  with pytest.raises(ConfigError, match='finetune.replay'):
    config.validate(cfg)


def test_finetune_with_replay_checkpoints_both_positions_and_reports_the_tradeoff(cfg, tmp_path):
  from lm import loop
  cfg.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64)
  cfg.tokenizer.update(model_type='bpe', vocab_size=120, byte_fallback=False)
  cfg.train.update(steps=2, eval_every=0, eval_batches=1, checkpoint_every=1, sample_tokens=0)
  cfg.finetune.replay = 0.0
  loop.train(cfg, tmp_path / 'base')
  cfg.finetune.update(restore_from=str(tmp_path / 'base'), replay=0.25, general_eval=True)
  # The general loss is measured on the replay source here, so the tradeoff has both sides.
  cfg.finetune.replay_data.update(source='', builtin_subset='general')
  cfg.data.update(batch_size=8)
  summary = finetune.finetune(cfg, tmp_path / 'ft')
  assert summary['step'] == 2
  state = json.loads((tmp_path / 'ft' / 'checkpoints' / '2' / 'data' /
                      'process_0-of-1.json').read_text())
  assert set(state) == {'domain', 'replay'}
  tradeoff = summary['report']['tradeoff']
  assert tradeoff['replay'] == 0.25 and set(tradeoff) == {'replay', 'domain_gain', 'general_change'}

"""SentencePiece tokenizer: ids, round trips, char mode, save/load, load_or_train reuse."""

import json
import pickle

import pytest

from lm import config
from lm import corpus
from lm import tokenizer as tokenizer_lib

ROUND_TRIP = [
    'def f(x):\n    return x  # two  spaces\n\n\tdone\n',
    '  leading and trailing spaces  ',
    'Unicode: héllo wörld, ☃, 日本語, emoji 🙂',
    'control \x00\x01 bytes and \r\n line endings',
    '',
]


def tiny_cfg(**overrides):
  cfg = config.base_config().tokenizer
  cfg.model_type = 'bpe'
  cfg.vocab_size = 400
  cfg.max_train_docs = 200
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


@pytest.fixture(scope='module')
def texts():
  return [d.text for d in corpus.documents('general', ('topics',))][:40]


@pytest.fixture(scope='module')
def bpe(texts):
  return tokenizer_lib.train_tokenizer(texts, tiny_cfg())


def test_special_ids_are_explicit(bpe):
  assert (bpe.pad_id, bpe.unk_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2, 3)
  assert bpe.vocab_size <= 400


@pytest.mark.parametrize('text', ROUND_TRIP)
def test_round_trip_with_byte_fallback(bpe, text):
  assert bpe.decode(bpe.encode(text)) == text


def test_encode_batch_matches_encode(bpe, texts):
  assert bpe.encode_batch(texts[:5]) == [bpe.encode(t) for t in texts[:5]]


def test_decode_skips_control_ids_and_takes_arrays(bpe):
  import numpy as np
  ids = [bpe.bos_id] + bpe.encode('hello world') + [bpe.eos_id, bpe.pad_id]
  assert bpe.decode(np.asarray(ids, np.int32)) == 'hello world'


def test_char_mode(texts):
  tok = tokenizer_lib.train_tokenizer(texts, tiny_cfg(model_type='char', byte_fallback=False,
                                                      vocab_size=200))
  sample = 'The import statement.\n'
  ids = tok.encode(sample)
  assert len(ids) == len(sample)  # One piece per character.
  assert tok.decode(ids) == sample


def test_char_mode_with_byte_fallback_round_trips_unseen_characters(texts):
  tok = tokenizer_lib.train_tokenizer(texts, tiny_cfg(model_type='char', vocab_size=400))
  for text in ROUND_TRIP:
    assert tok.decode(tok.encode(text)) == text


def test_unigram_trains(texts):
  tok = tokenizer_lib.train_tokenizer(texts[:10], tiny_cfg(model_type='unigram'))
  assert tok.decode(tok.encode(ROUND_TRIP[0])) == ROUND_TRIP[0]


def test_save_load_and_pickle(bpe, tmp_path):
  path = tmp_path / 'sub' / 'tok.model'
  bpe.save(path)
  loaded = tokenizer_lib.Tokenizer.load(path)
  assert loaded.fingerprint == bpe.fingerprint
  assert loaded.encode(ROUND_TRIP[0]) == bpe.encode(ROUND_TRIP[0])
  clone = pickle.loads(pickle.dumps(bpe))
  assert clone.encode(ROUND_TRIP[2]) == bpe.encode(ROUND_TRIP[2])


def test_too_small_vocab_names_the_key(texts):
  with pytest.raises(config.ConfigError, match='tokenizer.vocab_size'):
    tokenizer_lib.train_tokenizer(texts, tiny_cfg(model_type='unigram', vocab_size=100))


def test_empty_training_source_is_an_error():
  with pytest.raises(ValueError, match='no text'):
    tokenizer_lib.train_tokenizer([], tiny_cfg())


def _jsonl_cfg(tmp_path, texts):
  path = tmp_path / 'docs.jsonl'
  path.write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
  cfg = config.base_config()
  cfg.data.source = 'jsonl'
  cfg.data.paths = (str(path),)
  cfg.tokenizer = tiny_cfg()
  return cfg


def test_load_or_train_saves_then_reuses(tmp_path, texts, monkeypatch):
  cfg = _jsonl_cfg(tmp_path, texts)
  workdir = tmp_path / 'run'
  first = tokenizer_lib.load_or_train(cfg, workdir, training_texts=lambda: texts)
  assert (workdir / 'tokenizer.model').exists()

  def fail(*args, **kwargs):
    raise AssertionError('must reuse the saved tokenizer, not train again')

  monkeypatch.setattr(tokenizer_lib, 'train_tokenizer', fail)
  assert tokenizer_lib.load_or_train(cfg, workdir).fingerprint == first.fingerprint
  # A fine-tuning run finds the pre-training run's tokenizer through restore_from.
  cfg.finetune.restore_from = str(workdir / 'checkpoints' / '100')
  assert tokenizer_lib.load_or_train(cfg, tmp_path / 'ft').fingerprint == first.fingerprint


def test_load_or_train_uses_configured_path(tmp_path, bpe):
  bpe.save(tmp_path / 'given.model')
  cfg = config.base_config()
  cfg.tokenizer.path = str(tmp_path / 'given.model')
  assert tokenizer_lib.load_or_train(cfg, tmp_path / 'run').fingerprint == bpe.fingerprint
  cfg.tokenizer.path = str(tmp_path / 'missing.model')
  with pytest.raises(config.ConfigError, match='tokenizer.path'):
    tokenizer_lib.load_or_train(cfg, tmp_path / 'run2')

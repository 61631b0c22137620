"""SentencePiece tokenizer: train from the texts it is handed, save with the run, load, encode.

A model this code trains has explicit special ids pad=0, unk=1, bos=2, eos=3. Imported models
(Llama, Gemma, ...) bring their own `.model` with other ids, so every other module reads the
ids from the `Tokenizer` instead of hard-coding them.

Training keeps text byte-exact by default (normalization 'identity', no dummy prefix, no
whitespace squeezing, whitespace-only pieces allowed) because the built-in corpus is Python
source where indentation and newlines carry meaning; with byte fallback every string
round-trips through encode/decode.

`load_or_train(cfg, workdir)` picks the tokenizer of a run, first match wins:
  1. cfg.tokenizer.path (an existing .model; etils.epath, so gs:// works);
  2. <workdir>/tokenizer.model (a resumed run keeps its tokenizer);
  3. <cfg.data.prepared_dir>/tokenizer.model (shards from `python -m lm.data prepare` only make
     sense with the tokenizer that wrote them);
  4. tokenizer.model next to cfg.finetune.restore_from or cfg.train.init_from (or one or two
     directories up): a fine-tuned model must keep its pre-trained vocabulary;
  5. otherwise train on the texts the caller hands over (`training_texts`) and save to
     <workdir>/tokenizer.model. lm.data.load_or_train_tokenizer(cfg, workdir) hands the
     configured training split; for the built-in corpus it also hands a cache key, and the
     trained model is cached under $LM_CACHE_DIR/tokenizers, because that text is fixed per
     interpreter version. This module never imports lm.data.
Whatever it picks is saved to <workdir>/tokenizer.model, so a run always carries its tokenizer.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

from absl import logging
from etils import epath
import numpy as np
import sentencepiece as spm

from lm import config as config_lib
from lm import files, hf_tokenizer

TOKENIZER_FILE = 'tokenizer.model'


class Tokenizer:
  """A SentencePiece processor with its special ids as plain attributes.

  pad_id is the model's pad piece; models without one (Llama) pad with unk_id instead.
  Padding is always masked out, so the id only needs to be a valid embedding row.
  bos_id / eos_id are -1 when the model has no such piece (the data pipeline then omits it).
  """

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self.vocab_size = int(self._sp.vocab_size())
    self.unk_id = int(self._sp.unk_id())
    self.bos_id = int(self._sp.bos_id())
    self.eos_id = int(self._sp.eos_id())
    pad = int(self._sp.pad_id())
    self.pad_id = pad if pad >= 0 else max(self.unk_id, 0)
    self.fingerprint = hashlib.sha256(self._proto).hexdigest()[:16]

  # Pickling (grain worker processes) carries the serialized model, not the C++ object.
  def __getstate__(self):
    return {'model_proto': self._proto}

  def __setstate__(self, state):
    self.__init__(state['model_proto'])

  def __repr__(self) -> str:
    return (f'Tokenizer(vocab_size={self.vocab_size}, pad={self.pad_id}, unk={self.unk_id}, '
            f'bos={self.bos_id}, eos={self.eos_id}, fingerprint={self.fingerprint})')

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos."""
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text (SentencePiece's own thread pool, one thread per core)."""
    return self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; pad/bos/eos are control pieces and decode to nothing."""
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))

  @property
  def model_proto(self) -> bytes:
    return self._proto

  @classmethod
  def load(cls, path) -> 'Tokenizer':
    """A SentencePiece .model, or (by content) a tokenizer.json: lm.hf_tokenizer.HFTokenizer."""
    data = files.read_bytes(path, 'tokenizer model')
    if hf_tokenizer.is_hf_tokenizer(data):  # JSON, never a SentencePiece proto.
      return hf_tokenizer.HFTokenizer.from_bytes(data, path)
    return cls(data)

  def save(self, path) -> None:
    files.write_bytes(path, self._proto)


# --------------------------------------------------------------------------- training


def _sentences(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
  """Cuts documents into training 'sentences' of at most max_bytes, at line boundaries.

  SentencePiece skips longer sentences silently; feeding whole lines would lose the
  newlines from the vocabulary, which matter in code.
  """
  for text in texts:
    chunk, size = [], 0
    for line in text.splitlines(keepends=True):
      n = len(line.encode('utf-8'))
      if chunk and size + n > max_bytes:
        yield ''.join(chunk)
        chunk, size = [], 0
      while n > max_bytes:  # A single huge line: cut it by characters.
        cut = max(1, max_bytes // 4)  # 4 bytes is the widest UTF-8 character.
        yield line[:cut]
        line = line[cut:]
        n = len(line.encode('utf-8'))
      chunk.append(line)
      size += n
    if chunk:
      yield ''.join(chunk)


def trainer_options(tok_cfg) -> dict:
  """SentencePiece trainer arguments from cfg.tokenizer."""
  if tok_cfg.model_type not in ('unigram', 'bpe', 'char'):
    raise config_lib.ConfigError(
        f"config key tokenizer.model_type: must be 'unigram', 'bpe' or 'char', "
        f'got {tok_cfg.model_type!r}')
  return dict(
      model_type=tok_cfg.model_type,
      vocab_size=int(tok_cfg.vocab_size),
      byte_fallback=bool(tok_cfg.byte_fallback),
      character_coverage=float(tok_cfg.character_coverage),
      max_sentence_length=int(tok_cfg.max_sentence_length),
      normalization_rule_name=tok_cfg.normalization,
      split_digits=bool(tok_cfg.split_digits),
      pad_id=0, unk_id=1, bos_id=2, eos_id=3,
      # Keep text byte-exact: code indentation and newlines are content.
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      # A small corpus may not support the full vocabulary; take what it supports.
      hard_vocab_limit=False,
      num_threads=os.cpu_count() or 1,
      minloglevel=2,
  )


def train_tokenizer(texts: Iterable[str], tok_cfg, out_path=None) -> Tokenizer:
  """Trains on up to tok_cfg.max_train_docs texts and saves the model to out_path (if given)."""
  options = trainer_options(tok_cfg)
  texts = itertools.islice(iter(texts), int(tok_cfg.max_train_docs))
  sentences = _sentences(texts, int(tok_cfg.max_sentence_length))
  # SentencePiece aborts on an empty input; peek so the message can say what was wrong.
  first = next(sentences, None)
  if first is None:
    raise ValueError('cannot train a tokenizer: the training source has no text')
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=itertools.chain([first], sentences), model_writer=model, **options)
  except RuntimeError as e:  # SentencePiece reports settings problems as RuntimeError.
    detail = str(e).split('] ')[-1]
    raise config_lib.ConfigError(
        f'config key tokenizer.vocab_size/character_coverage: SentencePiece cannot train with '
        f'vocab_size={options["vocab_size"]}, byte_fallback={options["byte_fallback"]} '
        f'(256 byte pieces): {detail}') from None
  tokenizer = Tokenizer(model.getvalue())
  if out_path is not None:
    tokenizer.save(out_path)
  return tokenizer


# --------------------------------------------------------------------------- run tokenizer


def _nearby_tokenizer(checkpoint_path: str) -> epath.Path | None:
  """tokenizer.model in a run/checkpoint directory or up to two directories above it."""
  if not checkpoint_path:
    return None
  path = epath.Path(checkpoint_path)
  for candidate_dir in (path, path.parent, path.parent.parent):
    for name in (TOKENIZER_FILE, 'tokenizer.json'):  # A converted model may ship either.
      candidate = candidate_dir / name
      if candidate.exists():
        return candidate
  return None


def _cache_path(cfg, cache_key: dict | None, cache_dir) -> epath.Path | None:
  """Where a tokenizer trained on a fixed text source is cached (None: not cacheable).

  The caller (lm.data) hands a cache key that identifies the training texts exactly, e.g.
  for the built-in corpus its source settings and the interpreter's corpus version.
  """
  if cache_key is None or cache_dir is None:
    return None
  options = {k: v for k, v in trainer_options(cfg.tokenizer).items() if k != 'num_threads'}
  key = json.dumps({'tokenizer': options, 'max_train_docs': int(cfg.tokenizer.max_train_docs),
                    **cache_key}, sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:20]
  return epath.Path(cache_dir) / 'tokenizers' / f'{digest}.model'


def _copy_into(tokenizer: Tokenizer, path: epath.Path, origin) -> Tokenizer:
  """Saves the chosen tokenizer into the run, so the run always records what it used."""
  logging.info('tokenizer: using %s (%r)', origin, tokenizer)
  if not path.exists() or path.read_bytes() != tokenizer.model_proto:
    tokenizer.save(path)
  return tokenizer


def load_or_train(cfg, workdir, *, training_texts: Callable[[], Iterable[str]] | None = None,
                  cache_key: dict | None = None, cache_dir=None) -> Tokenizer:
  """The run's tokenizer (see the module docstring for the order); saved in the workdir.

  training_texts is called only when a tokenizer must be trained; lm.data.load_or_train_tokenizer
  passes the configured training split's texts and, for the built-in corpus, a cache key.
  """
  workdir = epath.Path(workdir)
  own = workdir / TOKENIZER_FILE
  if cfg.tokenizer.path:
    path = epath.Path(cfg.tokenizer.path)
    if not path.exists():
      raise config_lib.ConfigError(f"config key tokenizer.path: no such file '{path}'")
    return _copy_into(Tokenizer.load(path), own, path)
  if own.exists():
    return Tokenizer.load(own)
  candidates = [epath.Path(cfg.data.prepared_dir) / TOKENIZER_FILE if cfg.data.prepared_dir else None,
                _nearby_tokenizer(cfg.finetune.restore_from),
                _nearby_tokenizer(cfg.train.init_from)]
  for candidate in candidates:
    if candidate is not None and candidate.exists():
      return _copy_into(Tokenizer.load(candidate), own, candidate)
  cached = _cache_path(cfg, cache_key, cache_dir)
  if cached is not None and cached.exists():
    return _copy_into(Tokenizer.load(cached), own, cached)
  if training_texts is None:
    raise config_lib.ConfigError(
        f'config key tokenizer.path: no tokenizer found (tokenizer.path, {own}, '
        'data.prepared_dir, finetune.restore_from, train.init_from) and no texts to train one')

  logging.info('tokenizer: training %s (vocab %d) on the training split',
               cfg.tokenizer.model_type, cfg.tokenizer.vocab_size)
  tokenizer = train_tokenizer(training_texts(), cfg.tokenizer, own)
  if cached is not None:
    try:
      tokenizer.save(cached)
    except OSError:
      pass  # Only a cache.
  logging.info('tokenizer: trained %r, saved to %s', tokenizer, own)
  return tokenizer

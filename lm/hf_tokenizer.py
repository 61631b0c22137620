"""A `tokenizer.json` tokenizer (Hugging Face `tokenizers`) behind lm's Tokenizer interface.

Llama 3, Qwen and Mistral's newer releases ship a byte-level BPE `tokenizer.json` that
SentencePiece cannot express; this backend runs it with the `tokenizers` library, which is what
`transformers.AutoTokenizer` runs too, so ids agree exactly. Special tokens (bos/eos/pad/unk)
and the chat template come from the `tokenizer_config.json` beside it (and `chat_template.jinja`,
where transformers 5 writes the template).

`lm.tokenizer.Tokenizer.load` picks this backend by content: a JSON file is either a plain
`tokenizer.json` (its siblings are read) or the one-file bundle this class saves into a run's
workdir (`{"lm_hf_tokenizer": 1, "tokenizer": ..., "config": ...}`), so a run carries its
tokenizer in one file whatever the backend.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

from etils import epath
import numpy as np

from lm import files
from lm.errors import UserError

BUNDLE_KEY = 'lm_hf_tokenizer'
CONFIG_FILE = 'tokenizer_config.json'
TEMPLATE_FILE = 'chat_template.jinja'
# tokenizer_config.json keys worth keeping with the tokenizer (the rest describe Python classes).
_CONFIG_KEYS = ('bos_token', 'eos_token', 'pad_token', 'unk_token', 'chat_template',
                'add_bos_token', 'add_eos_token', 'model_max_length')


class TokenizerError(UserError, ValueError):
  """A tokenizer file that cannot be used; the message names the file and key."""


def is_hf_tokenizer(data: bytes) -> bool:
  """Whether file bytes are a tokenizer.json or a bundle (SentencePiece protos are binary)."""
  return data.lstrip()[:1] == b'{'


def token_content(value: Any) -> str | None:
  """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
  if isinstance(value, dict):
    return value.get('content')
  return value if isinstance(value, str) else None


def read_config(directory) -> dict[str, Any]:
  """The special tokens and chat template stored beside a tokenizer.json ({} if none)."""
  raw = files.read_json(directory / CONFIG_FILE, TokenizerError) or {}
  config: dict[str, Any] = {k: raw[k] for k in _CONFIG_KEYS if k in raw}
  template = directory / TEMPLATE_FILE
  if template.exists():
    config['chat_template'] = template.read_text()
  return config


class HFTokenizer:
  """Same attributes and methods as lm.tokenizer.Tokenizer (vocab_size, pad/unk/bos/eos ids,
  encode, encode_batch, decode, id_to_piece, model_proto, save), plus encode_with_offsets and
  the chat template for lm.chat."""

  def __init__(self, tokenizer_json: str, config: dict[str, Any] | None = None):
    import tokenizers  # A Rust extension: loaded only for models that need it.

    self._json = tokenizer_json
    self.config = dict(config or {})
    self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self.unk_id = self._id_of('unk_token')
    model_unk = getattr(self._tok.model, 'unk_token', None)
    if self.unk_id < 0 and model_unk:
      self.unk_id = self._token_id(model_unk)
    self.bos_id = self._id_of('bos_token')
    self.eos_id = self._id_of('eos_token')
    pad = self._id_of('pad_token')
    # Padding is always masked out, so any valid row will do when the model has no pad token.
    self.pad_id = next((i for i in (pad, self.unk_id, self.eos_id) if i >= 0), 0)
    self.chat_template = self.config.get('chat_template')
    self.fingerprint = hashlib.sha256(self.model_proto).hexdigest()[:16]

  def _token_id(self, token: str | None) -> int:
    token_id = self._tok.token_to_id(token) if token else None
    return -1 if token_id is None else int(token_id)

  def _id_of(self, key: str) -> int:
    token = token_content(self.config.get(key))
    token_id = self._token_id(token)
    if token and token_id < 0:
      raise TokenizerError(f"{CONFIG_FILE}: {key}={token!r} is not in the tokenizer's vocabulary")
    return token_id

  def special_tokens(self) -> dict[str, str | None]:
    """bos/eos/pad/unk token strings (as chat templates see them)."""
    return {k: token_content(self.config.get(k)) for k in
            ('bos_token', 'eos_token', 'pad_token', 'unk_token')}

  # Pickling (grain worker processes) carries the JSON, not the Rust object.
  def __getstate__(self):
    return {'tokenizer_json': self._json, 'config': self.config}

  def __setstate__(self, state):
    self.__init__(state['tokenizer_json'], state['config'])

  def __repr__(self) -> str:
    return (f'HFTokenizer(vocab_size={self.vocab_size}, pad={self.pad_id}, unk={self.unk_id}, '
            f'bos={self.bos_id}, eos={self.eos_id}, fingerprint={self.fingerprint})')

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos (special tokens written in the text are matched)."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and each token's (start, end) character offsets in `text`."""
    enc = self._tok.encode(text, add_special_tokens=False)
    return enc.ids, [tuple(o) for o in enc.offsets]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text (the library's own thread pool)."""
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; special tokens (bos, eos, pad, chat markers) decode to nothing."""
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                            skip_special_tokens=True)

  def id_to_piece(self, token_id: int) -> str:
    return self._tok.id_to_token(int(token_id))

  @property
  def model_proto(self) -> bytes:
    """The one-file form a run saves (tokenizer.json and its config together)."""
    return json.dumps({BUNDLE_KEY: 1, 'tokenizer': json.loads(self._json),
                       'config': self.config}, ensure_ascii=False).encode()

  @classmethod
  def from_bytes(cls, data: bytes, path: str | pathlib.Path | None = None) -> 'HFTokenizer':
    """A bundle, or a tokenizer.json whose tokenizer_config.json is read from beside `path`."""
    try:
      obj = json.loads(data)
      if BUNDLE_KEY in obj:
        return cls(json.dumps(obj['tokenizer']), obj.get('config'))
      config = read_config(epath.Path(path).parent) if path is not None else {}
      return cls(data.decode(), config)
    except TokenizerError:
      raise
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file.
      raise TokenizerError(f'{path}: not a tokenizer.json ({e})') from None

  @classmethod
  def load(cls, path) -> 'HFTokenizer':
    return cls.from_bytes(files.read_bytes(path, 'tokenizer'), path)

  def save(self, path) -> None:
    files.write_bytes(path, self.model_proto)

  def save_pretrained(self, out_dir: str | pathlib.Path) -> None:
    """tokenizer.json + tokenizer_config.json as transformers reads them."""
    out = pathlib.Path(out_dir)
    files.write_bytes(out / 'tokenizer.json', self._json.encode())
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', **self.config}
    files.write_bytes(out / CONFIG_FILE, json.dumps(config, indent=1, ensure_ascii=False).encode())

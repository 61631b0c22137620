"""SentencePiece tokenizers for imported models.

A Hugging Face Llama 2 / Gemma directory ships `tokenizer.model`, which is copied as is. A GGUF
file stores the same vocabulary as metadata (pieces, scores, types, special ids); we rebuild the
SentencePiece ModelProto from it so the data pipeline encodes exactly as the original:

- model type BPE: GGUF's 'llama' tokenizer is SentencePiece BPE (llama.cpp merges by piece score,
  which is what SentencePiece's BPE encoder does);
- GGUF token types use SentencePiece's own enum (NORMAL=1 ... BYTE=6), so they carry over, except
  that llama.cpp marks the unknown piece CONTROL, and SentencePiece needs exactly one UNKNOWN;
- llama.cpp's converter rewrites U+2581 to ' ' in user-defined pieces ("pre-normalize
  user-defined spaces", e.g. Gemma's whitespace-run pieces); SentencePiece matches user-defined
  pieces after escaping spaces, so we spell them back with U+2581;
- llama.cpp also marks CONTROL every token that the Hugging Face tokenizer lists as a special
  added token (Gemma's <start_of_turn>, <end_of_turn>, <unusedN>, <mask>); SentencePiece never
  produces a CONTROL piece from text, while the original model and transformers both encode
  "<start_of_turn>" in text as that one token (Gemma's chat template relies on it). So every
  CONTROL piece except unk/bos/eos/pad becomes USER_DEFINED;
- the normalizer is the identity with whitespace escaping; a dummy prefix only if the file's
  `tokenizer.ggml.add_space_prefix` says so (llama.cpp's default is yes).
"""

from __future__ import annotations

import os
from typing import Sequence

from lm.convert import ConvertError

SPACE = '\u2581'
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _pb():
  from sentencepiece import sentencepiece_model_pb2
  return sentencepiece_model_pb2


def respell_piece(piece: str, piece_type: int) -> str:
  return piece.replace(' ', SPACE) if piece_type == USER_DEFINED else piece


def _sentencepiece_type(gguf_type: int, idx: int, unk_id: int, core: set[int]) -> int:
  if idx == unk_id:
    return UNKNOWN
  if gguf_type in (CONTROL, UNKNOWN):
    return CONTROL if idx in core else USER_DEFINED
  return gguf_type or NORMAL  # 0 is llama.cpp's 'undefined'.


def build_model_proto(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int], *,
                      unk_id: int, bos_id: int = -1, eos_id: int = -1, pad_id: int = -1,
                      add_space_prefix: bool = True) -> bytes:
  """A serialized SentencePiece BPE ModelProto for a GGUF-style vocabulary."""
  pb = _pb()
  n = len(pieces)
  if not (len(scores) == len(types) == n):
    raise ConvertError(f'tokenizer vocabulary: {n} tokens but {len(scores)} scores and '
                       f'{len(types)} types')
  if not 0 <= unk_id < n:
    raise ConvertError(f'tokenizer vocabulary: unknown token id {unk_id} outside [0, {n})')
  core = {unk_id, bos_id, eos_id, pad_id}
  types = [_sentencepiece_type(int(t), i, unk_id, core) for i, t in enumerate(types)]
  proto = pb.ModelProto()
  seen = {}
  for i, (piece, score, t) in enumerate(zip(pieces, scores, types)):
    piece = respell_piece(piece, t)
    if piece in seen:
      raise ConvertError(f'tokenizer vocabulary: piece {piece!r} appears twice '
                         f'(ids {seen[piece]} and {i})')
    seen[piece] = i
    sp = proto.pieces.add()
    sp.piece, sp.score, sp.type = piece, float(score), t
  spec = proto.trainer_spec
  spec.model_type = pb.TrainerSpec.BPE
  spec.vocab_size = n
  spec.byte_fallback = any(t == BYTE for t in types)
  # Whitespace-run pieces ('▁▁') can only be produced when runs of spaces stay one word.
  spec.allow_whitespace_only_pieces = any(
      len(p) > 1 and set(p) == {SPACE} for p in (respell_piece(p, t) for p, t in zip(pieces, types)))
  for name, idx in (('unk', unk_id), ('bos', bos_id), ('eos', eos_id), ('pad', pad_id)):
    valid = 0 <= idx < n
    setattr(spec, f'{name}_id', idx if valid else -1)
    if valid:
      setattr(spec, f'{name}_piece', proto.pieces[idx].piece)
  norm = proto.normalizer_spec
  norm.name = 'identity'
  norm.add_dummy_prefix = bool(add_space_prefix)
  norm.remove_extra_whitespaces = False
  norm.escape_whitespaces = True
  data = proto.SerializeToString()
  _load(data, 'rebuilt tokenizer')  # Let SentencePiece's own validation speak now, not later.
  return data


def _load(data: bytes, where: str):
  import sentencepiece as spm
  try:
    return spm.SentencePieceProcessor(model_proto=data)
  except Exception as e:  # sentencepiece raises RuntimeError/OSError with its own message.
    raise ConvertError(f'{where}: not a valid SentencePiece model ({e})') from None


def write_model(path: str | os.PathLike, data: bytes) -> str:
  with open(path, 'wb') as f:
    f.write(data)
  return str(path)


def check_model_file(path: str | os.PathLike) -> None:
  """ConvertError unless `path` is a SentencePiece model file."""
  if not os.path.isfile(path):
    raise ConvertError(f'{path}: tokenizer file does not exist')
  with open(path, 'rb') as f:
    _load(f.read(), str(path))

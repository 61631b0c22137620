"""Hugging Face <-> lm for the Llama (2/3) and Gemma 3 text families.

Import reads `config.json` and `*.safetensors` (one file, or shards with
`model.safetensors.index.json`) one tensor at a time, straight from the file into the converted
float32 array, so peak host memory is about one copy of the converted weights. The safetensors
format is read here from its header (8-byte length, JSON, raw little-endian data) rather than with
`safetensors.safe_open(framework='np')`, because numpy has no bfloat16 and the released Llama
and Gemma checkpoints are bfloat16; ml_dtypes (a jax dependency) supplies the dtype.

Export writes `config.json` + `model.safetensors` (sharded over 4 GB) that
`transformers.AutoModelForCausalLM.from_pretrained` loads, merging LoRA adapters first
(lm.lora.merge) and unstacking scanned layers.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import struct
import time
from typing import Any

import ml_collections
import ml_dtypes
import numpy as np

from lm.convert import (ConvertError, check_complete, check_tokenizer_fits, checked_to_lm,
                        expected_shapes, fingerprint, is_cached, to_source_layout, write_converted)

CONFIG_JSON = 'config.json'
INDEX_JSON = 'model.safetensors.index.json'
SHARD_BYTES = 4 << 30

_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}

# --------------------------------------------------------------------------- name tables
# Per-layer tensor name (after `model.layers.{i}.`) -> (lm path after `layers_{i}/`, layout).

_ATTENTION = {
    'input_layernorm.weight': ('pre_attn_norm/scale', 'same'),
    'self_attn.q_proj.weight': ('attn/q/kernel', 'in_heads'),
    'self_attn.k_proj.weight': ('attn/k/kernel', 'in_heads'),
    'self_attn.v_proj.weight': ('attn/v/kernel', 'in_heads'),
    'self_attn.o_proj.weight': ('attn/o/kernel', 'out_heads'),
    'mlp.gate_proj.weight': ('mlp/wi_0/kernel', 'linear'),
    'mlp.up_proj.weight': ('mlp/wi_1/kernel', 'linear'),
    'mlp.down_proj.weight': ('mlp/wo/kernel', 'linear'),
}
LAYER_TENSORS = {
    'llama': {**_ATTENTION, 'post_attention_layernorm.weight': ('pre_mlp_norm/scale', 'same')},
    'gemma3': {
        **_ATTENTION,
        'self_attn.q_norm.weight': ('attn/q_norm/scale', 'same'),
        'self_attn.k_norm.weight': ('attn/k_norm/scale', 'same'),
        # Gemma's post_attention_layernorm normalises the attention *output*; Llama's is pre-MLP.
        'post_attention_layernorm.weight': ('post_attn_norm/scale', 'same'),
        'pre_feedforward_layernorm.weight': ('pre_mlp_norm/scale', 'same'),
        'post_feedforward_layernorm.weight': ('post_mlp_norm/scale', 'same'),
    },
}
GLOBAL_TENSORS = {
    'model.embed_tokens.weight': ('embed/embedding', 'same'),
    'model.norm.weight': ('final_norm/scale', 'same'),
    'lm_head.weight': ('lm_head/kernel', 'linear'),
}
# Buffers some checkpoints carry that hold no learned weights.
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)

FAMILY_OF_MODEL_TYPE = {'llama': 'llama', 'gemma3_text': 'gemma3', 'gemma3': 'gemma3'}
_ARCHITECTURE = {'llama': ('llama', 'LlamaForCausalLM'),
                 'gemma3': ('gemma3_text', 'Gemma3ForCausalLM')}


def tensor_table(family: str, n_layers: int, tied: bool) -> dict[str, tuple[str, str]]:
  """HF tensor name -> (lm parameter path, layout) for every parameter of the model."""
  table = {}
  for i in range(n_layers):
    for name, (path, layout) in LAYER_TENSORS[family].items():
      table[f'model.layers.{i}.{name}'] = (f'layers_{i}/{path}', layout)
  for name, (path, layout) in GLOBAL_TENSORS.items():
    if not (tied and path.startswith('lm_head')):
      table[name] = (path, layout)
  return table


# --------------------------------------------------------------------------- config.json -> lm


def read_hf_config(src: pathlib.Path) -> dict[str, Any]:
  path = src / CONFIG_JSON
  if not src.is_dir():
    raise ConvertError(f'{src}: not a directory (expected a Hugging Face model directory)')
  if not path.exists():
    raise ConvertError(f'{path}: missing (a Hugging Face model directory has config.json)')
  try:
    hf = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConvertError(f'{path}: not valid JSON ({e})') from None
  if hf.get('model_type') == 'gemma3' and 'text_config' in hf:
    # The multimodal Gemma 3 checkpoint: we import its language model only.
    hf = {**hf['text_config'], 'model_type': 'gemma3_text', '_multimodal': True}
  return hf


def family_of(hf: dict[str, Any], where: str) -> str:
  model_type = hf.get('model_type')
  if model_type not in FAMILY_OF_MODEL_TYPE:
    raise ConvertError(
        f"{where}: unsupported architecture model_type={model_type!r} "
        f"(supported: {sorted(FAMILY_OF_MODEL_TYPE)})")
  return FAMILY_OF_MODEL_TYPE[model_type]


def _rope_params(hf: dict[str, Any], family: str) -> tuple[dict, dict | None]:
  """(global, local) RoPE parameter dicts from either transformers 5's `rope_parameters` or the
  older `rope_theta` / `rope_scaling` / `rope_local_base_freq` keys."""
  rp = hf.get('rope_parameters')
  if family == 'gemma3':
    if rp and 'full_attention' in rp:
      return dict(rp['full_attention']), dict(rp.get('sliding_attention') or {})
    glob = {'rope_theta': hf.get('rope_theta', 1_000_000.0), **(hf.get('rope_scaling') or {})}
    return glob, {'rope_theta': hf.get('rope_local_base_freq', 10_000.0)}
  if rp:
    return dict(rp), None
  return {'rope_theta': hf.get('rope_theta', 10_000.0), **(hf.get('rope_scaling') or {})}, None


def _set_rope_scaling(m: ml_collections.ConfigDict, rope: dict, where: str) -> None:
  kind = rope.get('rope_type', rope.get('type', 'default'))
  if kind == 'default':
    return
  if kind == 'linear':
    m.rope_scaling, m.rope_scaling_factor = 'linear', float(rope['factor'])
  elif kind == 'llama3':
    m.rope_scaling = 'llama3'
    m.rope_scaling_factor = float(rope['factor'])
    m.rope_low_freq_factor = float(rope['low_freq_factor'])
    m.rope_high_freq_factor = float(rope['high_freq_factor'])
    m.rope_original_max_len = int(rope['original_max_position_embeddings'])
  else:
    raise ConvertError(f"{where}: unsupported RoPE scaling rope_type={kind!r} "
                       "(supported: default, linear, llama3)")


def global_every_of(layer_types: list[str], where: str) -> int:
  """lm's `global_every` for a Gemma 3 layer_types list, which must follow that period."""
  full = [i for i, t in enumerate(layer_types) if t == 'full_attention']
  if not full:
    return 0
  every = full[0] + 1
  want = ['full_attention' if (i + 1) % every == 0 else 'sliding_attention'
          for i in range(len(layer_types))]
  if layer_types != want:
    raise ConvertError(f'{where}: layer_types {layer_types} is not periodic '
                       f'(every {every}th layer global); lm cannot express it')
  return every


def model_config_from_hf(hf: dict[str, Any], where: str = CONFIG_JSON) -> ml_collections.ConfigDict:
  """lm's model config for a Hugging Face Llama or Gemma 3 config.json dict."""
  from lm import config as lm_config

  family = family_of(hf, where)
  try:
    return _model_config(hf, family, where, lm_config.model_config())
  except KeyError as e:
    raise ConvertError(f'{where}: missing key {e.args[0]!r} for model_type '
                       f"{hf.get('model_type')!r}") from None


def _model_config(hf, family, where, m):
  for flag in ('attention_bias', 'mlp_bias'):
    if hf.get(flag):
      raise ConvertError(f'{where}: {flag}=true is not supported (lm has no attention/MLP biases)')
  m.vocab_size = int(hf['vocab_size'])
  m.d_model = int(hf['hidden_size'])
  m.n_layers = int(hf['num_hidden_layers'])
  m.n_heads = int(hf['num_attention_heads'])
  m.n_kv_heads = int(hf.get('num_key_value_heads') or m.n_heads)
  m.head_dim = int(hf.get('head_dim') or m.d_model // m.n_heads)
  m.mlp_dim = int(hf['intermediate_size'])
  m.norm_eps = float(hf.get('rms_norm_eps', 1e-6))
  glob, local = _rope_params(hf, family)
  m.rope_base = float(glob.get('rope_theta', 10_000.0))
  _set_rope_scaling(m, glob, where)
  if family == 'llama':
    act = hf.get('hidden_act', 'silu')
    if act != 'silu':
      raise ConvertError(f"{where}: hidden_act={act!r} is not supported for llama (only 'silu')")
    m.mlp_activation = 'silu'
    m.tie_embeddings = bool(hf.get('tie_word_embeddings', False))
    return m
  # Gemma 3.
  act = hf.get('hidden_activation') or hf.get('hidden_act', 'gelu_pytorch_tanh')
  if act not in ('gelu_pytorch_tanh', 'gelu_tanh'):
    raise ConvertError(f'{where}: hidden_activation={act!r} is not supported for gemma3')
  if hf.get('use_bidirectional_attention'):
    raise ConvertError(f'{where}: use_bidirectional_attention=true is not supported (lm is causal)')
  m.mlp_activation = 'gelu_tanh'
  m.norm_plus_one = m.post_attn_norm = m.post_mlp_norm = m.qk_norm = True
  m.scale_embeddings = True
  m.tie_embeddings = bool(hf.get('tie_word_embeddings', True))
  m.attn_scale = float(hf.get('query_pre_attn_scalar', 256)) ** -0.5
  m.final_logit_softcap = float(hf.get('final_logit_softcapping') or 0.0)
  if hf.get('_multimodal'):
    # transformers' Gemma3ForConditionalGeneration never soft-caps its logits (releases set
    # the cap null anyway); the reference implementation decides.
    m.final_logit_softcap = 0.0
  # attn_logit_softcapping is a Gemma 2 key: Gemma 3 releases set it null and transformers'
  # Gemma3Attention never applies it, so neither do we (matching the reference implementation).
  m.attn_logit_softcap = 0.0
  layer_types = hf.get('layer_types') or [
      'sliding_attention' if (i + 1) % int(hf.get('sliding_window_pattern', 6)) else 'full_attention'
      for i in range(m.n_layers)]
  if len(layer_types) != m.n_layers:
    raise ConvertError(f'{where}: layer_types has {len(layer_types)} entries for '
                       f'num_hidden_layers={m.n_layers}')
  window = hf.get('sliding_window')
  if window and 'sliding_attention' in layer_types:
    m.sliding_window = int(window)
    m.global_every = global_every_of(list(layer_types), where)
    m.rope_local_base = float((local or {}).get('rope_theta', 10_000.0))
    if (local or {}).get('rope_type', 'default') != 'default':
      raise ConvertError(f'{where}: RoPE scaling on sliding-window layers is not supported')
  return m


# --------------------------------------------------------------------------- safetensors


def _read_header(path: pathlib.Path) -> tuple[dict[str, Any], int]:
  """(header dict, byte offset of the data section) of a safetensors file."""
  try:
    with open(path, 'rb') as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise ValueError('shorter than 8 bytes')
      (n,) = struct.unpack('<Q', raw)
      if n > 100 << 20:
        raise ValueError(f'header length {n} is implausible')
      header = json.loads(f.read(n))
  except (ValueError, UnicodeDecodeError, OSError) as e:
    raise ConvertError(f'{path}: not a safetensors file ({e})') from None
  header.pop('__metadata__', None)
  return header, 8 + n


class SafetensorsDir:
  """Lazy view of a model directory's safetensors: which file holds a tensor, and its data."""

  def __init__(self, src: pathlib.Path):
    self.files = self._files(src)
    self.where: dict[str, tuple[pathlib.Path, dict, int]] = {}
    for f in self.files:
      header, data_start = _read_header(f)
      for name, info in header.items():
        self.where[name] = (f, info, data_start)

  @staticmethod
  def _files(src: pathlib.Path) -> list[pathlib.Path]:
    index = src / INDEX_JSON
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())['weight_map']
      except (json.JSONDecodeError, KeyError) as e:
        raise ConvertError(f'{index}: not a safetensors index ({e})') from None
      files = sorted({src / f for f in weight_map.values()})
      for f in files:
        if not f.exists():
          raise ConvertError(f'{index}: lists shard {f.name}, which is missing')
      return files
    files = sorted(src.glob('*.safetensors'))
    if not files:
      others = sorted(p.name for p in src.glob('*.bin')) + sorted(p.name for p in src.glob('*.pt*'))
      hint = f' (found {others}; convert them to safetensors first)' if others else ''
      raise ConvertError(f'{src}: no *.safetensors files{hint}')
    return files

  def names(self) -> list[str]:
    return list(self.where)

  def read(self, name: str) -> np.ndarray:
    """The tensor as float32, read from disk into one fresh array."""
    path, info, data_start = self.where[name]
    dtype_name = info['dtype']
    if dtype_name not in _SAFETENSORS_DTYPES:
      raise ConvertError(f"{path}: tensor '{name}' has unsupported dtype {dtype_name}")
    dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name])
    begin, end = info['data_offsets']
    shape = tuple(info['shape'])
    count = math.prod(shape)
    if end - begin != count * dtype.itemsize:
      raise ConvertError(f"{path}: tensor '{name}' has {end - begin} bytes for shape {shape} "
                         f'{dtype_name}')
    with open(path, 'rb') as f:
      f.seek(data_start + begin)
      x = np.fromfile(f, dtype=dtype.newbyteorder('<'), count=count)
    if x.size != count:
      raise ConvertError(f"{path}: tensor '{name}' is truncated")
    return x.reshape(shape).astype(np.float32, copy=False)

  def source_of(self, name: str) -> str:
    return str(self.where[name][0]) if name in self.where else str(self.files[0].parent)


# Where multimodal Gemma 3 checkpoints nest the language model, and its canonical prefix.
_NESTED_PREFIXES = (('language_model.lm_head.', 'lm_head.'),
                    ('language_model.model.', 'model.'),  # as transformers saves it
                    ('model.language_model.', 'model.'))  # as transformers 4.52+ holds it


def _canonical_names(names: list[str]) -> dict[str, str]:
  """Canonical name (`model.layers...`, `lm_head...`) -> stored name."""
  canonical = {}
  for name in names:
    short = name
    for nested, plain in _NESTED_PREFIXES:
      if name.startswith(nested):
        short = plain + name[len(nested):]
        break
    canonical[short] = name
  return canonical


# --------------------------------------------------------------------------- import


def load_hf_params(src: str | os.PathLike) -> tuple[dict[str, np.ndarray], ml_collections.ConfigDict]:
  """(flat lm params as float32 numpy, lm model config) from a Hugging Face model directory."""
  src = pathlib.Path(src)
  hf = read_hf_config(src)
  m = model_config_from_hf(hf, str(src / CONFIG_JSON))
  family = FAMILY_OF_MODEL_TYPE[hf['model_type']]
  store = SafetensorsDir(src)
  stored_of = _canonical_names(store.names())
  table = tensor_table(family, m.n_layers, m.tie_embeddings)
  shapes = expected_shapes(m)
  params: dict[str, np.ndarray] = {}
  for name, stored in stored_of.items():
    if name in table:
      path, layout = table[name]
      params[path] = checked_to_lm(store.read(stored), layout, shapes[path], stored, path,
                                   store.source_of(stored))
    elif _is_ignorable(name, m, hf):
      continue
    else:
      raise ConvertError(f"{store.source_of(stored)}: unexpected tensor '{stored}' for "
                         f"model_type={hf['model_type']!r} with {m.n_layers} layers")
  by_path = {path: name for name, (path, _) in table.items()}
  check_complete(params, shapes, str(src), lambda p: by_path.get(p, p))
  return params, m


def _is_ignorable(name: str, m, hf) -> bool:
  if name.endswith(_IGNORED_SUFFIXES):
    return True
  # A tied checkpoint may still store lm_head.weight (a copy of the embedding); the tie wins.
  if name == 'lm_head.weight' and m.tie_embeddings:
    return True
  # Multimodal Gemma 3: vision tower and projector are not part of the language model.
  return bool(hf.get('_multimodal')) and ('vision_tower.' in name or
                                          'multi_modal_projector.' in name)


def hf_source_files(src: pathlib.Path) -> list[pathlib.Path]:
  files = [src / CONFIG_JSON, *SafetensorsDir._files(src)]
  return files + [p for p in (src / 'tokenizer.model', src / INDEX_JSON) if p.exists()]


def convert_hf(src: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: str | None = None,
               no_tokenizer: bool = False, force: bool = False, log=print):
  """Hugging Face directory -> lm output directory (checkpoint, tokenizer, config). Cached."""
  src = pathlib.Path(src)
  # Fails early, with one clear message, on a wrong directory, model or tokenizer.
  m = model_config_from_hf(read_hf_config(src), str(src / CONFIG_JSON))
  tokenizer_src = _tokenizer_source(src, tokenizer, no_tokenizer)
  if tokenizer_src:
    check_tokenizer_fits(tokenizer_src, m.vocab_size)
  files = hf_source_files(src) + ([pathlib.Path(tokenizer_src)] if tokenizer_src else [])
  fp = fingerprint(files, {'kind': 'hf', 'tokenizer': tokenizer_src, 'no_tokenizer': no_tokenizer})
  if not force and is_cached(out_dir, fp):
    log(f'{out_dir}: up to date with {src}; nothing to do')
    return None
  start = time.perf_counter()
  params, m = load_hf_params(src)
  seconds, n_tensors = time.perf_counter() - start, len(params)
  cfg = write_converted(out_dir, params, m, tokenizer_src, fp, str(src), seconds)
  log(f'{src} -> {out_dir} ({n_tensors} tensors, {time.perf_counter() - start:.1f}s)')
  return cfg


def _tokenizer_source(src: pathlib.Path, tokenizer: str | None, no_tokenizer: bool) -> str | None:
  if no_tokenizer:
    return None
  if tokenizer:
    from lm.convert import spm
    spm.check_model_file(tokenizer)
    return str(pathlib.Path(tokenizer).resolve())
  candidate = src / 'tokenizer.model'
  if candidate.exists():
    from lm.convert import spm
    spm.check_model_file(str(candidate))
    return str(candidate.resolve())
  raise ConvertError(
      f'{src}: no tokenizer.model (SentencePiece). Llama 3 ships a byte-level BPE tokenizer.json '
      'that SentencePiece cannot express exactly; pass --tokenizer=PATH to a SentencePiece '
      'model, or --no_tokenizer to convert the weights only')


# --------------------------------------------------------------------------- export


def family_of_lm(m: ml_collections.ConfigDict) -> str:
  """Which Hugging Face family an lm model config is exactly equivalent to, or ConvertError."""
  gemma = dict(norm_plus_one=True, post_attn_norm=True, post_mlp_norm=True, qk_norm=True,
               scale_embeddings=True, mlp_activation='gelu_tanh', attn_logit_softcap=0.0)
  llama = dict(norm_plus_one=False, post_attn_norm=False, post_mlp_norm=False, qk_norm=False,
               scale_embeddings=False, mlp_activation='silu', final_logit_softcap=0.0,
               attn_logit_softcap=0.0, sliding_window=0)
  matches = lambda want: all(m[k] == v for k, v in want.items())
  # Llama's attention scale is always 1/sqrt(head_dim); Gemma 3 has no llama3 RoPE scaling.
  default_scale = not m.attn_scale or math.isclose(m.attn_scale, head_dim(m) ** -0.5)
  if matches(gemma) and m.rope_scaling != 'llama3':
    return 'gemma3'
  if matches(llama) and default_scale:
    return 'llama'
  raise ConvertError('model config matches neither Llama (silu, plain RMSNorm, no extra norms) '
                     'nor Gemma 3 (gelu_tanh, (1+w) RMSNorm, post norms, qk-norm, scaled '
                     f'embeddings); cannot export to Hugging Face: {dict(m)}')


def head_dim(m) -> int:
  return m.head_dim or m.d_model // m.n_heads


def hf_config_from_lm(m: ml_collections.ConfigDict, tokenizer=None) -> dict[str, Any]:
  """config.json for an lm model config, in transformers 5's keys plus the older rope keys."""
  family = family_of_lm(m)
  model_type, arch = _ARCHITECTURE[family]
  hf = {
      'architectures': [arch], 'model_type': model_type, 'vocab_size': m.vocab_size,
      'hidden_size': m.d_model, 'intermediate_size': m.mlp_dim, 'num_hidden_layers': m.n_layers,
      'num_attention_heads': m.n_heads, 'num_key_value_heads': m.n_kv_heads,
      'head_dim': head_dim(m), 'rms_norm_eps': m.norm_eps, 'tie_word_embeddings': m.tie_embeddings,
      'attention_bias': False, 'torch_dtype': 'float32', 'dtype': 'float32',
  }
  if tokenizer is not None:
    hf.update(bos_token_id=tokenizer.bos_id(), eos_token_id=tokenizer.eos_id(),
              pad_token_id=tokenizer.pad_id() if tokenizer.pad_id() >= 0 else None)
  glob = {'rope_type': 'default', 'rope_theta': m.rope_base}
  if m.rope_scaling == 'linear':
    glob.update(rope_type='linear', factor=m.rope_scaling_factor)
  elif m.rope_scaling == 'llama3':
    glob.update(rope_type='llama3', factor=m.rope_scaling_factor,
                low_freq_factor=m.rope_low_freq_factor, high_freq_factor=m.rope_high_freq_factor,
                original_max_position_embeddings=m.rope_original_max_len)
  legacy_scaling = ({k: v for k, v in glob.items() if k != 'rope_theta'}
                    if glob['rope_type'] != 'default' else None)
  if family == 'llama':
    hf.update(hidden_act='silu', mlp_bias=False, rope_parameters=glob, rope_theta=m.rope_base,
              rope_scaling=legacy_scaling)
    return hf
  local_base = m.rope_local_base or m.rope_base
  layer_types = [('full_attention' if _is_global(m, i) else 'sliding_attention')
                 for i in range(m.n_layers)]
  hf.update(
      hidden_activation='gelu_pytorch_tanh', query_pre_attn_scalar=_query_pre_attn_scalar(m),
      final_logit_softcapping=m.final_logit_softcap or None,
      sliding_window=m.sliding_window or None, layer_types=layer_types,
      sliding_window_pattern=m.global_every or m.n_layers + 1,
      rope_parameters={'full_attention': glob,
                       'sliding_attention': {'rope_type': 'default', 'rope_theta': local_base}},
      rope_theta=m.rope_base, rope_local_base_freq=local_base, rope_scaling=legacy_scaling)
  return hf


def _is_global(m, layer: int) -> bool:
  from lm import model as lm_model
  return lm_model.layer_is_global(m, layer)


def _query_pre_attn_scalar(m) -> float:
  scale = m.attn_scale or head_dim(m) ** -0.5
  scalar = scale ** -2
  return int(round(scalar)) if math.isclose(scalar, round(scalar), rel_tol=1e-6) else scalar


def hf_tensors_from_lm(flat: dict[str, np.ndarray], m) -> dict[str, np.ndarray]:
  """HF tensor name -> array for flat, unscanned, LoRA-free lm params."""
  family = family_of_lm(m)
  table = tensor_table(family, m.n_layers, m.tie_embeddings)
  unexpected = sorted(set(flat) - {path for path, _ in table.values()})
  if unexpected:
    raise ConvertError(f"lm parameter '{unexpected[0]}' has no Hugging Face {family} equivalent")
  out = {}
  for name, (path, layout) in table.items():
    if path not in flat:
      raise ConvertError(f"checkpoint is missing lm parameter '{path}' (for HF tensor '{name}')")
    out[name] = to_source_layout(np.asarray(flat[path]), layout)
  return out


def write_safetensors(tensors: dict[str, np.ndarray], out: pathlib.Path,
                      shard_bytes: int = SHARD_BYTES) -> list[str]:
  """model.safetensors, or model-0000i-of-0000n.safetensors plus an index past `shard_bytes`."""
  from safetensors.numpy import save_file

  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, x in tensors.items():
    if shards[-1] and size + x.nbytes > shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = x
    size += x.nbytes
  if len(shards) == 1:
    save_file(shards[0], str(out / 'model.safetensors'), metadata={'format': 'pt'})
    return ['model.safetensors']
  names, weight_map = [], {}
  for i, shard in enumerate(shards):
    fname = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    save_file(shard, str(out / fname), metadata={'format': 'pt'})
    names.append(fname)
    weight_map.update({k: fname for k in shard})
  total = sum(x.nbytes for x in tensors.values())
  (out / INDEX_JSON).write_text(json.dumps(
      {'metadata': {'total_size': total}, 'weight_map': weight_map}, indent=1))
  return names


def export_params(flat: dict[str, np.ndarray], cfg: ml_collections.ConfigDict,
                  out_dir: str | os.PathLike, dtype: str = 'float32') -> pathlib.Path:
  """Writes a Hugging Face directory for flat lm params (LoRA merged, layers unstacked)."""
  from lm import lora
  from lm import model as lm_model

  m = cfg.model
  if any(k.endswith('/lora_a') for k in flat):
    flat = lm_model.flatten_params(lora.merge(lm_model.unflatten_params(flat), cfg.finetune))
  if any(k.startswith('layers/') for k in flat):
    flat = lm_model.flatten_params(
        lm_model.unstack_layers(lm_model.unflatten_params(flat), m.n_layers))
  flat = {k: np.asarray(v) for k, v in flat.items()}
  if dtype not in ('float32', 'float16'):
    raise ConvertError(f"--dtype={dtype!r}: export supports 'float32' or 'float16'")
  out = pathlib.Path(out_dir).resolve()
  out.mkdir(parents=True, exist_ok=True)
  tokenizer = None
  if cfg.tokenizer.path and os.path.exists(cfg.tokenizer.path):
    import sentencepiece as spm
    tokenizer = spm.SentencePieceProcessor(model_file=cfg.tokenizer.path)
    shutil.copyfile(cfg.tokenizer.path, out / 'tokenizer.model')
  hf = hf_config_from_lm(m, tokenizer)
  hf['torch_dtype'] = hf['dtype'] = dtype
  tensors = {k: v.astype(dtype) for k, v in hf_tensors_from_lm(flat, m).items()}
  for stale in list(out.glob('*.safetensors')) + [out / INDEX_JSON]:
    stale.unlink(missing_ok=True)
  write_safetensors(tensors, out)
  (out / CONFIG_JSON).write_text(json.dumps(hf, indent=2))
  return out


def export_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike,
                      dtype: str = 'float32', log=print) -> pathlib.Path:
  """lm checkpoint (as written by lm.checkpoint.save_params, or a converted OUT_DIR) -> HF dir."""
  from lm import build
  from lm import model as lm_model
  from lm.convert import resolve_checkpoint

  cfg, params = build.load_checkpoint(resolve_checkpoint(ckpt_dir))
  out = export_params(lm_model.flatten_params(params), cfg, out_dir, dtype)
  log(f'{ckpt_dir} -> {out} (Hugging Face {family_of_lm(cfg.model)})')
  return out

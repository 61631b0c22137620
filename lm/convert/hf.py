"""Hugging Face -> lm for the families in lm.convert.families (Llama, Mistral, Qwen2/3, Gemma 3).

Import reads `config.json` and `*.safetensors` (one file, or shards with
`model.safetensors.index.json`). It first plans every tensor from the file headers (name,
shape, dtype: a wrong or missing tensor fails before anything is written), then Orbax writes
the checkpoint while each tensor is read, put in lm's layout and dropped, one at a time
(lm.convert.streamed), so peak host memory is about the largest tensor plus the interpreter,
not the model. Tensors keep their stored dtype (bf16 in, bf16 out) unless `dtype` asks for
another; `model.param_dtype` in the written config says which.

The tokenizer: `--tokenizer`, else the source's `tokenizer.model` (SentencePiece), else its
`tokenizer.json` (lm.hf_tokenizer). `tokenizer_config.json`, `chat_template.jinja`,
`generation_config.json` and `special_tokens_map.json` are copied too (chat templates, export).

Export (lm -> HF) lives in lm.convert.export; its names are re-exported here.
"""

from __future__ import annotations

import functools
import os
import pathlib
import time
from typing import Any

import ml_collections
import numpy as np

from lm.convert import (ConvertError, check_complete, check_source_shape, check_tokenizer_fits,
                        expected_shapes, fingerprint_unless_cached, spm, to_lm_layout,
                        write_converted)
from lm.convert.families import (CONFIG_JSON, FAMILY_OF_MODEL_TYPE, family_of, family_of_lm,  # noqa: F401
                                 global_every_of, hf_config_from_lm, model_config_from_hf,
                                 tensor_table)
from lm.convert.export import export_checkpoint, export_params  # noqa: F401
from lm.convert.safetensors_io import INDEX_JSON, SafetensorsDir
from lm.convert.streamed import StreamedTensor
from lm.files import read_json

# Files beside the weights that describe the tokenizer and generation; copied on import.
TOKENIZER_SIDE_FILES = ('tokenizer_config.json', 'chat_template.jinja', 'generation_config.json',
                        'special_tokens_map.json')
# Buffers some checkpoints carry that hold no learned weights.
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)
_FLOAT_DTYPES = ('float32', 'bfloat16', 'float16')


def read_hf_config(src: pathlib.Path) -> dict[str, Any]:
  path = src / CONFIG_JSON
  if not src.is_dir():
    raise ConvertError(f'{src}: not a directory (expected a Hugging Face model directory)')
  if not path.exists():
    raise ConvertError(f'{path}: missing (a Hugging Face model directory has config.json)')
  hf = read_json(path, ConvertError)
  if hf.get('model_type') == 'gemma3' and 'text_config' in hf:
    # The multimodal Gemma 3 checkpoint: we import its language model only.
    hf = {**hf['text_config'], 'model_type': 'gemma3_text', '_multimodal': True}
  return hf


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


def _is_ignorable(name: str, m, hf) -> bool:
  if name.endswith(_IGNORED_SUFFIXES):
    return True
  # A tied checkpoint may still store lm_head.weight (a copy of the embedding); the tie wins.
  if name == 'lm_head.weight' and m.tie_embeddings:
    return True
  # Multimodal Gemma 3: vision tower and projector are not part of the language model.
  return bool(hf.get('_multimodal')) and ('vision_tower.' in name or
                                          'multi_modal_projector.' in name)


def _produce(store: SafetensorsDir, stored: str, layout: str, lm_shape, dtype) -> np.ndarray:
  return to_lm_layout(store.read(stored), layout, lm_shape).astype(dtype, copy=False)


def plan_hf_params(src: str | os.PathLike, dtype: str | None = None
                   ) -> tuple[dict[str, StreamedTensor], ml_collections.ConfigDict]:
  """(flat lm params as StreamedTensors, lm model config), checked from the headers alone.

  Every parameter gets one dtype: `dtype`, or else the stored dtype of the embedding table
  (a bf16 release may keep a few f32 buffers); `model.param_dtype` records it.
  """
  src = pathlib.Path(src)
  hf = read_hf_config(src)
  m = model_config_from_hf(hf, str(src / CONFIG_JSON))
  family = FAMILY_OF_MODEL_TYPE[hf['model_type']]
  store = SafetensorsDir(src)
  stored_of = _canonical_names(store.names())
  table = tensor_table(family, m)
  shapes = expected_shapes(m)
  if dtype is None:
    embed = stored_of.get('model.embed_tokens.weight')
    dtype = store.dtype(embed).name if embed else 'float32'
  if dtype not in _FLOAT_DTYPES:
    raise ConvertError(f'--dtype={dtype!r}: must be one of {_FLOAT_DTYPES}')
  m.param_dtype = dtype
  params: dict[str, StreamedTensor] = {}
  for name, stored in stored_of.items():
    if name in table:
      path, layout = table[name]
      check_source_shape(store.shape(stored), layout, shapes[path], stored, path,
                         store.source_of(stored))
      store.dtype(stored)  # Fails here, naming the tensor, on a dtype numpy cannot hold.
      params[path] = StreamedTensor(shapes[path], np.dtype(dtype), functools.partial(
          _produce, store, stored, layout, shapes[path], np.dtype(dtype)))
    elif _is_ignorable(name, m, hf):
      continue
    else:
      raise ConvertError(f"{store.source_of(stored)}: unexpected tensor '{stored}' for "
                         f"model_type={hf['model_type']!r} with {m.n_layers} layers")
  by_path = {path: name for name, (path, _) in table.items()}
  check_complete(params, shapes, str(src), lambda p: by_path.get(p, p))
  return params, m


def load_hf_params(src: str | os.PathLike, dtype: str | None = None
                   ) -> tuple[dict[str, np.ndarray], ml_collections.ConfigDict]:
  """(flat lm params as numpy, lm model config): the whole model in memory, for tests and tools."""
  planned, m = plan_hf_params(src, dtype)
  return {path: t.load() for path, t in planned.items()}, m


def hf_source_files(src: pathlib.Path) -> list[pathlib.Path]:
  files = [src / CONFIG_JSON, *SafetensorsDir.list_files(src)]
  return files + [p for p in (src / INDEX_JSON,) if p.exists()]


def _side_files(src: pathlib.Path) -> list[pathlib.Path]:
  return [src / name for name in TOKENIZER_SIDE_FILES if (src / name).exists()]


def convert_hf(src: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: str | None = None,
               no_tokenizer: bool = False, force: bool = False, log=print,
               dtype: str | None = None):
  """Hugging Face directory -> lm output directory (checkpoint, tokenizer, config). Cached."""
  src = pathlib.Path(src)
  # Fails early, with one clear message, on a wrong directory, model or tokenizer.
  m = model_config_from_hf(read_hf_config(src), str(src / CONFIG_JSON))
  tokenizer_src = _tokenizer_source(src, tokenizer, no_tokenizer)
  side = [] if no_tokenizer else _side_files(src)
  if tokenizer_src:
    check_tokenizer_fits(tokenizer_src, m.vocab_size)
  files = hf_source_files(src) + side + ([pathlib.Path(tokenizer_src)] if tokenizer_src else [])
  fp = fingerprint_unless_cached(out_dir, files, {'kind': 'hf', 'tokenizer': tokenizer_src,
                                                  'no_tokenizer': no_tokenizer, 'dtype': dtype},
                                 src, force, log)
  if fp is None:
    return None
  start = time.perf_counter()
  params, m = plan_hf_params(src, dtype)
  n_tensors = len(params)
  cfg = write_converted(out_dir, params, m, tokenizer_src, fp, str(src),
                        time.perf_counter() - start, extra_files=side)
  log(f'{src} -> {out_dir} ({n_tensors} tensors, {m.param_dtype}, '
      f'{time.perf_counter() - start:.1f}s)')
  return cfg


def _tokenizer_source(src: pathlib.Path, tokenizer: str | None, no_tokenizer: bool) -> str | None:
  if no_tokenizer:
    return None
  if tokenizer:
    path = pathlib.Path(tokenizer).resolve()
    if not path.exists():
      raise ConvertError(f'--tokenizer={tokenizer}: no such file')
    if path.suffix != '.json':
      spm.check_model_file(str(path))
    return str(path)
  candidate = src / 'tokenizer.model'
  if candidate.exists():
    spm.check_model_file(str(candidate))
    return str(candidate.resolve())
  if (src / 'tokenizer.json').exists():
    return str((src / 'tokenizer.json').resolve())
  raise ConvertError(
      f'{src}: no tokenizer.model (SentencePiece) or tokenizer.json; pass --tokenizer=PATH to '
      'one, or --no_tokenizer to convert the weights only')

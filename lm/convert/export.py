"""lm -> Hugging Face: config.json, safetensors (bf16 by default), tokenizer and generation files.

`export_checkpoint` streams: it plans the safetensors files from the checkpoint's metadata, then
reads one parameter at a time from Orbax (one stacked leaf at a time for scanned layers), folds
its LoRA adapters in (lm.lora.merge on that tensor alone), converts it to the HF layout and dtype
and writes it, so host memory holds about one tensor, not the model. `export_params` does the
same for params already in memory.

Beside the weights it writes what `AutoTokenizer` and `generate()` read: `tokenizer.json` +
`tokenizer_config.json` for a tokenizer.json model (special tokens and chat template kept),
`tokenizer.model` + `tokenizer_config.json` for SentencePiece, and `generation_config.json`
(the source's, when the model was imported with one; else built from the special ids).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
from typing import Any, Callable

import ml_collections
import numpy as np

from lm import checkpoint, lora
from lm import model as lm_model
from lm import tokenizer as lm_tokenizer
from lm.convert import ConvertError, resolve_checkpoint, source_shape, to_source_layout
from lm.convert.families import (ARCHITECTURE, CONFIG_JSON, family_of_lm, hf_config_from_lm,
                                 tensor_table)
from lm.convert.safetensors_io import remove_stale, write_streaming

EXPORT_DTYPES = ('bfloat16', 'float32', 'float16')
_SP_TOKENIZER_CLASS = {'gemma3': 'GemmaTokenizer'}  # Others: LlamaTokenizer.


def _check_dtype(dtype: str) -> np.dtype:
  if dtype not in EXPORT_DTYPES:
    raise ConvertError(f'--dtype={dtype!r}: export supports {EXPORT_DTYPES}')
  import ml_dtypes
  return np.dtype(ml_dtypes.bfloat16) if dtype == 'bfloat16' else np.dtype(dtype)


class _ParamSource:
  """One lm parameter at a time (unstacked, LoRA merged) from `read(paths) -> {path: array}`."""

  def __init__(self, shapes: dict[str, tuple], read: Callable[[list[str]], dict[str, Any]],
               finetune: ml_collections.ConfigDict):
    self.shapes, self._read, self.finetune = shapes, read, finetune
    self.scanned = any(p.startswith('layers/') for p in shapes)
    self._cache: dict[str, np.ndarray] = {}

  def _stored_path(self, path: str) -> tuple[str, int | None]:
    match = re.fullmatch(r'layers_(\d+)/(.*)', path)
    if self.scanned and match:
      return f'layers/{match.group(2)}', int(match.group(1))
    return path, None

  def _get(self, stored: str) -> np.ndarray:
    if not stored.startswith('layers/'):  # Read once, used once: nothing to keep.
      return np.asarray(self._read([stored])[stored])
    if stored not in self._cache:  # A stacked leaf serves every layer: keep it meanwhile.
      if len(self._cache) >= 3:  # One stacked kernel and its two adapters at most.
        self._cache.pop(next(iter(self._cache)))
      self._cache[stored] = np.asarray(self._read([stored])[stored])
    return self._cache[stored]

  def _one(self, path: str) -> np.ndarray:
    stored, layer = self._stored_path(path)
    x = self._get(stored)
    return x if layer is None else x[layer]

  def has(self, path: str) -> bool:
    return self._stored_path(path)[0] in self.shapes

  def read(self, path: str) -> np.ndarray:
    if not self.has(path):
      raise ConvertError(f"checkpoint is missing lm parameter '{path}'")
    module = path[:-len('/kernel')] if path.endswith('/kernel') else None
    if module is None or not self.has(f'{module}/lora_a'):
      return self._one(path)
    kernel = self._one(path)
    tree = {'m': {'kernel': kernel, 'lora_a': self._one(f'{module}/lora_a'),
                  'lora_b': self._one(f'{module}/lora_b')}}
    return np.asarray(lora.merge(tree, self.finetune)['m']['kernel'])

  def base_paths(self, n_layers: int) -> set[str]:
    """Unstacked parameter paths, adapters excluded."""
    paths = set()
    for p in self.shapes:
      if p.endswith(('/lora_a', '/lora_b')):
        continue
      if self.scanned and p.startswith('layers/'):
        paths.update(f'layers_{i}/{p[len("layers/"):]}' for i in range(n_layers))
      else:
        paths.add(p)
    return paths


def _write_weights(source: _ParamSource, m, out: pathlib.Path, dtype: np.dtype) -> None:
  family = family_of_lm(m)
  table = tensor_table(family, m)
  unexpected = sorted(source.base_paths(m.n_layers) - {path for path, _ in table.values()})
  if unexpected:
    raise ConvertError(f"lm parameter '{unexpected[0]}' has no Hugging Face {family} equivalent")
  items = list(table.items())
  if source.scanned:  # Every layer's slice of one stacked leaf, then the next leaf.
    items.sort(key=lambda kv: (re.sub(r'^layers_\d+/', '', kv[1][0]), kv[0]))
  entries = []
  for name, (path, layout) in items:
    stored, layer = source._stored_path(path)
    if stored not in source.shapes:
      raise ConvertError(f"checkpoint is missing lm parameter '{path}' (for HF tensor '{name}')")
    lm_shape = source.shapes[stored][1:] if layer is not None else source.shapes[stored]
    entries.append((name, source_shape(layout, tuple(lm_shape)), dtype))
  layout_of = dict(table.values())
  path_of = {name: path for name, (path, _) in table.items()}
  remove_stale(out)
  write_streaming(out, entries, lambda name: to_source_layout(
      source.read(path_of[name]), layout_of[path_of[name]]).astype(dtype, copy=False))


# --------------------------------------------------------------------------- tokenizer files


def _special_ids(tokenizer) -> dict[str, Any]:
  if tokenizer is None:
    return {}
  ids = {'bos_token_id': tokenizer.bos_id, 'eos_token_id': tokenizer.eos_id,
         'pad_token_id': tokenizer.pad_id}
  return {k: (v if v is not None and v >= 0 else None) for k, v in ids.items()}


def _write_tokenizer(cfg, out: pathlib.Path, family: str):
  """Writes the tokenizer files; returns the lm Tokenizer (None without one)."""
  path = cfg.tokenizer.path
  if not path or not os.path.exists(path):
    return None
  tok = lm_tokenizer.Tokenizer.load(path)
  src_dir = pathlib.Path(path).parent
  if hasattr(tok, 'save_pretrained'):  # tokenizer.json (lm.hf_tokenizer)
    tok.save_pretrained(out)
  else:
    shutil.copyfile(path, out / 'tokenizer.model')
    piece = lambda i: tok.id_to_piece(i) if i >= 0 else None
    config = {'tokenizer_class': _SP_TOKENIZER_CLASS.get(family, 'LlamaTokenizer'),
              'bos_token': piece(tok.bos_id), 'eos_token': piece(tok.eos_id),
              'unk_token': piece(tok.unk_id), 'pad_token': piece(tok.pad_id),
              'add_bos_token': tok.bos_id >= 0, 'add_eos_token': False}
    side = src_dir / 'tokenizer_config.json'
    if side.exists():  # The imported model's own settings (its chat template, say) win.
      config.update({k: v for k, v in json.loads(side.read_text()).items()
                     if k not in ('tokenizer_class', 'auto_map')})
    (out / 'tokenizer_config.json').write_text(json.dumps(config, indent=1, ensure_ascii=False))
  if (src_dir / 'chat_template.jinja').exists():
    shutil.copyfile(src_dir / 'chat_template.jinja', out / 'chat_template.jinja')
  return tok


def _write_generation_config(cfg, out: pathlib.Path, special: dict[str, Any]) -> None:
  src = pathlib.Path(cfg.tokenizer.path).parent / 'generation_config.json' if cfg.tokenizer.path else None
  if src is not None and src.exists():
    shutil.copyfile(src, out / 'generation_config.json')
    return
  (out / 'generation_config.json').write_text(json.dumps(
      {**{k: v for k, v in special.items() if v is not None}, 'transformers_version': '5'}, indent=1))


def _write_hf_dir(source: _ParamSource, cfg, out_dir, dtype: str) -> pathlib.Path:
  np_dtype = _check_dtype(dtype)
  m = cfg.model
  family = family_of_lm(m)  # Fails before anything is written.
  out = pathlib.Path(out_dir).resolve()
  out.mkdir(parents=True, exist_ok=True)
  tokenizer = _write_tokenizer(cfg, out, family)
  special = _special_ids(tokenizer)
  hf = hf_config_from_lm(m, special)
  hf['torch_dtype'] = hf['dtype'] = dtype
  _write_weights(source, m, out, np_dtype)
  _write_generation_config(cfg, out, special)
  (out / CONFIG_JSON).write_text(json.dumps(hf, indent=2))
  return out


def export_params(flat: dict[str, Any], cfg: ml_collections.ConfigDict,
                  out_dir: str | os.PathLike, dtype: str = 'bfloat16') -> pathlib.Path:
  """Writes a Hugging Face directory for flat lm params in memory (scanned or not, LoRA or not)."""
  shapes = {k: tuple(np.shape(v)) for k, v in flat.items()}
  source = _ParamSource(shapes, lambda paths: {p: flat[p] for p in paths}, cfg.finetune)
  return _write_hf_dir(source, cfg, out_dir, dtype)


def export_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike,
                      dtype: str = 'bfloat16', log=print) -> pathlib.Path:
  """lm checkpoint (a run's, or a converted OUT_DIR) -> HF dir, one tensor in memory at a time."""
  ckpt = resolve_checkpoint(ckpt_dir)
  directory, step = checkpoint.resolve(ckpt)
  _, problem = checkpoint.verify_step(directory / str(step))
  if problem:
    raise ConvertError(f'checkpoint {directory / str(step)} is corrupt: {problem}')
  cfg = checkpoint.read_config(ckpt)
  meta = checkpoint.params_metadata(ckpt)
  shapes = {p: shape for p, (shape, _) in meta.items()}
  source = _ParamSource(shapes, lambda paths: _read_params(directory / str(step), paths),
                        cfg.finetune)
  out = _write_hf_dir(source, cfg, out_dir, dtype)
  log(f'{ckpt_dir} -> {out} (Hugging Face {ARCHITECTURE[family_of_lm(cfg.model)][1]}, {dtype})')
  return out


def _read_params(step_dir: pathlib.Path, paths: list[str]) -> dict[str, np.ndarray]:
  """Only `paths` of a checkpoint's params, as numpy, whatever they were saved as."""
  import orbax.checkpoint as ocp


  target = {'params': lm_model.unflatten_params({p: 0 for p in paths})}
  restore_args = {'params': lm_model.unflatten_params(
      {p: ocp.RestoreArgs(restore_type=np.ndarray) for p in paths})}
  restored = ocp.PyTreeCheckpointHandler().restore(
      step_dir / checkpoint.STATE,
      args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
  return lm_model.flatten_params(restored['params'])

"""Import pretrained models into lm (Hugging Face safetensors, GGUF) and export them back.

    python -m lm.convert hf   SRC_DIR OUT_DIR      # config.json + *.safetensors -> lm checkpoint
    python -m lm.convert gguf SRC.gguf OUT_DIR     # GGUF (dequantised)         -> lm checkpoint
    python -m lm.convert export CKPT_DIR OUT_DIR   # lm checkpoint (LoRA merged) -> HF directory
    python -m lm.convert bench [--gb=2]            # peak RSS / time of import and export

An imported OUT_DIR holds the Orbax checkpoint (lm.checkpoint.save_params), the tokenizer
(`tokenizer.model` SentencePiece, or `tokenizer.json` with its `tokenizer_config.json` when the
source ships no SentencePiece model; either encodes exactly as the source), `config.py` (a full lm config file for
train.py/finetune.py) and `convert.json`, written last: it fingerprints the source, so a re-run
with the same source and options is a no-op, and a half-written conversion is never mistaken for
a finished one.

This module holds what both importers share: the error type, the tensor layouts that map a
source tensor [out, in] onto lm's einsum kernels, the expected parameter shapes, and the writer.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import time
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm import checkpoint
from lm import config as lm_config
from lm import model as lm_model
from lm import tokenizer as lm_tokenizer
from lm.convert import streamed
from lm.errors import UserError

CONVERTER_VERSION = 2  # Bump when the output of a conversion changes, to invalidate caches.
MANIFEST = 'convert.json'
TOKENIZER_FILE = 'tokenizer.model'
CONFIG_FILE = 'config.py'
CHECKPOINT_DIR = 'checkpoint'


class ConvertError(UserError, ValueError):
  """A user-caused conversion problem; the message names the file, tensor or parameter path."""


# --------------------------------------------------------------------------- tensor layouts
# Hugging Face and GGUF store a linear layer as [out, in] (GGUF's reader yields the same numpy
# order); lm stores einsum kernels as in_shape + out_shape with heads split out. Each layout is a
# pair of pure functions plus the source shape it implies, so import, export and shape checks
# share one definition.

def _source_shape(layout: str, lm_shape: tuple[int, ...]) -> tuple[int, ...]:
  if layout == 'same':
    return tuple(lm_shape)
  if layout == 'linear':  # lm [in, out]  <- [out, in]
    return tuple(lm_shape[::-1])
  if layout == 'in_heads':  # lm [D, H, Dh]  <- [H*Dh, D]
    d, h, dh = lm_shape
    return (h * dh, d)
  if layout == 'out_heads':  # lm [H, Dh, D]  <- [D, H*Dh]
    h, dh, d = lm_shape
    return (d, h * dh)
  if layout == 'flat':  # lm [H, Dh]  <- [H*Dh] (q/k/v biases)
    return (math.prod(lm_shape),)
  raise AssertionError(layout)


def to_lm_layout(x: np.ndarray, layout: str, lm_shape: tuple[int, ...]) -> np.ndarray:
  if layout == 'same':
    return x
  if layout == 'flat':
    return x.reshape(lm_shape)
  if layout in ('linear', 'in_heads', 'out_heads'):
    # A transpose then a reshape; ascontiguousarray so the copy happens here, one tensor at a time.
    return np.ascontiguousarray(x.T).reshape(lm_shape)
  raise AssertionError(layout)


def to_source_layout(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == 'same':
    return x
  if layout == 'linear':
    return np.ascontiguousarray(x.T)
  if layout == 'flat':
    return x.reshape(-1)
  if layout == 'in_heads':
    return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
  if layout == 'out_heads':
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)
  raise AssertionError(layout)


def _on_device(params_flat: dict[str, Any]) -> dict[str, Any]:
  """Moves arrays to jax one at a time, emptying `params_flat` as it goes: Orbax saves numpy
  arrays through extra host copies (+1.4 GB for Gemma 3 270M) but jax arrays without.
  StreamedTensors stay as they are: Orbax produces and writes them one at a time."""
  streamed.register()
  return {k: v if isinstance(v, streamed.StreamedTensor) else jax.device_put(v)
          for k, v in ((k, params_flat.pop(k)) for k in list(params_flat))}


def check_source_shape(shape: tuple[int, ...], layout: str, lm_shape: tuple[int, ...],
                       tensor: str, path: str, source: str) -> None:
  """A ConvertError naming the tensor, file and parameter path unless the shapes agree."""
  want = _source_shape(layout, lm_shape)
  if tuple(shape) != want:
    raise ConvertError(
        f"{source}: tensor '{tensor}' has shape {tuple(shape)}, expected {want} for lm "
        f"parameter '{path}' {tuple(lm_shape)}")


def checked_to_lm(x: np.ndarray, layout: str, lm_shape: tuple[int, ...], tensor: str,
                  path: str, source: str) -> np.ndarray:
  """The tensor in lm's layout, or a ConvertError naming the tensor, file and parameter path."""
  check_source_shape(x.shape, layout, lm_shape, tensor, path, source)
  return to_lm_layout(x, layout, lm_shape)


def source_shape(layout: str, lm_shape: tuple[int, ...]) -> tuple[int, ...]:
  return _source_shape(layout, lm_shape)


# --------------------------------------------------------------------------- lm side


def expected_shapes(model_cfg) -> dict[str, tuple[int, ...]]:
  """Every parameter path of the (unscanned, LoRA-free) model and its shape, without allocating."""
  model = lm_model.build_model(model_cfg)
  tokens = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))['params']
  flat = lm_model.flatten_params(nn.meta.unbox(shapes))
  return {path: tuple(s.shape) for path, s in flat.items()}


def check_complete(params: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                   source: str, source_name_of: Callable[[str], str]) -> None:
  missing = sorted(set(shapes) - set(params))
  if missing:
    raise ConvertError(
        f"{source}: missing tensor '{source_name_of(missing[0])}' (lm parameter '{missing[0]}')"
        + (f' and {len(missing) - 1} more' if len(missing) > 1 else ''))


# --------------------------------------------------------------------------- caching


def fingerprint(files: Iterable[str | os.PathLike], options: dict[str, Any]) -> dict[str, Any]:
  """What a conversion's output depends on: source files (path, size, mtime) and the options.

  Size and mtime rather than a content hash, so checking the cache of a 16 GB model is instant.
  """
  entries = []
  for f in sorted(str(pathlib.Path(f).resolve()) for f in files):
    st = os.stat(f)
    entries.append([f, st.st_size, st.st_mtime_ns])
  return {'version': CONVERTER_VERSION, 'files': entries, 'options': options}


def is_cached(out_dir: str | os.PathLike, fp: dict[str, Any]) -> bool:
  manifest = pathlib.Path(out_dir) / MANIFEST
  if not manifest.exists() or not (pathlib.Path(out_dir) / CHECKPOINT_DIR).is_dir():
    return False
  try:
    return json.loads(manifest.read_text()).get('fingerprint') == fp
  except (json.JSONDecodeError, OSError):
    return False


def fingerprint_unless_cached(out_dir: str | os.PathLike, files: Iterable[str | os.PathLike],
                              options: dict[str, Any], source, force: bool,
                              log: Callable) -> dict[str, Any] | None:
  """The conversion's fingerprint, or None (said in a log line) when out_dir holds its output."""
  fp = fingerprint(files, options)
  if not force and is_cached(out_dir, fp):
    log(f'{out_dir}: up to date with {source}; nothing to do')
    return None
  return fp


# --------------------------------------------------------------------------- writing


def lm_config_for(model_cfg, tokenizer_path: str | None, ckpt_dir: pathlib.Path):
  """A full lm config: base defaults with the imported model, its tokenizer and restore_from."""
  cfg = lm_config.base_config()
  cfg.model = model_cfg
  cfg.name = ckpt_dir.parent.name
  if tokenizer_path:
    cfg.tokenizer.path = tokenizer_path
    cfg.tokenizer.vocab_size = tokenizer_size(tokenizer_path)
  cfg.finetune.restore_from = str(ckpt_dir)
  return cfg


def config_file_text(cfg, source: str) -> str:
  """A config file (nanoGPT style: base_config() plus overrides) for --config=OUT_DIR/config.py."""
  lines = [f'"""lm config for a model imported by lm.convert from {source}."""', '',
           'from lm import config as lm_config', '', '', 'def get_config():',
           '  cfg = lm_config.base_config()', f'  cfg.name = {cfg.name!r}']
  for key, value in cfg.model.items():
    lines.append(f'  cfg.model.{key} = {value!r}')
  lines.append(f'  cfg.tokenizer.path = {cfg.tokenizer.path!r}')
  lines.append(f'  cfg.tokenizer.vocab_size = {cfg.tokenizer.vocab_size!r}')
  lines.append(f'  cfg.finetune.restore_from = {cfg.finetune.restore_from!r}')
  lines.append('  return cfg')
  return '\n'.join(lines) + '\n'


def tokenizer_size(tokenizer_path: str) -> int:
  """Vocabulary size of a SentencePiece model or tokenizer.json (lm.tokenizer picks which)."""
  try:
    return lm_tokenizer.Tokenizer.load(tokenizer_path).vocab_size
  except (ValueError, RuntimeError, OSError) as e:  # What both libraries raise on a bad file.
    raise ConvertError(f'{tokenizer_path}: not a tokenizer ({e})') from None


def check_tokenizer_fits(tokenizer_path: str, vocab_size: int) -> None:
  """A tokenizer may have fewer pieces than embedding rows (padded tables), never more."""
  pieces = tokenizer_size(tokenizer_path)
  if pieces > vocab_size:
    raise ConvertError(f'{tokenizer_path}: tokenizer has {pieces} pieces but the model has '
                       f'{vocab_size} embedding rows')


def write_converted(out_dir: str | os.PathLike, params_flat: dict[str, Any], model_cfg,
                    tokenizer_path: str | None, fp: dict[str, Any], source: str,
                    seconds: float | None = None, extra_files: Iterable[pathlib.Path] = ()) -> Any:
  """Saves checkpoint, tokenizer, config file and (last) the manifest; returns the lm config.

  Empties `params_flat` (arrays move to jax one at a time; StreamedTensors are produced one at
  a time while Orbax writes). `extra_files` (tokenizer_config.json, generation_config.json, ...)
  are copied beside the tokenizer, first, since the tokenizer reads its special tokens there.
  """
  out = pathlib.Path(out_dir).resolve()
  out.mkdir(parents=True, exist_ok=True)
  (out / MANIFEST).unlink(missing_ok=True)  # Invalid until everything below is written.
  for extra in extra_files:
    if pathlib.Path(extra).resolve() != (out / pathlib.Path(extra).name):
      shutil.copyfile(extra, out / pathlib.Path(extra).name)
  tok = None
  if tokenizer_path:
    is_json = str(tokenizer_path).endswith('.json')
    tok = str(out / ('tokenizer.json' if is_json else TOKENIZER_FILE))
    if pathlib.Path(tokenizer_path).resolve() != pathlib.Path(tok):
      shutil.copyfile(tokenizer_path, tok)
  ckpt_dir = out / CHECKPOINT_DIR
  cfg = lm_config_for(model_cfg, tok, ckpt_dir)
  if ckpt_dir.exists():
    shutil.rmtree(ckpt_dir)  # A stale or half-written checkpoint from an earlier run.
  checkpoint.save_params(ckpt_dir, lm_model.unflatten_params(_on_device(params_flat)), cfg)
  (out / CONFIG_FILE).write_text(config_file_text(cfg, source))
  manifest = {'fingerprint': fp, 'source': source, 'seconds': seconds,
              'created': time.strftime('%Y-%m-%dT%H:%M:%S')}
  (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
  return cfg


def resolve_checkpoint(path: str | os.PathLike) -> str:
  """A conversion's OUT_DIR stands for its checkpoint/ subdirectory; other paths (an lm
  checkpoint, a run's workdir) pass through to lm.checkpoint."""
  p = pathlib.Path(path).expanduser().resolve()
  if (p / MANIFEST).exists() and (p / CHECKPOINT_DIR).is_dir():
    return str(p / CHECKPOINT_DIR)
  if not p.exists():
    raise ConvertError(f'{p}: checkpoint directory does not exist')
  return str(p)

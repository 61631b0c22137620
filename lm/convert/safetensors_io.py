"""Reading and writing safetensors one tensor at a time, in the stored dtype.

The format is 8 bytes of little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then raw little-endian data. lm reads and writes it directly rather than with
`safetensors.safe_open(framework='np')` / `save_file`, because numpy has no bfloat16 (released
checkpoints are bfloat16; ml_dtypes, a jax dependency, supplies the dtype) and because `save_file`
needs every tensor of a file in memory at once, while lm writes each tensor as it is produced.
"""

from __future__ import annotations

import json
import math
import pathlib
import struct
from typing import Any, Callable, Iterable

import ml_dtypes
import numpy as np

from lm.convert import ConvertError

INDEX_JSON = 'model.safetensors.index.json'
SHARD_BYTES = 4 << 30  # Shard exports past this size, as transformers does (5 GB) but smaller.
_HEADER_ALIGN = 8

DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}
DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def read_header(path: pathlib.Path) -> tuple[dict[str, Any], int]:
  """(header dict without __metadata__, byte offset of the data section) of a safetensors file."""
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
    self.files = self.list_files(src)
    self.where: dict[str, tuple[pathlib.Path, dict, int]] = {}
    for f in self.files:
      header, data_start = read_header(f)
      for name, info in header.items():
        self.where[name] = (f, info, data_start)

  @staticmethod
  def list_files(src: pathlib.Path) -> list[pathlib.Path]:
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

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.where[name][1]['shape'])

  def dtype(self, name: str) -> np.dtype:
    path, info, _ = self.where[name]
    if info['dtype'] not in DTYPES:
      raise ConvertError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
    return np.dtype(DTYPES[info['dtype']])

  def read(self, name: str) -> np.ndarray:
    """The tensor in its stored dtype, read from disk into one fresh array."""
    path, info, data_start = self.where[name]
    dtype = self.dtype(name)
    begin, end = info['data_offsets']
    shape = self.shape(name)
    count = math.prod(shape)
    if end - begin != count * dtype.itemsize:
      raise ConvertError(f"{path}: tensor '{name}' has {end - begin} bytes for shape {shape} "
                         f"{info['dtype']}")
    with open(path, 'rb') as f:
      f.seek(data_start + begin)
      x = np.fromfile(f, dtype=dtype.newbyteorder('<'), count=count)
    if x.size != count:
      raise ConvertError(f"{path}: tensor '{name}' is truncated")
    return x.reshape(shape)

  def source_of(self, name: str) -> str:
    return str(self.where[name][0]) if name in self.where else str(self.files[0].parent)


# --------------------------------------------------------------------------- writing


def _header_bytes(entries: list[tuple[str, tuple[int, ...], np.dtype]]) -> bytes:
  header, offset = {}, 0
  for name, shape, dtype in entries:
    size = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {'dtype': DTYPE_NAMES[np.dtype(dtype)], 'shape': list(shape),
                    'data_offsets': [offset, offset + size]}
    offset += size
  header['__metadata__'] = {'format': 'pt'}  # transformers refuses files without it.
  raw = json.dumps(header, separators=(',', ':')).encode()
  return raw + b' ' * (-len(raw) % _HEADER_ALIGN)


def plan_shards(entries: list[tuple[str, tuple[int, ...], np.dtype]],
                shard_bytes: int = SHARD_BYTES) -> list[list[tuple[str, tuple[int, ...], np.dtype]]]:
  """Tensors grouped into files of at most shard_bytes (a bigger tensor gets a file of its own)."""
  shards: list[list] = [[]]
  size = 0
  for entry in entries:
    nbytes = math.prod(entry[1]) * np.dtype(entry[2]).itemsize
    if shards[-1] and size + nbytes > shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += nbytes
  return shards


def write_streaming(out: pathlib.Path, entries: list[tuple[str, tuple[int, ...], np.dtype]],
                    produce: Callable[[str], np.ndarray],
                    shard_bytes: int = SHARD_BYTES) -> list[str]:
  """Writes model.safetensors (or shards plus an index), calling produce(name) for one tensor
  at a time in `entries` order, so memory holds one tensor, never the model."""
  shards = plan_shards(entries, shard_bytes)
  names = (['model.safetensors'] if len(shards) == 1 else
           [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])
  weight_map, total = {}, 0
  for fname, shard in zip(names, shards):
    header = _header_bytes(shard)
    with open(out / fname, 'wb') as f:
      f.write(struct.pack('<Q', len(header)))
      f.write(header)
      for name, shape, dtype in shard:
        x = np.ascontiguousarray(produce(name), dtype=np.dtype(dtype).newbyteorder('<'))
        if tuple(x.shape) != tuple(shape):
          raise AssertionError(f'{name}: produced {x.shape}, planned {shape}')
        x.tofile(f)  # One tensor's bytes at a time, without another copy.
        total += x.nbytes
        weight_map[name] = fname
  if len(shards) > 1:
    (out / INDEX_JSON).write_text(json.dumps(
        {'metadata': {'total_size': total}, 'weight_map': weight_map}, indent=1))
  return names


def write_tensors(tensors: dict[str, np.ndarray], out: pathlib.Path,
                  shard_bytes: int = SHARD_BYTES) -> list[str]:
  """write_streaming for tensors already in memory."""
  entries = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
  return write_streaming(out, entries, tensors.__getitem__, shard_bytes)


def remove_stale(out: pathlib.Path, keep: Iterable[str] = ()) -> None:
  for stale in list(out.glob('*.safetensors')) + [out / INDEX_JSON]:
    if stale.name not in set(keep):
      stale.unlink(missing_ok=True)

"""Selecting parameters by path: the one mechanism behind freezing, trainable sets, LoRA
targets, per-group learning rates and weight-decay exemption.

Patterns are regexes matched against whole `/`-joined paths (`layers_3/mlp/wi_0/kernel`).
Layers are named the same way whether or not they are scanned: with model.scan_layers every
layer's parameters are stacked into one leaf `layers/mlp/wi_0/kernel` with a leading layer
axis, and a pattern selects the slices whose per-layer path (`layers_3/mlp/wi_0/kernel`)
matches. So a pattern always selects the same parameters in both layouts.

A selection is a dict {leaf path: layer indices or None}: None is the whole leaf; a tuple of
indices names the trainable slices of a stacked leaf. `take` cuts the selected part out of a
flat params dict (what the optimizer sees and keeps state for), `put` writes it back.

Cost of a partially selected stacked leaf: the optimizer (and the gradient) holds only the
selected slices (AdamW: 2 x k/L of the leaf for k of L layers), plus, in the train step, one
copy of the leaf when the updated slices are written back into it. Frozen slices are never
written: they stay bitwise equal.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm.config import ConfigError

STACKED = 'layers'  # nn.scan's name for the stacked layers (lm.model.Transformer).

Selection = dict  # {leaf path: tuple of layer indices, or None for the whole leaf}


def is_stacked(path: str) -> bool:
  return path.startswith(STACKED + '/')


def layer_path(path: str, layer: int) -> str:
  """`layers/mlp/wo/kernel`, 3 -> `layers_3/mlp/wo/kernel` (the unscanned name)."""
  return f'{STACKED}_{layer}/' + path[len(STACKED) + 1:]


def per_layer_paths(path: str, shape: Sequence[int]) -> list[str]:
  """The names a pattern is matched against: one per layer for a stacked leaf, else the path."""
  if is_stacked(path):
    return [layer_path(path, i) for i in range(shape[0])]
  return [path]


def _fullmatch(pattern: str, path: str) -> bool:
  return re.fullmatch(pattern, path) is not None


def matches(path: str, patterns: Iterable[str]) -> bool:
  """True if any pattern matches the whole (unstacked) path."""
  return any(_fullmatch(p, path) for p in patterns)


def matches_any_layer(path: str, patterns: Iterable[str], n_layers: int) -> bool:
  """For a module of the stacked layers: whether some layer's path matches (LoRA adapters
  exist on the whole stack when any layer is a target)."""
  paths = [layer_path(path, i) for i in range(n_layers)] if is_stacked(path) else [path]
  return any(matches(p, patterns) for p in paths)


def masks(shapes: Mapping[str, Sequence[int]], patterns: Iterable[str]) -> dict[str, np.ndarray]:
  """{leaf path: bool mask} of what the patterns select: shape [layers] for stacked leaves."""
  patterns = tuple(patterns)
  return {path: np.array([matches(p, patterns) for p in per_layer_paths(path, shape)])
          if is_stacked(path) else np.array(matches(path, patterns))
          for path, shape in shapes.items()}


def unmatched(shapes: Mapping[str, Sequence[int]], patterns: Iterable[str]) -> list[str]:
  names = [n for path, shape in shapes.items() for n in per_layer_paths(path, shape)]
  return [p for p in patterns if not any(_fullmatch(p, n) for n in names)]


def closest_paths(pattern: str, shapes: Mapping[str, Sequence[int]], n: int = 3) -> list[str]:
  """The real (per-layer) paths nearest a pattern, by text similarity, for error messages."""
  names = [n for path, shape in shapes.items() for n in per_layer_paths(path, shape)]
  plain = re.sub(r'[\\^$.*+?()\[\]{}|]', '', pattern)  # Compare the pattern's literal text.
  return difflib.get_close_matches(plain or pattern, names, n=n, cutoff=0.0)


def check_all_match(shapes: Mapping[str, Sequence[int]], patterns: Iterable[str], key: str) -> None:
  """One ConfigError naming the first pattern of `key` that matches no parameter."""
  for pattern in unmatched(shapes, patterns):
    near = ', '.join(closest_paths(pattern, shapes))
    raise ConfigError(f'config key {key}: pattern {pattern!r} matches no parameter '
                      f'(closest paths: {near}); patterns match whole /-joined paths, '
                      'with layers named layers_<i>/... whether or not they are scanned')


def from_masks(leaf_masks: Mapping[str, np.ndarray]) -> Selection:
  """Masks -> selection: fully selected leaves are None, stacked partial ones list layers."""
  out: Selection = {}
  for path, mask in leaf_masks.items():
    if mask.all():
      out[path] = None
    elif mask.any():
      out[path] = tuple(int(i) for i in np.flatnonzero(mask))
  return out


def as_selection(trainable: Iterable[str] | Mapping) -> Selection:
  """A selection as given, or a plain list of paths as whole leaves."""
  if isinstance(trainable, Mapping):
    return dict(trainable)
  return {p: None for p in trainable}


def selected_layers(path: str, indices, shape: Sequence[int]) -> list[int] | None:
  """Layer indices a selection covers in a leaf of `shape` (None: not stacked)."""
  if not is_stacked(path):
    return None
  return list(range(shape[0])) if indices is None else list(indices)


def selected_paths(selection: Mapping, shapes: Mapping[str, Sequence[int]]) -> set[str]:
  """The per-layer names of everything selected (the same set in both layouts)."""
  out = set()
  for path, indices in selection.items():
    layers = selected_layers(path, indices, shapes[path])
    out.update([path] if layers is None else [layer_path(path, i) for i in layers])
  return out


def selected_size(path: str, indices, shape: Sequence[int]) -> int:
  size = int(np.prod(shape))
  return size if indices is None else size // shape[0] * len(indices)


# --------------------------------------------------------------------------- slicing


def _slice(x, indices):
  lo, hi = indices[0], indices[-1] + 1
  if list(indices) == list(range(lo, hi)):
    return x[lo:hi]
  return jnp.take(x, jnp.asarray(indices), axis=0)


def take(flat: Mapping[str, Any], selection: Mapping) -> dict[str, Any]:
  """The selected leaves and slices of a flat params dict (arrays or ShapeDtypeStructs)."""
  out = {}
  for path, indices in selection.items():
    x = flat[path]
    if indices is None:
      out[path] = x
    elif isinstance(x, jax.ShapeDtypeStruct):
      spec = getattr(x.sharding, 'spec', None)
      if spec and spec[0] is not None:
        raise ConfigError(f'config key mesh.rules: the layer axis of {path} is sharded '
                          f'({spec[0]}), so single layers of it cannot be frozen or trained; '
                          "map 'layers' to None")
      out[path] = jax.ShapeDtypeStruct((len(indices),) + tuple(x.shape[1:]), x.dtype,
                                       sharding=x.sharding)
    else:
      out[path] = _slice(x, indices)
  return out


def put(flat: Mapping[str, Any], selected: Mapping[str, Any], selection: Mapping) -> dict[str, Any]:
  """flat with the selected leaves replaced and selected slices written into their leaf."""
  out = dict(flat)
  for path, value in selected.items():
    indices = selection[path]
    if indices is None:
      out[path] = value
    else:
      lo, hi = indices[0], indices[-1] + 1
      if list(indices) == list(range(lo, hi)):
        out[path] = jax.lax.dynamic_update_slice_in_dim(flat[path], value.astype(flat[path].dtype),
                                                        lo, axis=0)
      else:
        out[path] = flat[path].at[jnp.asarray(indices)].set(value)
  return out


def per_slice(path: str, indices, shape: Sequence[int], rules, default: float) -> np.ndarray:
  """A value per selected slice from (pattern, value) rules, first match wins, shaped to
  broadcast against the selected part ([k, 1, ...] for stacked leaves, [] otherwise)."""
  def value(name):
    return next((float(v) for pattern, v in rules if _fullmatch(pattern, name)), default)

  layers = selected_layers(path, indices, shape)
  if layers is None:
    return np.asarray(value(path), np.float32)
  values = np.array([value(layer_path(path, i)) for i in layers], np.float32)
  return values.reshape((len(layers),) + (1,) * (len(shape) - 1))

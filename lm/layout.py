"""Scanned <-> unscanned parameter layouts of a checkpoint, converted on restore.

A model with model.scan_layers=True stores its layers as one stacked subtree `layers/...`
(leading layer axis); without, as `layers_0/...`, `layers_1/...`. A params checkpoint saved in
one layout restores into a model of the other: the saved arrays are read with shardings derived
from the model's (the layer axis unsharded), then stacked or unstacked on the mesh by one jitted
function (lm.model.stack_layers / unstack_layers) whose outputs take the model's shardings, so
no host ever holds the whole model.
"""

from __future__ import annotations

import re

import jax
import numpy as np

from lm import model as model_lib
from lm import selection

STACK, UNSTACK = 'stack', 'unstack'  # What the saved params need to fit the model.
_LAYER = re.compile(r'^layers_(\d+)/(.*)$')


def change_needed(saved_paths, model_paths) -> str | None:
  """STACK if the checkpoint is unscanned and the model scanned, UNSTACK for the reverse."""
  saved_stacked = any(selection.is_stacked(p) for p in saved_paths)
  saved_unstacked = any(_LAYER.match(p) for p in saved_paths)
  model_stacked = any(selection.is_stacked(p) for p in model_paths)
  model_unstacked = any(_LAYER.match(p) for p in model_paths)
  if saved_unstacked and not saved_stacked and model_stacked and not model_unstacked:
    return STACK
  if saved_stacked and not saved_unstacked and model_unstacked and not model_stacked:
    return UNSTACK
  return None


def describe(change: str) -> str:
  """The layouts, for messages: what was saved and what the model has."""
  return ('the checkpoint stores layers unscanned (layers_<i>/...) and the model scans them '
          '(model.scan_layers=True)' if change == STACK else
          'the checkpoint stores layers scanned (layers/..., model.scan_layers=True) and the '
          'model does not (model.scan_layers=False)')


def convert_metadata(saved: dict, change: str | None) -> tuple[dict, str]:
  """({path: (shape, dtype)} in the model's layout, problem or ''): a stack needs every layer
  to hold the same parameters with the same shapes."""
  if change is None:
    return saved, ''
  out = {}
  if change == UNSTACK:
    for path, (shape, dtype) in saved.items():
      if selection.is_stacked(path):
        out.update({selection.layer_path(path, i): (shape[1:], dtype) for i in range(shape[0])})
      else:
        out[path] = (shape, dtype)
    return out, ''
  layers: dict[int, dict] = {}
  for path, meta in saved.items():
    match = _LAYER.match(path)
    if match:
      layers.setdefault(int(match.group(1)), {})[match.group(2)] = meta
    else:
      out[path] = meta
  n = len(layers)
  if sorted(layers) != list(range(n)):
    return {}, f'its layers are numbered {sorted(layers)}, not 0..{n - 1}'
  for i in range(1, n):
    if layers[i] != layers[0]:
      differ = sorted(set(layers[i].items()) ^ set(layers[0].items()))[:3]
      return {}, f'layers_0 and layers_{i} differ ({differ}), so they cannot be stacked'
  for rest, (shape, dtype) in layers[0].items():
    out[f'{selection.STACKED}/{rest}'] = ((n,) + tuple(shape), dtype)
  return out, ''


def _with_layer_axis(sharding, add: bool):
  """The model leaf's sharding with the layer axis added (unsharded) or removed."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  spec = tuple(sharding.spec)
  spec = (None,) + spec if add else spec[1:]
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def saved_targets(abstract_flat: dict, saved: dict, change: str) -> dict:
  """{saved path: ShapeDtypeStruct} to read the saved arrays with, for the paths the model
  needs, sharded like the model leaves they become."""
  out = {}
  for path, (shape, dtype) in saved.items():
    if change == UNSTACK and selection.is_stacked(path):
      model_path = selection.layer_path(path, 0)
      sharding = _with_layer_axis(getattr(abstract_flat.get(model_path), 'sharding', None), True)
    elif change == STACK and _LAYER.match(path):
      model_path = f'{selection.STACKED}/' + _LAYER.match(path).group(2)
      sharding = _with_layer_axis(getattr(abstract_flat.get(model_path), 'sharding', None), False)
    else:
      model_path, sharding = path, getattr(abstract_flat.get(path), 'sharding', None)
    if model_path in abstract_flat:
      out[path] = jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=sharding)
  return out


def convert(flat: dict, change: str, abstract_flat: dict) -> dict:
  """The restored saved-layout arrays in the model's layout, on the model's shardings."""
  if change == STACK:
    n_layers = len({int(_LAYER.match(p).group(1)) for p in flat if _LAYER.match(p)})
    fn = lambda f: model_lib.flatten_params(
        model_lib.stack_layers(model_lib.unflatten_params(f), n_layers))
  else:
    n_layers = next(x.shape[0] for p, x in flat.items() if selection.is_stacked(p))
    fn = lambda f: model_lib.flatten_params(
        model_lib.unstack_layers(model_lib.unflatten_params(f), n_layers))
  out_shardings = {p: getattr(abstract_flat.get(p), 'sharding', None)
                   for p in jax.eval_shape(fn, flat)}
  if any(s is None for s in out_shardings.values()):  # No target: as the arrays come.
    return jax.jit(fn)(flat)
  return jax.jit(fn, out_shardings=out_shardings)(flat)

"""Orbax checkpoints: the full train state to resume, or params only to fine-tune or convert.

Layout of a run's workdir:
  <workdir>/checkpoints/<step>/state    params, opt_state, step, rng (one Orbax PyTree)
  <workdir>/checkpoints/<step>/data     the grain iterator's state (one file per process;
                                        per-shard positions, so any process count restores it)
  <workdir>/checkpoints/<step>/config   the run's config as JSON

Orbax writes each step into a temporary directory and renames it only when complete, so a
run killed mid-save never leaves a half-written step that looks finished. Restoring takes
target shardings from abstract arrays, so a checkpoint saved on one mesh restores onto any
other (or any number of processes).
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lm import config as config_lib
from lm import model as model_lib

STATE, DATA, CONFIG = 'state', 'data', 'config'


class CheckpointError(ValueError):
  """A missing, unreadable or mismatched checkpoint; the message names path and parameter."""


def absolute(path: str | os.PathLike) -> epath.Path:
  path = epath.Path(path)
  return path if str(path).startswith(('gs://', 's3://')) else epath.Path(os.path.abspath(path))


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  return absolute(workdir) / 'checkpoints'


def make_manager(directory: str | os.PathLike, *, keep: int | None = None, keep_period: int = 0,
                 async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, keep_period=keep_period or None, enable_async_checkpointing=async_save,
      create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
  handlers = {STATE: ocp.PyTreeCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler(),
              CONFIG: ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(absolute(directory), options=options,
                               item_handlers=handlers, item_names=(STATE, DATA, CONFIG))


# --------------------------------------------------------------------------- config <-> JSON


def _tuples(value):
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def config_to_dict(cfg: ml_collections.ConfigDict) -> dict:
  return json.loads(cfg.to_json_best_effort())


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
  """A base config overlaid with a saved one (lists back to tuples, unknown keys rejected)."""
  cfg = config_lib.base_config()
  saved = ml_collections.ConfigDict(_tuples(d))
  config_lib.check_keys(saved)
  cfg.update(saved)
  return cfg


# --------------------------------------------------------------------------- full state


def state_tree(state) -> dict:
  return {'step': state.step, 'params': state.params, 'opt_state': state.opt_state,
          'rng': state.rng}


def save(manager: ocp.CheckpointManager, step: int, state, *, data_iterator=None,
         cfg: ml_collections.ConfigDict | None = None, force: bool = False) -> bool:
  args = {STATE: ocp.args.PyTreeSave(state_tree(state))}
  if data_iterator is not None:
    args[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
  if cfg is not None:
    args[CONFIG] = ocp.args.JsonSave(config_to_dict(cfg))
  return manager.save(step, args=ocp.args.Composite(**args), force=force)


def _restore_args(abstract_tree):
  return jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
      if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None else ocp.RestoreArgs(),
      abstract_tree)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, *, data_iterator=None):
  """The full TrainState (onto the shardings in abstract_state) and the data iterator."""
  target = state_tree(abstract_state)
  args = {STATE: ocp.args.PyTreeRestore(item=target, restore_args=_restore_args(target))}
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  if data_iterator is not None:  # Not grain's handler: it needs the saving process count.
    from lm import data
    data.restore_iterator(data_iterator, epath.Path(manager.directory) / str(step) / DATA, step)
  tree = restored[STATE]
  return abstract_state.replace(step=tree['step'], params=tree['params'],
                                opt_state=tree['opt_state'], rng=tree['rng'])


# --------------------------------------------------------------------------- params only


def resolve(path: str | os.PathLike) -> tuple[epath.Path, int]:
  """A workdir, a checkpoints dir, or one step's dir -> (manager dir, step)."""
  path = absolute(path)
  if not path.exists():
    raise CheckpointError(f'checkpoint not found: {path} does not exist')
  if (path / 'checkpoints').exists():
    path = path / 'checkpoints'
  if (path / STATE).exists() and path.name.isdigit():
    return path.parent, int(path.name)
  steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / STATE).exists())
  if not steps:
    raise CheckpointError(f'no complete checkpoint in {path} (expected <step>/state)')
  return path, steps[-1]


def read_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
  directory, step = resolve(path)
  config_file = directory / str(step) / CONFIG / 'metadata'
  if not config_file.exists():
    raise CheckpointError(f'checkpoint {directory / str(step)} has no saved config')
  return config_from_dict(json.loads(config_file.read_text()))


def params_metadata(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{param path: (shape, dtype)} of a checkpoint's params, read without loading them."""
  directory, step = resolve(path)
  handler = ocp.PyTreeCheckpointHandler()
  try:
    meta = handler.metadata(directory / str(step) / STATE)
  except (FileNotFoundError, ValueError, OSError) as e:
    raise CheckpointError(f'cannot read checkpoint {directory / str(step)}: {e}') from e
  tree = getattr(meta, 'tree', meta)
  if 'params' not in tree:
    raise CheckpointError(f'checkpoint {directory / str(step)} holds no params')
  return {p: (tuple(m.shape), np.dtype(m.dtype))
          for p, m in model_lib.flatten_params(tree['params']).items()}


def check_params_match(saved: dict, expected: dict, allow_new=(), source: str = '') -> None:
  """One error listing every missing, unexpected, mis-shaped or mis-typed parameter path."""
  from lm.optim import path_matches

  problems = []
  for path, (shape, dtype) in expected.items():
    if path not in saved:
      if not path_matches(path, allow_new):
        problems.append(f'missing {path} (expected {shape} {dtype})')
    elif saved[path][0] != shape:
      problems.append(f'shape mismatch {path}: checkpoint {saved[path][0]}, model {shape}')
    elif saved[path][1] != dtype:
      problems.append(f'dtype mismatch {path}: checkpoint {saved[path][1]}, model {dtype}')
  for path in saved:
    if path not in expected:
      problems.append(f'unexpected {path} (not in the model)')
  if problems:
    hint = ' (finetune.allow_new_params lets new parameters be initialised)' if any(
        p.startswith('missing') for p in problems) else ''
    raise CheckpointError(f'checkpoint {source} does not match the model{hint}:\n  '
                          + '\n  '.join(problems))


def load_params(path: str | os.PathLike, abstract_params=None, *, allow_new=(),
                init_params=None):
  """Params from a checkpoint, strictly checked against abstract_params (with shardings).

  Paths matched by `allow_new` may be missing from the checkpoint; they are taken from
  `init_params` (freshly initialised, e.g. a task head or LoRA adapters). Without
  abstract_params, everything is restored as saved onto the local devices.
  """
  directory, step = resolve(path)
  saved = params_metadata(path)
  if abstract_params is None:
    abstract_flat = {p: jax.ShapeDtypeStruct(s, d) for p, (s, d) in saved.items()}
  else:
    abstract_flat = model_lib.flatten_params(abstract_params)
    expected = {p: (tuple(x.shape), np.dtype(x.dtype)) for p, x in abstract_flat.items()}
    check_params_match(saved, expected, allow_new, source=str(directory / str(step)))
  to_read = {p: x for p, x in abstract_flat.items() if p in saved}
  target = {'params': model_lib.unflatten_params(to_read)}
  handler = ocp.PyTreeCheckpointHandler()
  restored = handler.restore(
      directory / str(step) / STATE,
      args=ocp.args.PyTreeRestore(item=target, restore_args=_restore_args(target),
                                  partial_restore=True))
  flat = model_lib.flatten_params(restored['params'])
  if len(flat) < len(abstract_flat):
    if init_params is None:
      raise CheckpointError('load_params needs init_params for new parameters')
    init_flat = model_lib.flatten_params(init_params)
    flat.update({p: init_flat[p] for p in abstract_flat if p not in flat})
  return model_lib.unflatten_params(flat)


def save_params(directory: str | os.PathLike, params, cfg: ml_collections.ConfigDict,
                step: int = 0) -> epath.Path:
  """A params-only checkpoint (e.g. a converted pretrained model) that finetune.py restores."""
  directory = absolute(directory)
  manager = make_manager(directory, async_save=False)
  manager.save(step, args=ocp.args.Composite(**{
      STATE: ocp.args.PyTreeSave({'params': params}),
      CONFIG: ocp.args.JsonSave(config_to_dict(cfg))}), force=True)
  manager.wait_until_finished()
  manager.close()
  return directory / str(step)

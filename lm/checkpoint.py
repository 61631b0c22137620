"""Orbax checkpoints: the full train state to resume, or params only to fine-tune or convert.

Layout of a run's workdir:
  <workdir>/checkpoints/<step>/state    params, opt_state, step, rng (one Orbax PyTree)
  <workdir>/checkpoints/<step>/data     the grain iterator's state (one file per process;
                                        per-shard positions, so any process count restores it)
  <workdir>/checkpoints/<step>/config   the run's config as JSON

  <workdir>/checkpoints/<step>/lm_manifest.json   size and SHA-256 of every file above

Orbax writes each step into a temporary directory and renames it only when complete, so a
run killed mid-save never leaves a half-written step that looks finished. Restoring takes
target shardings from abstract arrays, so a checkpoint saved on one mesh restores onto any
other (or any number of processes).

Integrity: once every process has written its files and just before Orbax renames the
temporary directory (its post_finalization_callback, on the primary process), the manifest
is written into it, so a committed step always carries one. `restore_latest` checks a step
against its manifest before trusting it (a flipped byte, a truncated or missing file), then
restores it; a step whose files are damaged is named in a warning and the previous one is
tried (any other restore error is raised: it is not the step's fault). Steps without a
manifest (written before manifests existed) are checked by restoring them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata_store  # No public name (Orbax 0.12).

from lm import config as config_lib
from lm import data, layout
from lm import model as model_lib
from lm.errors import UserError
from lm.optim import path_matches

STATE, DATA, CONFIG = 'state', 'data', 'config'
MANIFEST = 'lm_manifest.json'  # {file: [bytes, sha256]} of a step's item files.
_ORBAX_TMP = '.orbax-checkpoint-tmp'  # Orbax's suffix for a step still being written.


class CheckpointError(UserError, ValueError):
  """A missing, unreadable or mismatched checkpoint; the message names path and parameter."""


def absolute(path: str | os.PathLike) -> epath.Path:
  path = epath.Path(path)
  return path if str(path).startswith(('gs://', 's3://')) else epath.Path(os.path.abspath(path))


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  return absolute(workdir) / 'checkpoints'


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, always asynchronous underneath (the manifest is written by the async
  commit callback); blocking=True waits for each save, as async_save=False asks."""

  def __init__(self, *args, blocking: bool = False, **kwargs):
    super().__init__(*args, **kwargs)
    self._blocking = blocking

  def save(self, *args, **kwargs) -> bool:
    saved = super().save(*args, **kwargs)
    if self._blocking:
      self.wait_until_finished()
    return saved


# Orbax's replica-parallel save splits a replicated array's write among its copies, so that the
# processes (and device links) holding them share the work. Each piece costs a device slice (on
# CPU, a compiled program per shape): 480 of them made up 3.4 s of a 12 s tiny train.py run
# (measured). Below this many bytes per piece one copy writes the whole array: a small write is
# cheap, and splitting it costs more than it saves; large arrays still split across copies.
MIN_BYTES_PER_REPLICA_SLICE = 1 << 20

_array_handler_registered = False


def register_type_handler(ty, handler) -> None:
  """Registers `handler` for leaves of type `ty` in Orbax's global registry, quietly: Orbax
  warns on every override, and a user's error must stay the only line a failed start prints."""
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(ty, handler, override=True)
  finally:
    logging.set_verbosity(level)


def _register_array_handler() -> None:
  """jax.Array leaves save with MIN_BYTES_PER_REPLICA_SLICE (once per process, in Orbax's
  global registry: the PyTree handlers of every manager, and convert's streamed leaves, use it).
  Orbax's default handler carries an array-metadata store (random-key metadata): so does this
  one, so the files written do not change."""
  global _array_handler_registered
  if not _array_handler_registered:
    register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        array_metadata_store=array_metadata_store.Store(),
        min_slice_bytes_for_replica_parallel=MIN_BYTES_PER_REPLICA_SLICE))
    _array_handler_registered = True


def make_manager(directory: str | os.PathLike, *, keep: int | None = None, keep_period: int = 0,
                 async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
  directory = absolute(directory)
  _register_array_handler()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, keep_period=keep_period or None, enable_async_checkpointing=True,
      create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only,
      async_options=ocp.AsyncOptions(post_finalization_callback=lambda: _seal(directory)))
  handlers = {STATE: ocp.PyTreeCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler(),
              CONFIG: ocp.JsonCheckpointHandler()}
  return _Manager(directory, options=options, item_handlers=handlers,
                  item_names=(STATE, DATA, CONFIG), blocking=not async_save)


# --------------------------------------------------------------------------- integrity


def _item_files(step_dir: epath.Path) -> list[epath.Path]:
  """The files of a step's items (state/, data/, config/): what the manifest covers. Orbax's
  top-level _CHECKPOINT_METADATA and commit_success.txt change at commit, after the manifest."""
  def walk(directory):  # Not rglob: epath refuses recursive globs (costly on object stores).
    for p in sorted(directory.iterdir()):
      if p.is_dir():
        yield from walk(p)
      else:
        yield p
  return [f for item in sorted(step_dir.iterdir()) if item.is_dir() for f in walk(item)]


def _size_and_sha256(path: epath.Path) -> tuple[int, str]:
  digest, size = hashlib.sha256(), 0
  with path.open('rb') as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
      size += len(chunk)
  return size, digest.hexdigest()


def write_manifest(step_dir: str | os.PathLike) -> None:
  """Records size and SHA-256 of every item file of a fully written step (atomically)."""
  step_dir = epath.Path(step_dir)
  files = {str(p.relative_to(step_dir)): list(_size_and_sha256(p)) for p in _item_files(step_dir)}
  tmp = step_dir / (MANIFEST + '.tmp')
  tmp.write_text(json.dumps({'format': 1, 'files': files}, indent=1))
  tmp.rename(step_dir / MANIFEST)


def _seal(directory: epath.Path) -> None:
  """Orbax's post-finalization callback: every process has written the step, which is not yet
  renamed to its final name; write its manifest so that it is committed together with it."""
  pending = [p for p in directory.glob(f'*{_ORBAX_TMP}*') if p.name.split('.')[0].isdigit()]
  if not pending:  # Object stores commit in place (a commit_success file): the newest unsealed.
    pending = [p for p in directory.iterdir()
               if p.name.isdigit() and not (p / MANIFEST).exists()]
  if pending:
    write_manifest(max(pending, key=lambda p: int(p.name.split('.')[0])))


def verify_step(step_dir: str | os.PathLike) -> tuple[bool, str]:
  """(has a manifest, problem): problem is '' when every listed file has its size and checksum."""
  step_dir = epath.Path(step_dir)
  manifest = step_dir / MANIFEST
  if not manifest.exists():
    return False, ''
  try:
    files = json.loads(manifest.read_text())['files']
  except (ValueError, KeyError, TypeError, OSError) as e:
    return True, f'its checksum manifest {MANIFEST} is unreadable ({e})'
  problems = []
  for name, (size, sha) in sorted(files.items()):
    path = step_dir / name
    if not path.exists():
      problems.append(f'{name} is missing')
      continue
    actual_size, actual_sha = _size_and_sha256(path)
    if actual_size != size:
      problems.append(f'{name} has {actual_size} bytes, {size} expected (truncated or overwritten)')
    elif actual_sha != sha:
      problems.append(f'{name} fails its SHA-256 checksum (bytes changed)')
  if len(problems) > 3:
    problems = problems[:3] + [f'{len(problems) - 3} more']
  return True, '; '.join(problems)


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
  try:  # Also reports a failure of the previous (async) save, which this one waits for.
    return manager.save(step, args=ocp.args.Composite(**args), force=force)
  except Exception as e:  # pylint: disable=broad-except  # Full disk, lost permission, ...
    raise _write_error(manager, e) from e


def wait(manager: ocp.CheckpointManager) -> None:
  """Waits for the in-flight save; a failed write becomes one clear CheckpointError."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _write_error(manager, e) from e


def _write_error(manager: ocp.CheckpointManager, e: BaseException) -> CheckpointError:
  directory = epath.Path(manager.directory)
  complete = sorted(int(p.name) for p in directory.iterdir()
                    if p.name.isdigit() and (p / MANIFEST).exists()) if directory.exists() else []
  kept = (f'step {complete[-1]} is the newest complete one; the next start resumes from it'
          if complete else 'no step is complete yet; the next start begins at step 0')
  return CheckpointError(f'writing a checkpoint in {directory} failed ({_first_line(e)}); {kept}')


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
    data.restore_iterator(data_iterator, epath.Path(manager.directory) / str(step) / DATA, step)
  tree = restored[STATE]
  return abstract_state.replace(step=tree['step'], params=tree['params'],
                                opt_state=tree['opt_state'], rng=tree['rng'])


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0] if text else ""}'[:500]


def restore_latest(manager: ocp.CheckpointManager, abstract_state, *, data_iterator=None,
                   quarantine_dir: str | os.PathLike | None = None):
  """(state, step) from the newest complete, intact checkpoint; (None, None) if there is none.

  Newest first, each step is checked against its manifest, its params against the model (a
  mismatch is a config error and raises at once), then restored. A step whose files fail the
  check (checksum, missing or truncated file; without a manifest: a restore error saying a
  file is missing or damaged) is named in a warning with its problem and the previous step is
  tried. Any other restore error (out of memory, a sharding bug) is raised as it is. When a
  step restores, the failed newer steps are moved to quarantine_dir (default
  <checkpoints>/../corrupt_checkpoints), kept for inspection and out of the way of the next
  saves. If none restores, CheckpointError lists
  every step's problem and nothing is moved.
  """
  directory = epath.Path(manager.directory)
  expected = {p: (tuple(x.shape), np.dtype(x.dtype))
              for p, x in model_lib.flatten_params(abstract_state.params).items()}
  failed: list[tuple[int, str]] = []
  for step in sorted(manager.all_steps(), reverse=True):
    step_dir = directory / str(step)
    has_manifest, problem = verify_step(step_dir)
    if not problem:
      try:
        saved = params_metadata(step_dir)
      except CheckpointError as e:
        problem = f'its metadata is unreadable ({e})'
    if not problem:
      check_params_match(saved, expected, source=str(step_dir))
      if not has_manifest:
        logging.warning('checkpoint step %d has no %s (saved before manifests); trusting it '
                        'if it restores', step, MANIFEST)
      try:
        state = restore(manager, step, abstract_state, data_iterator=data_iterator)
      except Exception as e:  # pylint: disable=broad-except
        # Only damaged files make a step unusable; anything else (out of memory, a sharding
        # bug) would fail on every step alike: it propagates and no step is quarantined.
        if has_manifest or not is_integrity_error(e):
          raise
        problem = f'restoring it failed ({_first_line(e)})'
    if not problem:
      if failed:
        _quarantine(manager, [s for s, _ in failed], quarantine_dir)
      return state, step
    logging.warning('checkpoint step %d in %s is unusable: %s; falling back to the previous '
                    'checkpoint', step, directory, problem)
    failed.append((step, problem))
  if failed:
    raise CheckpointError(f'no usable checkpoint in {directory}: ' + '; '.join(
        f'step {s}: {p}' for s, p in failed) + ' (move the directory away to start afresh)')
  return None, None


# What reading a missing, truncated or corrupted file raises, through Orbax / TensorStore
# (which report absl status codes in ValueError messages) or the data iterator's JSON.
_INTEGRITY_TYPES = (FileNotFoundError, EOFError, json.JSONDecodeError, UnicodeDecodeError)
_INTEGRITY_STATUS = ('NOT_FOUND', 'DATA_LOSS', 'OUT_OF_RANGE')


def is_integrity_error(e: BaseException) -> bool:
  """Whether an exception (or one it was raised from) says a file is missing or damaged."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, _INTEGRITY_TYPES) or any(code in str(e) for code in _INTEGRITY_STATUS):
      return True
    e = e.__cause__ or e.__context__
  return False


def _quarantine(manager: ocp.CheckpointManager, steps: list[int], quarantine_dir=None) -> None:
  """Moves failed steps out of the checkpoints directory (process 0), then re-reads it."""
  directory = epath.Path(manager.directory)
  target_dir = epath.Path(quarantine_dir or directory.parent / 'corrupt_checkpoints')
  if jax.process_index() == 0:
    target_dir.mkdir(parents=True, exist_ok=True)
    for step in steps:
      target = target_dir / str(step)
      if target.exists():
        target = target_dir / f'{step}-{int(time.time())}'
      (directory / str(step)).rename(target)
      logging.warning('checkpoint step %d moved to %s', step, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices('lm_checkpoint_quarantine')
  manager.reload()


# --------------------------------------------------------------------------- params only


def resolve(path: str | os.PathLike) -> tuple[epath.Path, int]:
  """A workdir, a checkpoints dir, or one step's dir -> (manager dir, step)."""
  path = absolute(path)
  if not path.exists():
    raise CheckpointError(f'checkpoint not found: {path} does not exist')
  if (path / 'checkpoints').exists():
    path = path / 'checkpoints'
  elif (path / 'convert.json').exists() and (path / 'checkpoint').exists():
    path = path / 'checkpoint'  # An lm.convert output directory.
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


def _both_floating(a, b) -> bool:
  """Float params restore into another float dtype (Orbax casts on read): a bfloat16 import
  fine-tunes with float32 params when the run asks for them."""
  return all(jax.numpy.issubdtype(np.dtype(x), jax.numpy.floating) for x in (a, b))


def check_params_match(saved: dict, expected: dict, allow_new=(), source: str = '') -> None:
  """One error listing every missing, unexpected, mis-shaped or mis-typed parameter path."""
  problems = []
  for path, (shape, dtype) in expected.items():
    if path not in saved:
      if not path_matches(path, allow_new):
        problems.append(f'missing {path} (expected {shape} {dtype})')
    elif saved[path][0] != shape:
      problems.append(f'shape mismatch {path}: checkpoint {saved[path][0]}, model {shape}')
    elif saved[path][1] != dtype and not _both_floating(saved[path][1], dtype):
      problems.append(f'dtype mismatch {path}: checkpoint {saved[path][1]}, model {dtype}')
  for path in saved:
    if path not in expected:
      problems.append(f'unexpected {path} (not in the model)')
  if problems:
    hint = ' (finetune.allow_new_params lets new parameters be initialised)' if any(
        p.startswith('missing') for p in problems) else ''
    if any(p.startswith(('missing layers', 'unexpected layers')) for p in problems):
      hint += (' (layers/... is the scanned layout, layers_<i>/... the unscanned one: '
               'model.scan_layers and model.n_layers must describe the checkpoint)')
    raise CheckpointError(f'checkpoint {source} does not match the model{hint}:\n  '
                          + '\n  '.join(problems))


def load_params(path: str | os.PathLike, abstract_params=None, *, allow_new=(),
                init_new: Callable[[list[str]], dict] | None = None):
  """Params from a checkpoint, strictly checked against abstract_params (with shardings).

  Paths matched by `allow_new` may be missing from the checkpoint; `init_new(paths)` makes
  those leaves ({path: array}, freshly initialised: a task head or LoRA adapters). A
  checkpoint saved in the other layer layout (scanned / unscanned) is converted on the mesh
  (lm.layout).
  Without abstract_params, everything is restored as saved onto the local devices.
  """
  directory, step = resolve(path)
  _, problem = verify_step(directory / str(step))
  if problem:  # Never load silently damaged weights.
    raise CheckpointError(f'checkpoint {directory / str(step)} is corrupt: {problem}')
  saved = params_metadata(path)
  source = str(directory / str(step))
  if abstract_params is None:
    abstract_flat = {p: jax.ShapeDtypeStruct(s, d) for p, (s, d) in saved.items()}
    change = None
  else:
    abstract_flat = model_lib.flatten_params(abstract_params)
    change = layout.change_needed(saved, abstract_flat)
    converted, problem = layout.convert_metadata(saved, change)
    if problem:
      raise CheckpointError(f'checkpoint {source} cannot be restored: {layout.describe(change)}, '
                            f'but {problem}; set model.scan_layers to the layout it was saved in')
    expected = {p: (tuple(x.shape), np.dtype(x.dtype)) for p, x in abstract_flat.items()}
    check_params_match(converted, expected, allow_new, source=source)
  if change is None:
    to_read = {p: x for p, x in abstract_flat.items() if p in saved}
  else:  # Read in the saved layout, sharded like the model leaves the arrays become.
    logging.info('%s: converting on restore', layout.describe(change))
    to_read = layout.saved_targets(abstract_flat, saved, change)
  target = {'params': model_lib.unflatten_params(to_read)}
  handler = ocp.PyTreeCheckpointHandler()
  restored = handler.restore(
      directory / str(step) / STATE,
      args=ocp.args.PyTreeRestore(item=target, restore_args=_restore_args(target),
                                  partial_restore=True))
  flat = model_lib.flatten_params(restored['params'])
  if change is not None:
    flat = layout.convert(flat, change, abstract_flat)
  missing = [p for p in abstract_flat if p not in flat]
  if missing:
    if init_new is None:
      raise CheckpointError('load_params needs init_new for new parameters')
    flat.update(init_new(missing))
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

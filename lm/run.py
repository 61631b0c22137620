"""A run's start-up: what training and evaluation share, built once from a config and a workdir.

  run = build_run(cfg, workdir, is_finetune=...)   workdir checked, config validated, mesh,
                                                   tokenizer (vocab fitted), model, trainable
                                                   set and abstract params (lm.build)
  initial_params(run)                              warm-start params, or None (fresh init)
  make_iterator(run, split)                        this process's batches of a split (replay
                                                   mixed in when fine-tuning with it)

lm.loop trains a Run and lm.evaluate measures one; lm.evaluate never imports lm.loop.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from lm import build, checkpoint, data, optim, replay, sharding
from lm import step as step_lib
from lm.config import ConfigError, validate


@dataclasses.dataclass(frozen=True)
class Run(build.Built):
  """A built run (lm.build: model, abstract params, trainable set, optimizer, shardings) with
  its workdir and tokenizer: everything start-up makes once for training and evaluation."""
  workdir: epath.Path
  tokenizer: Any


def preflight_workdir(workdir: str | os.PathLike, min_free_mb: int = 64) -> epath.Path:
  """Fails before any compilation if the workdir cannot be created, written or is full."""
  path = checkpoint.absolute(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write_test_{jax.process_index()}'
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise ConfigError(f'--workdir {path} is not writable: {e.strerror or e}') from e
  if not str(path).startswith('gs://'):
    stat = os.statvfs(path)
    free_mb = stat.f_bavail * stat.f_frsize / 2**20
    if free_mb < min_free_mb:
      raise ConfigError(f'--workdir {path} has only {free_mb:.0f} MB free '
                        f'(need at least {min_free_mb} MB for checkpoints)')
  return path


def fit_vocab(cfg: ml_collections.ConfigDict, tokenizer) -> None:
  """model.vocab_size 0 means 'the tokenizer's size'; a smaller explicit size is an error."""
  if cfg.model.vocab_size == 0:
    cfg.model.vocab_size = tokenizer.vocab_size
  elif cfg.model.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f'config key model.vocab_size: {cfg.model.vocab_size} is smaller than the '
                      f'tokenizer vocabulary ({tokenizer.vocab_size})')


def build_run(cfg: ml_collections.ConfigDict, workdir, *, is_finetune: bool) -> Run:
  workdir = preflight_workdir(workdir)
  validate(cfg, jax.device_count())
  mesh = sharding.make_mesh(cfg.mesh)
  batch_axes = sharding.batch_sharding(mesh, cfg.mesh.rules).spec[0] or ()
  batch_axes = batch_axes if isinstance(batch_axes, tuple) else (batch_axes,)
  batch_shards = int(np.prod([mesh.shape[a] for a in batch_axes]))
  if cfg.data.batch_size % batch_shards:  # Else an IndivisibleError from deep inside JAX.
    raise ConfigError(f'config key data.batch_size: {cfg.data.batch_size} rows cannot be split '
                      f'evenly over the {batch_shards} batch shards of mesh axes {batch_axes} '
                      f'(mesh {dict(mesh.shape)})')
  tokenizer = data.load_or_train_tokenizer(cfg, workdir)
  fit_vocab(cfg, tokenizer)
  built = build.build(cfg, mesh, finetune=is_finetune)
  return Run(**{f.name: getattr(built, f.name) for f in dataclasses.fields(built)},
             workdir=workdir, tokenizer=tokenizer)


def initial_params(run: Run):
  """Warm-start params (finetune.restore_from / train.init_from), or None for a fresh init."""
  cfg = run.cfg
  source = cfg.finetune.restore_from if run.is_finetune else cfg.train.init_from
  if not source:
    return None
  allow_new = tuple(cfg.finetune.allow_new_params) if run.is_finetune else ()
  if run.is_finetune and cfg.finetune.lora_rank > 0:
    allow_new += (optim.LORA_PATTERN,)

  def init_new(paths):
    return step_lib.init_leaves(run.init_fn, paths, run.params_shardings, run.mesh,
                                cfg.mesh.rules, jax.random.key(cfg.seed))

  logging.info('restoring params from %s', source)
  return checkpoint.load_params(source, run.abstract_params, allow_new=allow_new,
                                init_new=init_new)


def data_fault(e: BaseException, where: str) -> data.DataError:
  """One line naming the step and the file (OSError carries its filename; DataError names it)."""
  detail = str(e) if isinstance(e, data.DataError) else f'{type(e).__name__}: {e}'
  return data.DataError(f'{where}: {detail}')


def make_iterator(run: Run, split: str, cfg: ml_collections.ConfigDict | None = None,
                  task: str | None = None):
  if split == 'train' and cfg is None and run.is_finetune and run.cfg.finetune.replay > 0:
    return replay.make_train_iterator(run.cfg, run.tokenizer, process_index=jax.process_index(),
                                      process_count=jax.process_count(), task=task or run.task)
  return data.make_pipeline(cfg or run.cfg, run.tokenizer, split,
                            process_index=jax.process_index(),
                            process_count=jax.process_count(), task=task or run.task)

"""Optimizer, learning-rate schedules, and which parameters train.

Parameters are addressed by `/`-joined paths (`layers_3/mlp/wi_0/kernel`); lm.selection maps
path patterns to leaves and, for scanned (stacked) layers, to layer slices. Freezing, LoRA
targets, weight-decay exemption and per-group learning rates all go through it. The optimizer
only ever sees the trainable part (a flat {path: array} dict of leaves and stacked slices), so
frozen parameters get no gradient, no optimizer state, and no part in clipping.

A pattern of finetune.freeze / trainable / lora_targets or optim.lr_multipliers that matches
no parameter is a ConfigError before anything compiles; optim.no_decay's defaults are generic
(a bias-free model has no `bias`), so those are only logged.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from lm import selection
from lm.config import optim_config

LORA_PATTERN = r'.*/lora_(a|b)'
_ADAPTER = ('/lora_a', '/lora_b')


def path_matches(path: str, patterns: Iterable[str]) -> bool:
  """True if any regex matches the whole path."""
  return selection.matches(path, patterns)


def _kernel_of(path: str) -> str:
  return path.rsplit('/', 1)[0] + '/kernel'


def check_patterns(shapes: Mapping, finetune: ml_collections.ConfigDict | None,
                   optim: ml_collections.ConfigDict | None) -> None:
  """Every selection pattern must select something (one ConfigError naming it)."""
  if finetune is not None:
    selection.check_all_match(shapes, finetune.freeze, 'finetune.freeze')
    selection.check_all_match(shapes, finetune.trainable, 'finetune.trainable')
    if finetune.lora_rank > 0:
      selection.check_all_match(shapes, finetune.lora_targets, 'finetune.lora_targets')
  if optim is not None:
    selection.check_all_match(shapes, [p for p, _ in optim.lr_multipliers], 'optim.lr_multipliers')
    defaults = set(optim_config().no_decay)
    unused = selection.unmatched(shapes, optim.no_decay)
    selection.check_all_match(shapes, [p for p in unused if p not in defaults], 'optim.no_decay')
    if unused:
      logging.info('optim.no_decay patterns matching no parameter (generic defaults): %s', unused)


def trainable_selection(abstract_flat: Mapping, finetune: ml_collections.ConfigDict | None,
                        optim: ml_collections.ConfigDict | None = None) -> selection.Selection:
  """Which parameters (and stacked-layer slices) train, after checking every pattern.

  LoRA: the adapters of target kernels (a stacked adapter only in the layers whose kernel
  matches), plus allow_new_params and `trainable`. Else `trainable` (if set) or everything.
  Then minus `freeze`. abstract_flat maps paths to anything with a .shape.
  """
  shapes = {p: tuple(x.shape) for p, x in abstract_flat.items()}
  check_patterns(shapes, finetune, optim)
  if finetune is None:
    return {p: None for p in shapes}
  if finetune.lora_rank > 0:
    chosen = selection.masks(shapes, tuple(finetune.allow_new_params) + tuple(finetune.trainable))
    for path, shape in shapes.items():
      if path.endswith(_ADAPTER):
        target = selection.masks({_kernel_of(path): shape}, finetune.lora_targets)
        chosen[path] = chosen[path] | next(iter(target.values()))
  elif finetune.trainable:
    chosen = selection.masks(shapes, finetune.trainable)
  else:
    chosen = {p: True for p in shapes}
  frozen = selection.masks(shapes, finetune.freeze)
  return selection.from_masks({p: chosen[p] & ~frozen[p] for p in shapes})


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to optim.lr, then cosine / linear decay to lr * min_lr_ratio, or constant."""
  warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
  end_lr = optim.lr * optim.min_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  if optim.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.min_lr_ratio)
  elif optim.schedule == 'linear':
    decay = optax.linear_schedule(optim.lr, end_lr, decay_steps)
  else:
    decay = optax.constant_schedule(optim.lr)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup])


def _factor_fn(trainable: selection.Selection, rules, default: float):
  """(path, shape of its trainable part) -> a value per leaf or per stacked slice, first
  matching (pattern, value) rule wins. Evaluated when the update is traced (shapes are static)."""
  return lambda path, shape: selection.per_slice(path, trainable[path], shape, rules, default)


def scale_by_slices(factor) -> optax.GradientTransformation:
  """Multiplies each update by its leaf's (or its slices') constant: per-group learning rates."""

  def update(updates, state, params=None):
    del params
    return {k: u * factor(k, u.shape).astype(u.dtype) for k, u in updates.items()}, state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def add_decayed_weights_by_slices(weight_decay: float, factor) -> optax.GradientTransformation:
  """Decoupled weight decay, each leaf (or stacked slice) scaled by its 0/1 factor."""

  def update(updates, state, params):
    out = {}
    for k, u in updates.items():
      f = factor(k, u.shape)
      out[k] = u + weight_decay * f.astype(u.dtype) * params[k].astype(u.dtype) if f.any() else u
    return out, state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int, trainable
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW over the flat {path: array} dict of trainable leaves and slices.

  trainable: a selection (trainable_selection) or a list of whole-leaf paths. Order: clip the
  global norm of the raw gradients (trainable only), Adam moments, decoupled weight decay on
  matrices (not norms/biases: optim.no_decay), learning rate, per-group multiplier.
  """
  trainable = selection.as_selection(trainable)
  schedule = learning_rate_schedule(optim, total_steps)
  parts = []
  if optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts += [
      optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
      add_decayed_weights_by_slices(
          optim.weight_decay, _factor_fn(trainable, [(p, 0.0) for p in optim.no_decay], 1.0)),
      optax.scale_by_learning_rate(schedule),
  ]
  if optim.lr_multipliers:
    parts.append(scale_by_slices(_factor_fn(trainable, optim.lr_multipliers, 1.0)))
  return optax.chain(*parts), schedule


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))

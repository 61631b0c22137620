"""Optimizer, learning-rate schedules, and the one mechanism that selects parameters by path.

Parameters are addressed by `/`-joined paths (`layers_3/mlp/wi_0/kernel`). Freezing, LoRA,
weight-decay exemption and per-group learning rates all select by regex over those paths with
`path_matches`. The optimizer only ever sees the trainable parameters (a flat {path: array}
dict), so frozen parameters get no gradient, no optimizer state, and no part in clipping.
"""

from __future__ import annotations

import re
from typing import Iterable

import jax
import jax.numpy as jnp
import ml_collections
import optax

LORA_PATTERN = r'.*/lora_(a|b)'


def path_matches(path: str, patterns: Iterable[str]) -> bool:
  """True if any regex matches the whole path."""
  return any(re.fullmatch(p, path) for p in patterns)


def trainable_paths(paths: Iterable[str], finetune: ml_collections.ConfigDict | None) -> list[str]:
  """Which parameters train: LoRA adapters only when LoRA is on; else `trainable` (if set)
  minus `freeze`. New task parameters (finetune.allow_new_params) also train under LoRA."""
  paths = list(paths)
  if finetune is None:
    return paths
  if finetune.lora_rank > 0:
    selected = [p for p in paths if path_matches(p, (LORA_PATTERN,) + tuple(finetune.allow_new_params)
                                                 + tuple(finetune.trainable))]
  elif finetune.trainable:
    selected = [p for p in paths if path_matches(p, finetune.trainable)]
  else:
    selected = paths
  return [p for p in selected if not path_matches(p, finetune.freeze)]


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


def scale_by_tree(multipliers: dict[str, float]) -> optax.GradientTransformation:
  """Multiplies each update by its leaf's constant (per-group learning rates)."""

  def update(updates, state, params=None):
    del params
    return {k: u * multipliers[k] for k, u in updates.items()}, state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def lr_multipliers(paths: Iterable[str], rules) -> dict[str, float]:
  """First matching (regex, multiplier) rule wins; unmatched paths get 1."""
  out = {}
  for path in paths:
    out[path] = next((float(m) for pattern, m in rules if re.fullmatch(pattern, path)), 1.0)
  return out


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int,
                   paths: Iterable[str]) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW over a flat {path: array} dict of trainable params.

  Order: clip the global norm of the raw gradients (trainable leaves only), Adam moments,
  decoupled weight decay on matrices (not norms/biases), learning rate, per-group multiplier.
  """
  paths = list(paths)
  schedule = learning_rate_schedule(optim, total_steps)
  decay_mask = {p: not path_matches(p, optim.no_decay) for p in paths}
  parts = []
  if optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts += [
      optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
      optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(schedule),
  ]
  multipliers = lr_multipliers(paths, optim.lr_multipliers)
  if any(m != 1.0 for m in multipliers.values()):
    parts.append(scale_by_tree(multipliers))
  return optax.chain(*parts), schedule


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))

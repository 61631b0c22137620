"""Train state, task losses, and the pure `train_step` / `eval_step`.

`train_step(state, batch) -> (state, metrics)` is a pure function of pytrees, jitted with the
state's shardings on the way in and out and the state donated. Gradients are taken only with
respect to the trainable parameters (a flat {path: array} dict); frozen ones are passed through
untouched, so they stay bitwise equal and hold no optimizer state.

Batches are dicts of [B, T] arrays: inputs, targets, segment_ids, positions, loss_mask (and
labels [B] for classification). Logits, softmax and loss are float32.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from lm import flops
from lm import loss as loss_lib
from lm import model as model_lib
from lm import selection
from lm import sharding as sharding_lib
from lm.optim import global_norm


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # Nested dict of all parameters (trainable and frozen).
  opt_state: Any  # Optimizer state of the trainable parameters only (flat {path: ...}).
  rng: jax.Array


# --------------------------------------------------------------------------- losses


def batch_weight(batch: dict, task: str) -> jax.Array:
  """What the loss is averaged over: real target tokens, or rows for classification."""
  if task == 'classify':
    return jnp.asarray(batch['labels'].shape[0], jnp.float32)
  return jnp.sum(batch['loss_mask'].astype(jnp.float32))


def task_loss(model: nn.Module, params, batch: dict, task: str, z_loss: float,
              dropout_rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Summed loss of one (micro-)batch, plus summed statistics for metrics."""
  deterministic = dropout_rng is None
  rngs = {} if deterministic else {'dropout': dropout_rng}
  if task == 'classify':
    logits_BC = model.apply({'params': params}, batch['inputs'], batch['positions'],
                            batch['segment_ids'], deterministic=deterministic, head='classify',
                            rngs=rngs)
    labels_B = batch['labels']
    log_probs_BC = jax.nn.log_softmax(logits_BC.astype(jnp.float32))
    nll_sum = -jnp.sum(jnp.take_along_axis(log_probs_BC, labels_B[:, None], axis=-1))
    correct = jnp.sum(jnp.argmax(logits_BC, -1) == labels_B)
    return nll_sum, {'nll_sum': nll_sum, 'z_sum': jnp.zeros(()), 'correct': correct}
  hidden_BTD = model.apply({'params': params}, batch['inputs'], batch['positions'],
                           batch['segment_ids'], deterministic=deterministic, head='hidden',
                           rngs=rngs)
  weights_BT = batch['loss_mask'].astype(jnp.float32)
  # Never the whole [B, T, V] logits: projected and scored a chunk of positions at a time.
  nll_sum, z_sum, correct = loss_lib.lm_loss(model.cfg, params, hidden_BTD, batch['targets'],
                                             weights_BT, z_loss)
  return nll_sum + z_sum, {'nll_sum': nll_sum, 'z_sum': z_sum, 'correct': correct}


# --------------------------------------------------------------------------- train step


def _microbatches(batch: dict, num: int) -> dict:
  """[B, ...] -> [num, B/num, ...], taking every num-th row so each micro-batch is spread
  over all devices (contiguous slices would sit on a subset of the batch shards)."""
  def split(x):
    x = x.reshape((x.shape[0] // num, num) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: Callable,
                    trainable, *, task: str = 'lm', z_loss: float = 0.0,
                    grad_accum: int = 1, nan_steps: tuple[int, ...] = ()) -> Callable:
  """Builds the pure train step for this model, optimizer and trainable set.

  nan_steps (train.debug_nan_steps) is a fault-injection hook for tests: at those steps
  (1-based, as the loop reports them) the loss and gradients are multiplied by NaN inside the
  jitted step, so the non-finite guard and the loop's NaN policy run for real.
  """
  trainable = selection.as_selection(trainable)  # Leaves, or slices of stacked layers.

  def loss_of_trainable(train_flat, frozen_flat, batch, weight, dropout_rng):
    params = model_lib.unflatten_params(selection.put(frozen_flat, train_flat, trainable))
    loss_sum, stats = task_loss(model, params, batch, task, z_loss, dropout_rng)
    return loss_sum / weight, stats

  grad_fn = jax.grad(loss_of_trainable, has_aux=True)

  def gradients(train_flat, frozen_flat, batch, dropout_rng):
    weight = jnp.maximum(batch_weight(batch, task), 1.0)
    if grad_accum == 1:
      return grad_fn(train_flat, frozen_flat, batch, weight, dropout_rng)
    micro = _microbatches(batch, grad_accum)
    rngs = jax.random.split(dropout_rng, grad_accum)

    def body(acc, xs):
      mb, rng = xs
      grads, stats = grad_fn(train_flat, frozen_flat, mb, weight, rng)
      return jax.tree.map(jnp.add, acc, (grads, stats)), None

    zeros = jax.tree.map(jnp.zeros_like, train_flat)
    zero_stats = {'nll_sum': jnp.zeros(()), 'z_sum': jnp.zeros(()), 'correct': jnp.zeros(())}
    (grads, stats), _ = jax.lax.scan(body, (zeros, zero_stats), (micro, rngs))
    return grads, stats

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    flat = model_lib.flatten_params(state.params)
    train_flat = selection.take(flat, trainable)
    # Partly trainable stacked leaves stay here too: their frozen slices are read from it.
    frozen_flat = {p: v for p, v in flat.items() if trainable.get(p, ()) is not None}
    rng, dropout_rng = jax.random.split(state.rng)
    grads, stats = gradients(train_flat, frozen_flat, batch, dropout_rng)
    if nan_steps:
      poison = jnp.where(jnp.isin(state.step + 1, jnp.asarray(nan_steps)), jnp.nan, 1.0)
      grads = jax.tree.map(lambda g: g * poison, grads)
      stats = {**stats, 'nll_sum': stats['nll_sum'] * poison}
    grad_norm = global_norm(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, train_flat)
    new_train = optax.apply_updates(train_flat, updates)

    weight = jnp.maximum(batch_weight(batch, task), 1.0)
    loss = stats['nll_sum'] / weight
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step leaves params and optimizer state as they were (the loop counts it).
    keep_new = lambda new, old: jnp.where(finite, new, old)
    new_train = jax.tree.map(keep_new, new_train, train_flat)
    new_opt_state = jax.tree.map(keep_new, new_opt_state, state.opt_state)
    params = model_lib.unflatten_params(selection.put(frozen_flat, new_train, trainable))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=new_opt_state, rng=rng)
    metrics = {
        'loss': loss,
        'z_loss': stats['z_sum'] / weight,
        'accuracy': stats['correct'] / weight,
        'grad_norm': grad_norm,
        'lr': schedule(state.step),
        'tokens': jnp.sum(batch['segment_ids'] != 0),
        'skipped': 1 - finite.astype(jnp.int32),
    }
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module, *, task: str = 'lm') -> Callable:
  """eval_step(params, batch) -> summed statistics (the loop divides by `weight`)."""

  def eval_step(params, batch: dict) -> dict:
    loss_sum, stats = task_loss(model, params, batch, task, 0.0)
    del loss_sum
    out = {'nll_sum': stats['nll_sum'], 'correct': stats['correct'],
           'weight': batch_weight(batch, task)}
    if task == 'classify':
      logits_BC = model.apply({'params': params}, batch['inputs'], batch['positions'],
                              batch['segment_ids'], head='classify')
      out['predictions'] = jnp.argmax(logits_BC, -1)
      out['labels'] = batch['labels']
      out['valid'] = jnp.any(batch['loss_mask'] > 0, axis=1)  # Padding rows hold no example.
    return out

  return eval_step


# --------------------------------------------------------------------------- state creation


def init_fn(model: nn.Module, seq_len: int, num_classes: int = 0) -> Callable:
  """rng -> boxed params (with logical axis metadata), for eval_shape and sharded init."""
  head = 'all' if num_classes else 'lm'

  def init(rng):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return model.init(rng, tokens, head=head)['params']

  return init


def state_shardings(params_shardings, tx, abstract_train_flat, train_shardings_flat, mesh):
  """Shardings for TrainState: optimizer moments follow their parameter; scalars replicate."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract_opt = jax.eval_shape(tx.init, abstract_train_flat)
  opt_shardings = optax.tree_utils.tree_map_params(
      tx, lambda _, s: s, abstract_opt, train_shardings_flat,
      transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=params_shardings, opt_state=opt_shardings,
                    rng=replicated)


def init_train_state(init: Callable, tx, trainable, shardings: TrainState, mesh, rules, *,
                     seed: int, params=None) -> TrainState:
  """A TrainState laid out as `shardings` (lm.build's state_shardings): fresh params (born
  sharded) from init(rng), or the given ones placed on the mesh."""
  params_rng, state_rng = jax.random.split(jax.random.key(seed))
  if params is None:
    params, _ = sharding_lib.init_sharded(init, mesh, rules, params_rng,
                                          shardings=shardings.params)
  else:
    params = jax.device_put(params, shardings.params)
  trainable = selection.as_selection(trainable)
  flat = model_lib.flatten_params(params)
  opt_state = jax.jit(lambda f: tx.init(selection.take(f, trainable)),
                      out_shardings=shardings.opt_state)({p: flat[p] for p in trainable})
  # Born on the mesh under jit: device_put cannot target devices of other processes.
  step0, state_rng = jax.jit(lambda r: (jnp.zeros((), jnp.int32), r),
                             out_shardings=(shardings.step, shardings.rng))(state_rng)
  return TrainState(step=step0, params=params, opt_state=opt_state, rng=state_rng)


def init_leaves(init: Callable, paths, params_shardings, mesh, rules, rng) -> dict[str, Any]:
  """{path: array} of only the named leaves of init(rng), each born sharded.

  The same values a full init gives them (flax derives each module's rng from its path), but
  XLA drops the rest of the init: a LoRA fine-tune (or a new task head) on a restored model
  never makes a second, random copy of the whole model to take the adapters from it.
  """
  paths = list(paths)
  flat_shardings = model_lib.flatten_params(params_shardings)

  def some_leaves(r):
    flat = model_lib.flatten_params(nn.meta.unbox(init(r)))
    return {p: flat[p] for p in paths}

  with sharding_lib.activate(mesh, rules):
    return jax.jit(some_leaves, out_shardings={p: flat_shardings[p] for p in paths})(rng)


def jit_train_step(train_step: Callable, shardings: TrainState, batch_shardings) -> Callable:
  return jax.jit(train_step, in_shardings=(shardings, batch_shardings),
                 out_shardings=(shardings, None), donate_argnums=(0,))


# --------------------------------------------------------------------------- FLOPs


def flops_per_token(m: ml_collections.ConfigDict, seq_len: int) -> float:
  """Training model FLOPs per token with every parameter trained (lm.flops.per_token has the
  formula, frozen parameters, LoRA, and hardware FLOPs with recomputation)."""
  return flops.per_token(m, seq_len)['model']

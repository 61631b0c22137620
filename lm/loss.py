"""Next-token cross-entropy, computed from the final hidden states a chunk of positions at a time.

The [B, T, V] float32 logits are never whole: `lm_loss` projects `model.logits_chunk`
positions to the vocabulary, takes their cross-entropy, and moves on (a lax.scan whose body
is rematerialised, so the backward pass recomputes one chunk's logits instead of keeping all
of them). With a 262k vocabulary (Gemma 3) at 4 x 2048 tokens the whole logits are 8 GiB in
float32 and their softmax and gradient as much again; a chunk of 256 positions holds 1/8 of
that. The price is the output projection's forward run twice (hardware FLOPs, lm/flops.py).
Logits, log-sum-exp and loss are float32. tests/test_loss.py checks loss and gradients equal
the full-logits path.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lm import model as model_lib

Array = jax.Array


def cross_entropy(logits_BTV: Array, targets_BT: Array, weights_BT: Array,
                  z_loss: float = 0.0) -> tuple[Array, Array]:
  """Summed next-token cross-entropy and summed z-loss, both weighted by the loss mask."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  nll_BT = log_z_BT - target_logit_BT
  z_BT = z_loss * jnp.square(log_z_BT)
  return jnp.sum(nll_BT * weights_BT), jnp.sum(z_BT * weights_BT)


def _stats(logits_BTV: Array, targets_BT: Array, weights_BT: Array, z_loss: float):
  """(nll_sum, z_sum, correct) of one block of positions."""
  nll_sum, z_sum = cross_entropy(logits_BTV, targets_BT, weights_BT, z_loss)
  correct = jnp.sum((jnp.argmax(logits_BTV, -1) == targets_BT) * weights_BT)
  return nll_sum, z_sum, correct


def chunk_size(seq_len: int, logits_chunk: int) -> int:
  """Positions per chunk: the largest divisor of seq_len not above logits_chunk (0 = all)."""
  if not logits_chunk or logits_chunk >= seq_len:
    return seq_len
  return max(c for c in range(1, logits_chunk + 1) if seq_len % c == 0)


def lm_loss(m: ml_collections.ConfigDict, params, hidden_BTD: Array, targets_BT: Array,
            weights_BT: Array, z_loss: float = 0.0) -> tuple[Array, Array, Array]:
  """(nll_sum, z_sum, correct) over all positions, `model.logits_chunk` positions at a time."""
  with jax.named_scope('logits_loss'):  # Named for lm.op_profile.
    return _lm_loss(m, params, hidden_BTD, targets_BT, weights_BT, z_loss)


def _lm_loss(m, params, hidden_BTD, targets_BT, weights_BT, z_loss):
  B, T, D = hidden_BTD.shape
  chunk = chunk_size(T, m.logits_chunk)

  def block_stats(h_BcD, t_Bc, w_Bc):
    logits_BcV = model_lib.logits_from_hidden(m, params, h_BcD)
    logits_BcV = nn.with_logical_constraint(logits_BcV, ('act_batch', 'act_length', 'act_vocab'))
    return _stats(logits_BcV, t_Bc, w_Bc, z_loss)

  if chunk == T:
    return block_stats(hidden_BTD, targets_BT, weights_BT)
  n = T // chunk
  to_chunks = lambda x: jnp.swapaxes(x.reshape((B, n, chunk) + x.shape[2:]), 0, 1)

  @jax.checkpoint  # Keep no chunk's logits for the backward pass: recompute them there.
  def body(totals, xs):
    stats = block_stats(*xs)
    return tuple(a + b for a, b in zip(totals, stats)), None

  zero = jnp.zeros((), jnp.float32)
  totals, _ = jax.lax.scan(body, (zero, zero, zero),
                           (to_chunks(hidden_BTD), to_chunks(targets_BT), to_chunks(weights_BT)))
  return totals

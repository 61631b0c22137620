"""Masked softmax attention over (grouped) heads, computed in query chunks.

  out_BTHD = dot_product_attention(q_BTHD, k_BSKD, v_BSKD, mask_B1TS, softcap=..., query_chunk=...)

q is already scaled. Heads are grouped as in GQA/MQA: query head h reads kv head h // (H / K).

With `query_chunk` dividing T (self-attention, T == S), queries are taken a chunk at a time
and each chunk only meets the keys up to its own last query: the causal mask zeroes the rest,
so those blocks are skipped (about (1 - 1/chunks) / 2 of the work) and the smaller blocks stay
in cache. Measured on the 2-core CPU, fwd+bwd of one bench_cpu layer (B 8, T 256, 6 heads of
64): 55 ms in one block, 37 ms in chunks of 64 or 128. (A hand-written flash-attention
backward was tried and was no faster here: XLA:CPU's batched matmuls reach ~40% of its
matmul peak either way; see docs/performance.md.) Decoding with a KV cache uses one block.

Scores, softmax weights and the normaliser are float32 whatever the compute dtype.
Rows with no visible key (fully masked) attend uniformly rather than producing NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
NEG_INF = -0.7 * float(np.finfo(np.float32).max)  # Finite, so fully-masked rows stay NaN-free.


def dot_product_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, mask_B1TS: Array, *,
                          softcap: float = 0.0, query_chunk: int = 0) -> Array:
  """[B, T, H, D] attention output; see the module docstring."""
  with jax.named_scope('attention'):  # Named for lm.op_profile.
    return _attention(q_BTHD, k_BSKD, v_BSKD, mask_B1TS, float(softcap), int(query_chunk))


def query_chunks(T: int, S: int, query_chunk: int) -> list[tuple[int, int, int]]:
  """(first query, end query, end key) per chunk; one chunk of all keys unless chunking applies."""
  if not query_chunk or T != S or T % query_chunk or query_chunk >= T:
    return [(0, T, S)]
  return [(start, start + query_chunk, start + query_chunk) for start in range(0, T, query_chunk)]


def _grouped(q_BTHD, k_BSKD, v_BSKD):
  B, T, H, Dh = q_BTHD.shape
  K = k_BSKD.shape[2]
  q_BKGTD = q_BTHD.reshape(B, T, K, H // K, Dh).transpose(0, 2, 3, 1, 4)
  return q_BKGTD, k_BSKD.transpose(0, 2, 1, 3), v_BSKD.transpose(0, 2, 1, 3)


def _ungrouped(x_BKGTD):
  B, K, G, T, Dh = x_BKGTD.shape
  return x_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, Dh)


def _capped_scores(q_BKGtD, k_BKsD, softcap):
  scores_BKGts = jnp.einsum('bkgtd,bksd->bkgts', q_BKGtD, k_BKsD,
                            preferred_element_type=jnp.float32)
  if softcap:
    scores_BKGts = softcap * jnp.tanh(scores_BKGts / softcap)
  return scores_BKGts


def _attention(q_BTHD, k_BSKD, v_BSKD, mask_B1TS, softcap, query_chunk):
  q_BKGTD, k_BKSD, v_BKSD = _grouped(q_BTHD, k_BSKD, v_BSKD)
  outs = []
  for start, stop, end in query_chunks(q_BTHD.shape[1], k_BSKD.shape[1], query_chunk):
    scores_BKGts = _capped_scores(q_BKGTD[:, :, :, start:stop], k_BKSD[:, :, :end], softcap)
    scores_BKGts = jnp.where(mask_B1TS[:, :, None, start:stop, :end], scores_BKGts, NEG_INF)
    # The max is only a shift for stability: no gradient flows through it.
    shift_BKGt1 = jax.lax.stop_gradient(jnp.max(scores_BKGts, axis=-1, keepdims=True))
    weights_BKGts = jnp.exp(scores_BKGts - shift_BKGt1)
    out_BKGtD = jnp.einsum('bkgts,bksd->bkgtd', weights_BKGts.astype(v_BKSD.dtype),
                           v_BKSD[:, :, :end], preferred_element_type=jnp.float32)
    # Normalising after the PV matmul divides [t, D] values instead of [t, s] weights.
    outs.append(out_BKGtD / jnp.sum(weights_BKGts, axis=-1, keepdims=True))
  out_BKGTD = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
  return _ungrouped(out_BKGTD).astype(q_BTHD.dtype)

"""Attention kernels behind one switch, `model.attention`, and the XLA reference they equal.

  out_BTHD = self_attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, kernel=..., window=...,
                            is_global=..., softcap=..., query_chunk=...)

q is already scaled. Heads are grouped as in GQA/MQA: query head h reads kv head h // (H / K).
A query sees the keys not later than itself, in its own non-zero segment (packed documents
never see each other), and on local layers only the last `window` of them.

  xla     `dot_product_attention` below: the reference, and the CPU kernel.
  splash  Pallas splash attention (TPU): segment ids, GQA (one MQA kernel per kv head),
          causal or local masks, logit soft-capping; sequence lengths divisible by 128.
          Off TPU it runs in Pallas interpret mode (slow; tests use it).
  cudnn   cuDNN flash attention (GPU) in its packed layout (segments as offsets). It cannot
          soft-cap logits and runs only in bf16/fp16 with head_dim <= 256: such layers use
          xla, with one warning (`cudnn_unsupported` says why).
  auto    splash on TPU, cudnn on GPU, xla elsewhere.

Under a mesh the fused kernels run per shard (shard_map): batch over data x fsdp, heads over
tensor, as the activation rules say. Decoding with a KV cache always uses xla.

The xla kernel: with `query_chunk` dividing T (self-attention, T == S), queries are taken a
chunk at a time and each chunk only meets the keys up to its own last query: the causal mask
zeroes the rest, so those blocks are skipped (about (1 - 1/chunks) / 2 of the work) and the
smaller blocks stay in cache. Measured on the 2-core CPU, fwd+bwd of one bench_cpu layer
(B 8, T 256, 6 heads of 64): 55 ms in one block, 37 ms in chunks of 64 or 128. (A
hand-written flash-attention backward was tried and was no faster here: XLA:CPU's batched
matmuls reach ~40% of its matmul peak either way; see docs/performance.md.)
Scores, softmax weights and the normaliser are float32 whatever the compute dtype.
Rows with no visible key (fully masked) attend uniformly rather than producing NaN.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec as P

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


# --------------------------------------------------------------------------- kernel switch

KERNELS = ('auto', 'xla', 'cudnn', 'splash')
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
  if key not in _warned:
    _warned.add(key)
    logging.warning('%s', message)


def resolve_kernel(name: str, platform: str | None = None) -> str:
  """model.attention -> the kernel used: 'auto' is splash on TPU, cudnn on GPU, xla elsewhere."""
  if name not in KERNELS:
    raise ValueError(f'model.attention={name!r}; expected one of {KERNELS}')
  if name != 'auto':
    return name
  platform = platform or jax.default_backend()
  return {'tpu': 'splash', 'gpu': 'cudnn'}.get(platform, 'xla')


def attention_mask(q_index_BT: Array, k_index_BS: Array, q_segment_BT: Array,
                   k_segment_BS: Array, window: Array | int) -> Array:
  """[B, 1, T, S] bool: causal, same non-zero segment, and within `window` when window > 0.

  Index arrays of batch 1 broadcast over the segments' batch (self-attention's 0..T-1).
  """
  q_idx = q_index_BT[:, None, :, None]
  k_idx = k_index_BS[:, None, None, :]
  allowed = k_idx <= q_idx
  allowed &= q_segment_BT[:, None, :, None] == k_segment_BS[:, None, None, :]
  allowed &= k_segment_BS[:, None, None, :] != 0
  in_window = (q_idx - k_idx) < window
  return allowed & ((window <= 0) | in_window)


def self_attention_mask(segment_ids_BT: Array, window: Array | int) -> Array:
  """[B, 1, T, T] bool for self-attention over packed rows (token i at position i)."""
  index_1T = jnp.arange(segment_ids_BT.shape[1])[None]
  return attention_mask(index_1T, index_1T, segment_ids_BT, segment_ids_BT, window)


def self_attention(q_BTHD: Array, k_BTKD: Array, v_BTKD: Array, segment_ids_BT: Array, *,
                   kernel: str, window: int = 0, is_global: Array | bool = True,
                   softcap: float = 0.0, query_chunk: int = 0) -> Array:
  """Causal self-attention over packed rows with the kernel model.attention names.

  q is already scaled. `window` > 0 limits local layers to the last `window` keys; a layer
  attends globally where `is_global` (a Python bool, or a traced one under nn.scan, where both
  variants are compiled and lax.cond picks one). Queries of padding tokens (segment 0) are
  never read by the loss; their outputs differ between kernels.
  """
  kernel = resolve_kernel(kernel)
  if kernel == 'cudnn':
    reason = cudnn_unsupported(q_BTHD, softcap) or (
        '' if jax.default_backend() == 'gpu' else f'no GPU ({jax.default_backend()} backend)')
    if reason:
      _warn_once('cudnn', f'model.attention=cudnn: {reason}; using the xla kernel instead')
      kernel = 'xla'
  if kernel == 'splash' and q_BTHD.shape[1] % SPLASH_MIN_BLOCK:
    _warn_once('splash', f'model.attention=splash needs a sequence length divisible by '
               f'{SPLASH_MIN_BLOCK} (got {q_BTHD.shape[1]}); using the xla kernel instead')
    kernel = 'xla'

  def run(local_window: int):
    if kernel == 'xla':
      mask_B1TT = self_attention_mask(segment_ids_BT, local_window)
      return dot_product_attention(q_BTHD, k_BTKD, v_BTKD, mask_B1TT, softcap=softcap,
                                   query_chunk=query_chunk)
    fn = functools.partial(_splash if kernel == 'splash' else _cudnn, window=local_window,
                           softcap=softcap)
    return _per_shard(fn, q_BTHD, k_BTKD, v_BTKD, segment_ids_BT)

  if not window:
    return run(0)
  if isinstance(is_global, (bool, np.bool_)):
    return run(0 if is_global else window)
  return jax.lax.cond(is_global, lambda: run(0), lambda: run(window))


def _per_shard(fn, q_BTHD, k_BTKD, v_BTKD, segment_ids_BT):
  """Runs a fused kernel on each device's shard: batch over data/fsdp, heads over tensor.

  A Pallas or cuDNN call cannot be partitioned by XLA, so under a mesh it runs in shard_map
  with the activation rules' specs (act_batch, act_heads, act_kv_heads). Heads are split
  in contiguous blocks, so a shard's query heads read exactly that shard's kv heads.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT)
  q_spec = nn.logical_to_mesh_axes(('act_batch', None, 'act_heads', None))
  kv_spec = nn.logical_to_mesh_axes(('act_batch', None, 'act_kv_heads', None))
  seg_spec = P(q_spec[0], None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                       out_specs=q_spec, check_vma=False)(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT)


# --------------------------------------------------------------------------- splash (TPU)

SPLASH_MIN_BLOCK = 128  # The kernel's lane width: block sizes (and so T) are multiples of it.


def _splash_kernel(T: int, group: int, window: int, softcap: float, interpret: bool):
  """A splash MQA kernel for one kv head and its `group` query heads, built while tracing
  (not cached: it holds arrays, which must belong to the trace that uses them).

  Local layers use LocalMask((window - 1, 0)): keys in (q - window, q], which is also causal.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # TPU-only module.
  if window:
    one = splash.LocalMask((T, T), (window - 1, 0), offset=0)
  else:
    one = splash.CausalMask((T, T))
  block = next(b for b in (512, 256, 128) if T % b == 0)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mqa_single_device(
      splash.MultiHeadMask([one] * group), block_sizes=sizes,
      attn_logits_soft_cap=softcap or None, interpret=interpret)


def _splash(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, *, window: int, softcap: float):
  """Splash attention: packed documents through segment ids, GQA as one MQA kernel per kv
  head (vmapped over batch and kv heads). Off TPU it runs in Pallas interpret mode (tests)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  q_BKGTD, k_BKTD, v_BKTD = _grouped(q_BTHD, k_BTKD, v_BTKD)
  T, G = q_BTHD.shape[1], q_BKGTD.shape[2]
  kernel = _splash_kernel(T, G, int(window), float(softcap), jax.default_backend() != 'tpu')

  def one_head(q_GTD, k_TD, v_TD, seg_T):
    return kernel(q_GTD, k_TD, v_TD, segment_ids=splash.SegmentIds(seg_T, seg_T))

  per_row = jax.vmap(one_head, in_axes=(0, 0, 0, None))  # Over kv heads.
  out_BKGTD = jax.vmap(per_row)(q_BKGTD, k_BKTD, v_BKTD, segment_ids_BT)
  return _ungrouped(out_BKGTD).astype(q_BTHD.dtype)


# --------------------------------------------------------------------------- cuDNN (GPU)

CUDNN_MAX_HEAD_DIM = 256


def cudnn_unsupported(q_BTHD: Array, softcap: float) -> str:
  """Why the cuDNN kernel cannot run this attention ('' if it can).

  cuDNN flash attention has no logit soft-capping (Gemma 2) and runs only in bfloat16 /
  float16 with head_dim a multiple of 8 up to 256; such layers use the xla kernel.
  """
  if softcap:
    return 'cuDNN has no attention-logit soft-capping (model.attn_logit_softcap)'
  if q_BTHD.dtype not in (jnp.bfloat16, jnp.float16):
    return f'cuDNN flash attention needs bfloat16/float16 compute, not {q_BTHD.dtype} (model.dtype)'
  Dh = q_BTHD.shape[-1]
  if Dh % 8 or Dh > CUDNN_MAX_HEAD_DIM:
    return f'cuDNN flash attention needs head_dim a multiple of 8 up to 256 (got {Dh})'
  return ''


def packed_segments(segment_ids_BT: Array, max_segments: int) -> tuple[Array, Array]:
  """cuDNN's packed ('THD') description of rows of whole documents.

  Returns seqlen_BM (tokens of each segment) and offsets_BM1 (first token of each segment,
  then the end of the last), int32, unused entries -1, as
  jax._src.cudnn.fused_attention_stablehlo.dot_product_attention reads them. Segments are
  the runs of equal non-zero ids (lm's packer writes each document as one run; padding is 0).
  """
  B, T = segment_ids_BT.shape
  seg = segment_ids_BT.astype(jnp.int32)
  starts_BT = (seg != 0) & jnp.concatenate(
      [jnp.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  ends_BT = (seg != 0) & jnp.concatenate(
      [seg[:, 1:] != seg[:, :-1], jnp.ones((B, 1), bool)], axis=1)
  positions = jnp.arange(T, dtype=jnp.int32)

  def first_m(flags_T):  # Positions of the first max_segments set flags, -1 after.
    order = jnp.argsort(jnp.where(flags_T, positions, T + positions), stable=True)[:max_segments]
    return jnp.where(flags_T[order], order, -1).astype(jnp.int32)

  start_BM = jax.vmap(first_m)(starts_BT)
  end_BM = jax.vmap(first_m)(ends_BT)
  seqlen_BM = jnp.where(start_BM >= 0, end_BM - start_BM + 1, -1)
  last_end_B1 = jnp.max(jnp.where(end_BM >= 0, end_BM + 1, -1), axis=1, keepdims=True)
  # offsets: starts, then the end of the last segment in the first unused slot.
  count_B = jnp.sum(start_BM >= 0, axis=1)
  offsets_BM1 = jnp.concatenate([start_BM, jnp.full((B, 1), -1, jnp.int32)], axis=1)
  offsets_BM1 = jnp.where(jnp.arange(max_segments + 1)[None] == count_B[:, None],
                          last_end_B1, offsets_BM1)
  return seqlen_BM.astype(jnp.int32), offsets_BM1.astype(jnp.int32)


def cudnn_arguments(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, *, window: int) -> dict:
  """Keyword arguments of the cuDNN call (pure; tested on CPU): BTNH layout as lm holds it,
  q pre-scaled (scale 1), causal with padding (the packed segments), a left window."""
  from jax._src.cudnn.fused_attention_stablehlo import MaskType  # Only the enum; no GPU needed.
  T = q_BTHD.shape[1]
  seqlen_BM, offsets_BM1 = packed_segments(segment_ids_BT, max_segments=T)
  return dict(query=q_BTHD, key=k_BTKD, value=v_BTKD, q_seqlen=seqlen_BM, kv_seqlen=seqlen_BM,
              q_offsets=offsets_BM1, kv_offsets=offsets_BM1, scale=1.0,
              mask_type=MaskType.PADDING_CAUSAL, qkv_layout='BTNH',
              sliding_window_length=int(window) or None)


def _cudnn(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, *, window: int, softcap: float):
  """cuDNN flash attention with packed documents (GQA native).

  jax.nn.dot_product_attention(implementation='cudnn') takes per-row lengths only, which
  cannot say "several documents in one row"; the cuDNN call underneath it takes the packed
  layout's segment offsets, so lm calls that (a jax._src API: pinned to the jax version in
  requirements.txt).
  """
  del softcap  # cudnn_unsupported sent soft-capped layers to xla.
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # GPU-only path.
  out = cudnn.dot_product_attention(**cudnn_arguments(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT,
                                                      window=window))
  return out.astype(q_BTHD.dtype)

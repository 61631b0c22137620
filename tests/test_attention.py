"""Attention kernels behind model.attention: splash (Pallas interpret mode on CPU) against the
xla reference, per-shard kernels under a mesh, and the cuDNN call's arguments (no GPU needed)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import attention, sharding
from lm import model as model_lib
from lm.config import base_config

B, T, H, K, D = 2, 256, 4, 2, 64


def packed_segments_BT():
  """Row 0: three packed documents; row 1: two documents then padding (segment 0)."""
  row0 = np.repeat([1, 2, 3], [100, 90, 66])
  row1 = np.repeat([1, 2, 0], [130, 70, 56])
  return jnp.asarray(np.stack([row0, row1]).astype(np.int32))


def qkv(seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (B, T, H, D), dtype) * D ** -0.5
  k = jax.random.normal(keys[1], (B, T, K, D), dtype)
  v = jax.random.normal(keys[2], (B, T, K, D), dtype)
  probe = jax.random.normal(keys[3], (B, T, H, D), jnp.float32)
  return q, k, v, probe


def loss_and_grads(kernel, segment_ids, q, k, v, probe, **kw):
  """A loss over real (non-padding) queries only: padding outputs are never read."""
  real = (segment_ids != 0)[:, :, None, None]

  def loss(q, k, v):
    out = attention.self_attention(q, k, v, segment_ids, kernel=kernel, **kw)
    return jnp.sum(jnp.where(real, out * probe, 0.0)), out

  (value, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return value, jnp.where(real, out, 0.0), grads


@pytest.mark.parametrize('window, softcap, is_global', [
    (0, 0.0, True),  # Causal, packed, GQA.
    (48, 5.0, False),  # Sliding window shorter than T, soft-capped logits.
    (48, 0.0, jnp.asarray(False)),  # A traced layer flag (nn.scan): both variants, lax.cond.
])
def test_splash_equals_xla_forward_and_gradients(window, softcap, is_global):
  segment_ids = packed_segments_BT()
  q, k, v, probe = qkv()
  kw = dict(window=window, softcap=softcap, is_global=is_global, query_chunk=64)
  ref = loss_and_grads('xla', segment_ids, q, k, v, probe, **kw)
  got = loss_and_grads('splash', segment_ids, q, k, v, probe, **kw)
  np.testing.assert_allclose(got[1], ref[1], atol=1e-5)
  for g_got, g_ref in zip(got[2], ref[2]):  # Summed over ~100 queries: f32 order, rtol too.
    np.testing.assert_allclose(g_got, g_ref, atol=1e-5, rtol=1e-5)


def test_splash_runs_per_shard_under_a_mesh():
  """Batch over data x fsdp, heads over tensor (shard_map): the same as one device."""
  segment_ids = packed_segments_BT()
  q, k, v, probe = qkv(1)
  kw = dict(window=48, softcap=0.0, is_global=False)
  ref = loss_and_grads('xla', segment_ids, q, k, v, probe, **kw)
  cfg = base_config()
  cfg.mesh.update(data=1, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:4])
  with sharding.activate(mesh, cfg.mesh.rules):
    got = loss_and_grads('splash', segment_ids, q, k, v, probe, **kw)
    jaxpr = str(jax.make_jaxpr(functools.partial(
        attention.self_attention, kernel='splash', window=48, is_global=False))(
            q, k, v, segment_ids))
  assert 'shard_map' in jaxpr
  np.testing.assert_allclose(got[1], ref[1], atol=1e-5)
  for g_got, g_ref in zip(got[2], ref[2]):  # Summed over ~100 queries: f32 order, rtol too.
    np.testing.assert_allclose(g_got, g_ref, atol=1e-5, rtol=1e-5)


def test_model_with_splash_equals_xla_gemma_pattern_scanned():
  """Local and global layers alternating under nn.scan (Gemma 3), GQA, soft-capping."""
  m = base_config().model
  m.update(vocab_size=64, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, mlp_dim=96,
           sliding_window=32, global_every=3, attn_logit_softcap=20.0, scan_layers=True,
           attn_query_chunk=64)
  tokens = jax.random.randint(jax.random.key(0), (2, 128), 0, 64)
  segments = jnp.asarray(np.tile(np.repeat([1, 2], 64), (2, 1)).astype(np.int32))
  positions = jnp.asarray(np.tile(np.concatenate([np.arange(64), np.arange(64)]), (2, 1)))
  params = jax.jit(model_lib.build_model(m).init)(jax.random.key(1), tokens)['params']
  logits = {}
  for kernel in ('xla', 'splash'):
    m.attention = kernel
    logits[kernel] = jax.jit(model_lib.build_model(m).apply)({'params': params}, tokens,
                                                               positions, segments)
  np.testing.assert_allclose(logits['splash'], logits['xla'], atol=1e-5)


def test_resolve_kernel_per_platform():
  assert attention.resolve_kernel('auto', 'tpu') == 'splash'
  assert attention.resolve_kernel('auto', 'gpu') == 'cudnn'
  assert attention.resolve_kernel('auto', 'cpu') == 'xla'
  assert attention.resolve_kernel('splash', 'cpu') == 'splash'
  with pytest.raises(ValueError, match='model.attention'):
    attention.resolve_kernel('flash')


# --------------------------------------------------------------------------- cuDNN arguments


def reference_segments(segment_ids, max_segments):
  seqlen = -np.ones((len(segment_ids), max_segments), np.int32)
  offsets = -np.ones((len(segment_ids), max_segments + 1), np.int32)
  for b, row in enumerate(np.asarray(segment_ids)):
    runs, start = [], 0
    for t in range(1, len(row) + 1):
      if t == len(row) or row[t] != row[start]:
        if row[start] != 0:
          runs.append((start, t))
        start = t
    for i, (s, e) in enumerate(runs):
      seqlen[b, i], offsets[b, i] = e - s, s
    offsets[b, len(runs)] = runs[-1][1] if runs else -1
  return seqlen, offsets


def mask_from_cudnn_arguments(args, T):
  """The [B, 1, T, T] mask cuDNN applies: same packed segment, causal, left window."""
  seqlen, offsets = np.asarray(args['q_seqlen']), np.asarray(args['q_offsets'])
  window = args['sliding_window_length']
  mask = np.zeros((len(seqlen), 1, T, T), bool)
  for b in range(len(seqlen)):
    for length, start in zip(seqlen[b], offsets[b]):
      if length < 0:
        continue
      for i in range(start, start + length):
        low = max(start, i - window + 1) if window else start
        mask[b, 0, i, low:i + 1] = True
  return mask


@pytest.mark.parametrize('window', [0, 48])
def test_cudnn_arguments_express_the_reference_mask(window):
  segment_ids = packed_segments_BT()
  q, k, v, _ = qkv(dtype=jnp.bfloat16)
  args = attention.cudnn_arguments(q, k, v, segment_ids, window=window)
  seqlen, offsets = reference_segments(segment_ids, T)
  np.testing.assert_array_equal(args['q_seqlen'], seqlen)
  np.testing.assert_array_equal(args['q_offsets'], offsets)
  assert args['kv_offsets'] is args['q_offsets'] and args['scale'] == 1.0
  assert args['qkv_layout'] == 'BTNH' and args['query'].shape == (B, T, H, D)
  assert args['key'].shape == (B, T, K, D)  # GQA: kv heads as they are, no repeat.
  assert args['mask_type'].name == 'PADDING_CAUSAL'
  want = np.asarray(attention.self_attention_mask(segment_ids, window))
  np.testing.assert_array_equal(mask_from_cudnn_arguments(args, T), want)


def test_packed_segments_edge_cases():
  rows = jnp.asarray([[5, 5, 5, 5], [0, 0, 0, 0], [1, 2, 1, 0]], jnp.int32)
  seqlen, offsets = attention.packed_segments(rows, 4)
  np.testing.assert_array_equal(seqlen, reference_segments(rows, 4)[0])
  np.testing.assert_array_equal(offsets, reference_segments(rows, 4)[1])


def test_cudnn_says_what_it_cannot_express():
  q_bf16 = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
  assert attention.cudnn_unsupported(q_bf16, 0.0) == ''
  assert 'soft-capping' in attention.cudnn_unsupported(q_bf16, 50.0)
  assert 'bfloat16' in attention.cudnn_unsupported(q_bf16.astype(jnp.float32), 0.0)
  assert 'head_dim' in attention.cudnn_unsupported(jnp.zeros((1, 128, 2, 512), jnp.bfloat16), 0.0)
  # On CPU (no cuDNN) float32 falls back to the reference, with one warning.
  segment_ids = packed_segments_BT()
  q, k, v, _ = qkv()
  out = attention.self_attention(q, k, v, segment_ids, kernel='cudnn')
  ref = attention.self_attention(q, k, v, segment_ids, kernel='xla')
  np.testing.assert_array_equal(out, ref)

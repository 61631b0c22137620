"""The chunked cross-entropy (lm/loss.py) equals the full-logits path: loss, z-loss, accuracy
and gradients, tied and untied output projections, soft-capped logits."""

import jax
import numpy as np
import pytest

from lm import loss, step
from lm import model as model_lib
from lm.config import base_config
from helpers import random_params


def full_logits_loss(model, params, batch, z_loss):
  logits = model.apply({'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'])
  weights = batch['loss_mask']
  nll, z = loss.cross_entropy(logits, batch['targets'], weights, z_loss)
  return nll + z, nll


@pytest.mark.parametrize('tie, softcap', [(True, 0.0), (False, 30.0)])
def test_chunked_loss_and_gradients_equal_full_logits(tie, softcap):
  m = base_config().model
  m.update(vocab_size=96, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_dim=64,
           tie_embeddings=tie, final_logit_softcap=softcap, logits_chunk=12)
  B, T = 3, 48
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 96, (B, T + 1)).astype(np.int32)
  mask = (rng.random((B, T)) > 0.2).astype(np.float32)
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=mask,
               segment_ids=np.ones((B, T), np.int32),
               positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)))
  model = model_lib.build_model(m)
  params = random_params(model)
  assert loss.chunk_size(T, m.logits_chunk) == 12  # 4 chunks: the scan path runs.

  def chunked(params):
    total, stats = step.task_loss(model, params, batch, 'lm', z_loss=1e-3)
    return total, stats['nll_sum']

  def full(params):
    return full_logits_loss(model, params, batch, 1e-3)

  (got, got_nll), got_grads = jax.jit(jax.value_and_grad(chunked, has_aux=True))(params)
  (want, want_nll), want_grads = jax.jit(jax.value_and_grad(full, has_aux=True))(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got_nll, want_nll, rtol=1e-5)
  flat_got, flat_want = model_lib.flatten_params(got_grads), model_lib.flatten_params(want_grads)
  for path in flat_want:
    # rtol 1e-5 of the leaf's scale: the tied embedding's gradient sums the lookup's and the
    # projection's, whose cancelling float32 terms differ in summation order.
    scale = float(np.max(np.abs(flat_want[path])))
    np.testing.assert_allclose(flat_got[path], flat_want[path], rtol=1e-5, atol=1e-5 * scale,
                               err_msg=path)


def test_chunk_size_divides_the_sequence():
  assert loss.chunk_size(2048, 256) == 256
  assert loss.chunk_size(100, 256) == 100
  assert loss.chunk_size(100, 30) == 25
  assert loss.chunk_size(128, 0) == 128

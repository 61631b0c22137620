"""Selecting parameters by path on scanned (stacked) and unscanned layers alike, and no silent
selections: freeze, trainable, LoRA targets, lr multipliers and weight-decay exemption."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm import config, lora, optim, selection, step
from lm import model as model_lib
from lm.config import ConfigError
from helpers import random_params

N_LAYERS = 3


def model_cfg(scan: bool):
  m = config.model_config()
  m.update(vocab_size=128, d_model=32, n_layers=N_LAYERS, n_heads=4, n_kv_heads=2, mlp_dim=64,
           attn_query_chunk=0, scan_layers=scan)
  return m


def batch(seed=0, B=4, T=12):
  tokens = np.random.default_rng(seed).integers(0, 128, (B, T + 1)).astype(np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=np.ones((B, T), np.int32),
              positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)),
              loss_mask=np.ones((B, T), np.float32))


def init(model):
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 12), jnp.int32))
  return jax.device_get(nn.meta.unbox(variables['params']))


def stacked_like(unscanned: dict, scanned_template: dict) -> dict:
  """The unscanned params in the scanned layout (stack_layers); a stacked leaf that some
  layers lack (LoRA adapters of non-target layers) takes those layers' slices from the
  scanned model's own init."""
  flat, template = model_lib.flatten_params(unscanned), model_lib.flatten_params(scanned_template)
  out = {}
  for path, leaf in template.items():
    if selection.is_stacked(path):
      out[path] = np.stack([flat.get(selection.layer_path(path, i), leaf[i])
                            for i in range(leaf.shape[0])])
    else:
      out[path] = flat[path]
  return model_lib.unflatten_params(out)


def train(model, params, finetune, optim_cfg, steps=4):
  flat = model_lib.flatten_params(params)
  trainable = optim.trainable_selection(flat, finetune, optim_cfg)
  tx, schedule = optim.make_optimizer(optim_cfg, 10, trainable)
  state = step.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(selection.take(flat, trainable)), rng=jax.random.key(0))
  train_step = jax.jit(step.make_train_step(model, tx, schedule, trainable))
  losses = []
  for i in range(steps):
    state, metrics = train_step(state, batch(i))
    losses.append(float(metrics['loss']))
  return state, trainable, losses


def optim_cfg():
  o = config.optim_config()
  o.update(warmup_steps=0, lr=1e-2, weight_decay=0.1,
           no_decay=('.*norm.*', '.*bias.*', '.*scale', 'layers_2/mlp/wo/kernel'),
           lr_multipliers=(('layers_1/attn/.*', 0.25),))
  return o


def per_layer(flat: dict) -> dict:
  """{per-layer path: array} of either layout."""
  out = {}
  for path, leaf in flat.items():
    for i, name in enumerate(selection.per_layer_paths(path, leaf.shape)):
      out[name] = leaf[i] if selection.is_stacked(path) else leaf
  return out


def test_scanned_and_unscanned_freeze_the_same_slices_and_train_alike():
  ft = config.finetune_config()
  ft.freeze = ('embed/.*', 'layers_0/mlp/.*', 'layers_[12]/attn/k/.*')
  runs = {}
  for scan in (False, True):
    model = model_lib.build_model(model_cfg(scan))
    params = random_params(model_lib.build_model(model_cfg(False)))
    if scan:
      params = stacked_like(params, random_params(model))
    state, trainable, losses = train(model, params, ft, optim_cfg())
    shapes = {p: x.shape for p, x in model_lib.flatten_params(params).items()}
    runs[scan] = (params, state, trainable, losses, shapes)
  # The scanned run really holds partly trainable stacked leaves.
  assert runs[True][2]['layers/mlp/wo/kernel'] == (1, 2)
  assert runs[True][2]['layers/attn/k/kernel'] == (0,)
  trained = {s: selection.selected_paths(r[2], r[4]) for s, r in runs.items()}
  assert trained[True] == trained[False]
  assert 'layers_0/mlp/wo/kernel' not in trained[True] and 'layers_1/mlp/wo/kernel' in trained[True]
  np.testing.assert_allclose(runs[True][3], runs[False][3], rtol=1e-5)
  for scan, (params, state, _, _, _) in runs.items():
    before = per_layer(model_lib.flatten_params(params))
    after = per_layer(model_lib.flatten_params(state.params))
    for name in before:
      if name in trained[scan]:
        assert not np.array_equal(after[name], before[name]), (scan, name)
      else:
        assert np.array_equal(after[name], before[name]), (scan, name)  # Bitwise.
  # The trained weights agree between the layouts too.
  scanned, unscanned = (per_layer(model_lib.flatten_params(runs[s][1].params)) for s in (True, False))
  for name, value in unscanned.items():
    np.testing.assert_allclose(scanned[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


def test_a_partly_frozen_stacked_leaf_keeps_optimizer_state_for_its_trainable_slices_only():
  ft = config.finetune_config()
  ft.freeze = ('layers_[01]/.*',)
  model = model_lib.build_model(model_cfg(True))
  params = init(model)
  flat = model_lib.flatten_params(params)
  trainable = optim.trainable_selection(flat, ft)
  tx, _ = optim.make_optimizer(config.optim_config(), 10, trainable)
  mu = optax.tree_utils.tree_get(tx.init(selection.take(flat, trainable)), 'mu')
  assert mu['layers/mlp/wo/kernel'].shape == (1,) + flat['layers/mlp/wo/kernel'].shape[1:]
  assert 'embed/embedding' in mu and mu['embed/embedding'].shape == flat['embed/embedding'].shape


def lora_cfg():
  ft = config.finetune_config()
  ft.lora_rank, ft.lora_alpha = 2, 4.0
  ft.lora_targets = ('layers_1/attn/q/kernel', '.*mlp/wi_0/kernel')
  return ft


def test_lora_targets_select_layers_of_a_scanned_model_like_an_unscanned_one():
  ft = lora_cfg()
  unscanned_model = model_lib.build_model(model_cfg(False), ft)
  unscanned_params = init(unscanned_model)
  flat = model_lib.flatten_params(unscanned_params)
  assert 'layers_1/attn/q/lora_a' in flat and 'layers_0/attn/q/lora_a' not in flat
  # Give B values so the adapters matter from the first step.
  flat = {p: np.full_like(v, 0.01) if p.endswith('lora_b') else v for p, v in flat.items()}
  unscanned_params = model_lib.unflatten_params(flat)
  scanned_model = model_lib.build_model(model_cfg(True), ft)
  template = model_lib.flatten_params(init(scanned_model))
  # Non-target layers' adapter slices exist under scan but start with B = 0: no effect.
  assert not template['layers/attn/q/lora_b'].any()
  scanned_params = stacked_like(unscanned_params, model_lib.unflatten_params(template))
  runs = {}
  for scan, model, params in ((False, unscanned_model, unscanned_params),
                              (True, scanned_model, scanned_params)):
    state, trainable, losses = train(model, params, ft, optim_cfg())
    shapes = {p: x.shape for p, x in model_lib.flatten_params(params).items()}
    runs[scan] = (state, selection.selected_paths(trainable, shapes), losses, params)
  assert runs[True][1] == runs[False][1]
  assert runs[True][1] == {f'layers_{i}/mlp/wi_0/lora_{ab}' for i in range(N_LAYERS) for ab in 'ab'} | {
      'layers_1/attn/q/lora_a', 'layers_1/attn/q/lora_b'}
  np.testing.assert_allclose(runs[True][2], runs[False][2], rtol=1e-5)
  # Non-target slices did not move, and merging leaves their kernels bitwise as they were.
  state, _, _, params = runs[True]
  before, after = model_lib.flatten_params(params), model_lib.flatten_params(state.params)
  for i in (0, 2):
    assert np.array_equal(after['layers/attn/q/lora_b'][i], before['layers/attn/q/lora_b'][i])
  merged = model_lib.flatten_params(jax.device_get(lora.merge(state.params, ft)))
  for i in (0, 2):
    assert np.array_equal(merged['layers/attn/q/kernel'][i], before['layers/attn/q/kernel'][i])
  assert not np.array_equal(merged['layers/attn/q/kernel'][1], before['layers/attn/q/kernel'][1])


@pytest.mark.parametrize('section,key,value,pattern', [
    ('finetune', 'freeze', ('embed/.*', 'layers_7/mlp/.*'), 'layers_7/mlp/.*'),
    ('finetune', 'trainable', ('layers_1/mpl/.*',), 'layers_1/mpl/.*'),
    ('finetune', 'lora_targets', ('.*attn/query/kernel',), '.*attn/query/kernel'),
    ('optim', 'lr_multipliers', (('lm_head/.*', 0.1),), 'lm_head/.*'),
    ('optim', 'no_decay', ('.*norm.*', 'layers_1/attn/qq/kernel'), 'layers_1/attn/qq/kernel'),
])
@pytest.mark.parametrize('scan', [False, True])
def test_a_pattern_that_selects_nothing_is_one_error_naming_it_and_the_closest_paths(
    section, key, value, pattern, scan):
  cfg = config.base_config()
  cfg.model = model_cfg(scan)
  cfg[section][key] = value
  if key == 'lora_targets':
    cfg.finetune.lora_rank = 2
  model = model_lib.build_model(cfg.model, cfg.finetune if cfg.finetune.lora_rank else None)
  abstract = nn.meta.unbox(jax.eval_shape(step.init_fn(model, 12), jax.random.key(0)))
  with pytest.raises(ConfigError) as error:
    optim.trainable_selection(model_lib.flatten_params(abstract), cfg.finetune, cfg.optim)
  message = str(error.value)
  assert f'config key {section}.{key}' in message and repr(pattern) in message
  assert 'closest paths: layers_1/' in message or 'closest paths: ' in message
  closest = message.split('closest paths: ')[1].split(')')[0].split(', ')
  assert all('/' in p and not p.startswith('layers/') for p in closest), closest  # Real names.


def test_generic_no_decay_defaults_matching_nothing_are_logged_not_fatal(caplog):
  cfg = config.base_config()
  cfg.model = model_cfg(True)
  abstract = nn.meta.unbox(jax.eval_shape(step.init_fn(model_lib.build_model(cfg.model), 12),
                                          jax.random.key(0)))
  with caplog.at_level(logging.INFO, logger='absl'):  # absl's logger, whatever ran before.
    trainable = optim.trainable_selection(model_lib.flatten_params(abstract), None, cfg.optim)
  assert trainable['layers/mlp/wo/kernel'] is None
  assert ".*bias.*" in caplog.text  # The model has no biases: said, not raised.


def test_closest_paths_for_a_typo_name_the_intended_parameter():
  shapes = {'layers/mlp/wo/kernel': (3, 4, 4), 'embed/embedding': (8, 4)}
  assert selection.closest_paths('layers_1/mlp/wo/kernal', shapes)[0] == 'layers_1/mlp/wo/kernel'

"""Fine-tuning: freezing, LoRA, SFT masking, classification, strict restore, and the report."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import checkpoint, config, finetune, lora, loop, optim, sharding, step
from lm import run as run_lib
from lm.evaluate import macro_f1
from lm import model as model_lib
from helpers import host_params, random_batch, random_params, tiny_config, tiny_model_cfg


def make_state(model, params, trainable, optim_cfg=None):
  optim_cfg = optim_cfg or config.optim_config()
  tx, schedule = optim.make_optimizer(optim_cfg, 10, trainable)
  flat = model_lib.flatten_params(params)
  state = step.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init({p: flat[p] for p in trainable}),
                          rng=jax.random.key(0))
  return state, tx, schedule


def test_frozen_params_stay_bitwise_equal_and_hold_no_optimizer_state():
  model = model_lib.build_model(tiny_model_cfg())
  params = random_params(model)
  ft = config.finetune_config()
  ft.freeze = ('embed/.*', 'layers_0/.*')
  paths = list(model_lib.flatten_params(params))
  trainable = optim.trainable_selection(model_lib.flatten_params(params), ft)
  assert 'embed/embedding' not in trainable and 'layers_1/mlp/wo/kernel' in trainable
  assert not any(p.startswith('layers_0/') for p in trainable)
  state, tx, schedule = make_state(model, params, trainable)
  # Optimizer state exists for trainable leaves only.
  import optax
  mu = optax.tree_utils.tree_get(state.opt_state, 'mu')
  assert set(mu) == set(trainable)

  batch = random_batch()
  train_step = jax.jit(step.make_train_step(model, tx, schedule, trainable))
  new_state, metrics = train_step(state, batch)
  for _ in range(2):
    new_state, _ = train_step(new_state, batch)
  before, after = model_lib.flatten_params(params), model_lib.flatten_params(new_state.params)
  for path in paths:
    if path in trainable:
      assert not np.array_equal(after[path], before[path]), path
    else:
      assert np.array_equal(after[path], before[path]), path  # Bitwise.

  # grad-norm is over trainable leaves only.
  def loss_fn(p):
    loss_sum, _ = step.task_loss(model, p, batch, 'lm', 0.0)
    return loss_sum / jnp.sum(batch['loss_mask'])
  grads = model_lib.flatten_params(jax.jit(jax.grad(loss_fn))(params))
  expected = np.sqrt(sum(np.sum(np.square(grads[p])) for p in trainable))
  full = np.sqrt(sum(np.sum(np.square(g)) for g in grads.values()))
  np.testing.assert_allclose(metrics['grad_norm'], expected, rtol=1e-5)
  assert full > expected * 1.01


def test_trainable_patterns_and_lr_multipliers():
  model = model_lib.build_model(tiny_model_cfg())
  params = random_params(model)
  ft = config.finetune_config()
  ft.trainable = ('layers_1/.*', 'final_norm/.*')
  ft.freeze = ('.*norm.*',)
  trainable = optim.trainable_selection(model_lib.flatten_params(params), ft)
  assert trainable and all(p.startswith('layers_1/') and 'norm' not in p for p in trainable)
  optim_cfg = config.optim_config()
  optim_cfg.lr_multipliers = (('layers_1/mlp/.*', 0.0),)
  state, tx, schedule = make_state(model, params, trainable, optim_cfg)
  new_state, _ = jax.jit(step.make_train_step(model, tx, schedule, trainable))(state, random_batch())
  new_state, _ = jax.jit(step.make_train_step(model, tx, schedule, trainable))(new_state, random_batch())
  after, before = model_lib.flatten_params(new_state.params), model_lib.flatten_params(params)
  assert np.array_equal(after['layers_1/mlp/wo/kernel'], before['layers_1/mlp/wo/kernel'])
  assert not np.array_equal(after['layers_1/attn/q/kernel'], before['layers_1/attn/q/kernel'])


def lora_finetune_cfg(rank=4):
  ft = config.finetune_config()
  ft.lora_rank, ft.lora_alpha = rank, 8.0
  ft.lora_targets = ('.*attn/(q|v|o)/kernel', '.*mlp/wi_0/kernel')
  return ft


def test_new_leaves_are_initialised_alone_with_the_values_a_full_init_gives_them():
  """A LoRA fine-tune restores the base model and initialises only the adapters (sharded)."""
  model = model_lib.build_model(tiny_model_cfg(), lora_finetune_cfg())
  init, rng, mesh_cfg = step.init_fn(model, 16), jax.random.key(3), config.mesh_config()
  mesh_cfg.data, mesh_cfg.fsdp = 2, 4
  mesh = sharding.make_mesh(mesh_cfg)
  full, shardings = sharding.init_sharded(init, mesh, mesh_cfg.rules, rng)
  full_flat = model_lib.flatten_params(full)
  adapters = lora.adapter_paths(full_flat)
  some = step.init_leaves(init, adapters, shardings, mesh, mesh_cfg.rules, rng)
  assert sorted(some) == sorted(adapters) and len(some) < len(full_flat)
  for path, value in some.items():
    assert value.sharding == full_flat[path].sharding, path
    np.testing.assert_array_equal(np.asarray(value), np.asarray(full_flat[path]), err_msg=path)


@pytest.mark.parametrize('scan', [False, True])
def test_lora_starts_at_the_base_model_and_merges_exactly(scan):
  mcfg = tiny_model_cfg(scan_layers=scan)
  base = model_lib.build_model(mcfg)
  ft = lora_finetune_cfg()
  adapted = model_lib.build_model(mcfg, ft)
  tokens = np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.int32)
  adapted_params = host_params(adapted)
  flat = model_lib.flatten_params(adapted_params)
  assert {p for p in flat if 'lora' in p} == set(lora.adapter_paths(flat))
  assert any(p.endswith('attn/q/lora_a') for p in flat) and not any('attn/k/lora' in p for p in flat)
  base_params = model_lib.unflatten_params(
      {p: v for p, v in flat.items() if p not in lora.adapter_paths(flat)})
  adapted_logits, base_logits = jax.jit(adapted.apply), jax.jit(base.apply)
  np.testing.assert_array_equal(adapted_logits({'params': adapted_params}, tokens),
                                base_logits({'params': base_params}, tokens))
  # Give B random values: the adapter now matters, and merging reproduces it exactly.
  rng = np.random.default_rng(1)
  flat = {p: (rng.normal(0, 0.05, v.shape).astype(np.float32) if p.endswith('lora_b') else v)
          for p, v in flat.items()}
  adapted_params = model_lib.unflatten_params(flat)
  adapter_logits = adapted_logits({'params': adapted_params}, tokens)
  assert not np.allclose(adapter_logits, base_logits({'params': base_params}, tokens), atol=1e-3)
  merged = lora.merge(adapted_params, ft)
  np.testing.assert_allclose(base_logits({'params': merged}, tokens), adapter_logits, atol=2e-5)


def test_lora_trains_only_adapters():
  mcfg = tiny_model_cfg()
  ft = lora_finetune_cfg()
  model = model_lib.build_model(mcfg, ft)
  params = host_params(model)
  paths = list(model_lib.flatten_params(params))
  trainable = optim.trainable_selection(model_lib.flatten_params(params), ft)
  assert set(trainable) == set(lora.adapter_paths(model_lib.flatten_params(params)))
  state, tx, schedule = make_state(model, params, trainable)
  train_step = jax.jit(step.make_train_step(model, tx, schedule, trainable))
  new_state = state
  for _ in range(3):  # The first step has lr 0 (warmup); A moves once B is non-zero.
    new_state, _ = train_step(new_state, random_batch())
  before, after = model_lib.flatten_params(params), model_lib.flatten_params(new_state.params)
  for path in paths:
    changed = not np.array_equal(before[path], after[path])
    assert changed == (path in trainable), path


def test_sft_loss_ignores_prompt_tokens():
  model = model_lib.build_model(tiny_model_cfg())
  params = random_params(model)
  batch = random_batch()
  batch['loss_mask'][:, :6] = 0.0  # The first 6 targets are prompt tokens.
  loss = step.task_loss(model, params, batch, 'sft', 0.0)[0]
  changed = dict(batch, targets=batch['targets'].copy())
  changed['targets'][:, :6] = (changed['targets'][:, :6] + 11) % 256
  np.testing.assert_array_equal(step.task_loss(model, params, changed, 'sft', 0.0)[0], loss)
  changed['targets'][:, 6] = (changed['targets'][:, 6] + 11) % 256
  assert step.task_loss(model, params, changed, 'sft', 0.0)[0] != loss


def test_classification_head_learns_a_separable_task():
  mcfg = tiny_model_cfg(num_classes=2)
  model = model_lib.build_model(mcfg)
  variables = jax.jit(functools.partial(model.init, head='all'))(jax.random.key(0),
                                                               jnp.zeros((1, 16), jnp.int32))
  params = jax.device_get(nn.meta.unbox(variables['params']))
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 32).astype(np.int32)
  # Class 0 uses tokens 10..60, class 1 tokens 100..150; rows have different lengths.
  tokens = np.where(labels[:, None] == 0, rng.integers(10, 60, (32, 16)), rng.integers(100, 150, (32, 16)))
  lengths = rng.integers(6, 17, 32)
  segments = (np.arange(16)[None] < lengths[:, None]).astype(np.int32)
  batch = dict(inputs=(tokens * segments).astype(np.int32), targets=np.zeros((32, 16), np.int32),
               segment_ids=segments, positions=np.tile(np.arange(16, dtype=np.int32), (32, 1)),
               loss_mask=segments.astype(np.float32), labels=labels)
  paths = list(model_lib.flatten_params(params))
  optim_cfg = config.optim_config()
  optim_cfg.warmup_steps = 0
  state, tx, schedule = make_state(model, params, paths, optim_cfg)
  train_step = jax.jit(step.make_train_step(model, tx, schedule, paths, task='classify'))
  for _ in range(30):
    state, metrics = train_step(state, batch)
  assert float(metrics['accuracy']) == 1.0
  out = jax.jit(step.make_eval_step(model, task='classify'))(state.params, batch)
  assert np.array_equal(out['predictions'], labels)
  assert macro_f1(np.asarray(out['predictions']), labels, 2) == 1.0


# --------------------------------------------------------------------------- restore and e2e


# Two layers: the per-layer freezing test freezes layer 0 and trains layer 1.
TWO_LAYERS = {'model.n_layers': 2}


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('pretrained')
  loop.train(tiny_config(**TWO_LAYERS, **{'train.steps': 4}), workdir)
  return workdir


def finetune_config(pretrained, **overrides):
  cfg = tiny_config(**{**TWO_LAYERS, 'train.steps': 3, 'data.builtin_subset': 'email',
                       **overrides})
  cfg.finetune.restore_from = str(pretrained)
  cfg.finetune.general_eval = True
  cfg.finetune.probes = ('gender_occupation',)
  return cfg


def test_restore_errors_name_the_problem(pretrained, tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match='does not exist'):
    checkpoint.load_params(tmp_path / 'nowhere')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(checkpoint.CheckpointError, match='no complete checkpoint'):
    checkpoint.load_params(tmp_path / 'empty')
  cfg = finetune_config(pretrained)
  cfg.model.mlp_dim = 96  # Not what was trained: a shape mismatch naming both shapes.
  run = run_lib.build_run(cfg, tmp_path / 'ft', is_finetune=True)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'shape mismatch layers_0/mlp/wi_0/kernel: checkpoint \(64, 128\), model \(64, 96\)'):
    run_lib.initial_params(run)
  cfg = finetune_config(pretrained, **{'model.num_classes': 3})
  cfg.finetune.task = 'classify'
  run = run_lib.build_run(cfg, tmp_path / 'ft2', is_finetune=True)
  with pytest.raises(checkpoint.CheckpointError, match='missing cls_head/kernel'):
    run_lib.initial_params(run)


def test_finetune_with_frozen_embeddings_reports_what_changed(pretrained, tmp_path):
  cfg = finetune_config(pretrained)
  cfg.finetune.freeze = ('embed/.*',)
  summary = finetune.finetune(cfg, tmp_path / 'ft')
  report = json.loads((tmp_path / 'ft' / 'finetune_report.json').read_text())
  for key in ('domain_loss', 'general_loss', 'domain_perplexity'):
    assert key in report['before'] and key in report['after']
  assert report['probes']['gender_occupation']['pairs'] == 240
  assert report['after']['domain_loss'] != report['before']['domain_loss']
  assert '| embed | 0 |' in report['parameters']
  assert (tmp_path / 'ft' / 'finetune_report.md').exists()
  source = model_lib.flatten_params(jax.device_get(checkpoint.load_params(pretrained)))
  tuned = model_lib.flatten_params(jax.device_get(checkpoint.load_params(tmp_path / 'ft')))
  assert np.array_equal(source['embed/embedding'], tuned['embed/embedding'])
  assert not np.array_equal(source['layers_1/mlp/wo/kernel'], tuned['layers_1/mlp/wo/kernel'])
  assert summary['step'] == 3


def test_lora_finetune_writes_a_merged_checkpoint(pretrained, tmp_path):
  cfg = finetune_config(pretrained)
  cfg.finetune.lora_rank = 4
  cfg.finetune.general_eval = False
  cfg.finetune.probes = ()
  summary = finetune.finetune(cfg, tmp_path / 'lora')
  merged = checkpoint.load_params(summary['report']['merged_checkpoint'])
  assert not any('lora' in p for p in model_lib.flatten_params(merged))
  assert checkpoint.read_config(summary['report']['merged_checkpoint']).finetune.lora_rank == 0


def test_per_layer_freezing_on_a_scanned_finetune_of_an_unscanned_checkpoint(pretrained, tmp_path):
  """The README's freezing example on scanned layers, restoring the other layout."""
  cfg = finetune_config(pretrained, **{'model.scan_layers': True})
  cfg.finetune.general_eval = False
  cfg.finetune.probes = ()
  cfg.finetune.freeze = ('embed/.*', 'layers_0/.*')
  cfg.optim.lr_multipliers = (('layers_[0-1]/.*', 0.1),)
  summary = finetune.finetune(cfg, tmp_path / 'scanned')
  table = summary['report']['parameters']
  assert '| layers_0 | 0 | 0.00 |' in table and '| layers_1 | 0 |' not in table
  source = model_lib.flatten_params(jax.device_get(checkpoint.load_params(pretrained)))
  tuned = model_lib.flatten_params(jax.device_get(checkpoint.load_params(tmp_path / 'scanned')))
  assert 'layers/mlp/wo/kernel' in tuned  # Saved in the run's (scanned) layout.
  for path, value in tuned.items():
    if path.startswith('layers/'):
      rest = path[len('layers/'):]
      assert np.array_equal(value[0], source[f'layers_0/{rest}']), path  # Frozen slice, bitwise.
      assert not np.array_equal(value[1], source[f'layers_1/{rest}']), path
  assert np.array_equal(tuned['embed/embedding'], source['embed/embedding'])
  # Resuming restores the optimizer state of the trainable slices (shape [1, ...]) and goes on.
  cfg.train.steps = 4
  resumed = finetune.finetune(cfg, tmp_path / 'scanned')
  assert resumed['resumed_from'] == 3 and resumed['step'] == 4
  tuned = model_lib.flatten_params(jax.device_get(checkpoint.load_params(tmp_path / 'scanned')))
  assert np.array_equal(tuned['layers/mlp/wo/kernel'][0], source['layers_0/mlp/wo/kernel'])

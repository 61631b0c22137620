"""Checkpoint restore: quarantine only for damaged files, layouts converted on restore, and an
explicit architecture that contradicts the checkpoint named key by key."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import checkpoint, config, finetune, sharding, step
from lm import model as model_lib
from lm.config import ConfigError
from helpers import random_params

P = jax.sharding.PartitionSpec


def small_state(value: float):
  params = {'w': jnp.full((8, 4), value), 'b': jnp.full((4,), value)}
  return step.TrainState(step=jnp.asarray(int(value), jnp.int32), params=params,
                         opt_state={'mu': jax.tree.map(jnp.zeros_like, params)},
                         rng=jax.random.key(0))


def abstract(state, mesh, spec=P()):
  shard = jax.sharding.NamedSharding(mesh, spec)
  rep = jax.sharding.NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=shard if x.ndim == 2 else rep), state)


@pytest.fixture
def two_steps(tmp_path):
  manager = checkpoint.make_manager(tmp_path / 'checkpoints', async_save=False)
  for s in (1, 2):
    checkpoint.save(manager, s, small_state(float(s)), force=True)
  return manager, tmp_path


def test_a_restore_error_that_is_not_damage_propagates_and_quarantines_nothing(two_steps):
  manager, workdir = two_steps
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('x',))
  # A sharding bug: 8 rows over 8 devices is fine, but ask for the 4 columns over 8 devices.
  bad = abstract(small_state(0.0), mesh, P(None, 'x'))
  with pytest.raises(ValueError) as error:
    checkpoint.restore_latest(manager, bad)
  assert not checkpoint.is_integrity_error(error.value)
  assert sorted(manager.all_steps()) == [1, 2]
  assert not (workdir / 'corrupt_checkpoints').exists()
  # The same steps restore with a sound sharding: the newest one.
  state, latest = checkpoint.restore_latest(manager, abstract(small_state(0.0), mesh, P('x')))
  assert latest == 2 and float(state.params['w'][0, 0]) == 2.0


def test_damaged_files_still_quarantine_the_step(two_steps):
  manager, workdir = two_steps
  step_dir = workdir / 'checkpoints' / '2'
  # Without a manifest (older checkpoints) damage shows only when restoring: a missing file.
  os.remove(step_dir / checkpoint.MANIFEST)
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / 'state') for f in fs]
  os.remove(max(files, key=os.path.getsize))
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('x',))
  state, latest = checkpoint.restore_latest(manager, abstract(small_state(0.0), mesh, P('x')))
  assert latest == 1 and float(state.params['w'][0, 0]) == 1.0
  assert os.listdir(workdir / 'corrupt_checkpoints') == ['2']


def test_integrity_errors_are_told_from_other_errors():
  assert checkpoint.is_integrity_error(FileNotFoundError('x'))
  try:
    try:
      raise ValueError('DATA_LOSS: Error reading chunk')
    except ValueError as inner:
      raise RuntimeError('restore failed') from inner
  except RuntimeError as e:
    assert checkpoint.is_integrity_error(e)
  assert not checkpoint.is_integrity_error(RuntimeError('RESOURCE_EXHAUSTED: out of memory'))
  assert not checkpoint.is_integrity_error(ValueError('sharding is incompatible with shape'))


# --------------------------------------------------------------------------- layouts


def model_cfg(scan, **overrides):
  m = config.model_config()
  m.update(dict(dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                     mlp_dim=64, scan_layers=scan), **overrides))
  return m


def abstract_params(mcfg, mesh_dims=(2, 2, 2)):
  mesh_cfg = config.mesh_config()
  mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = mesh_dims
  mesh = sharding.make_mesh(mesh_cfg)
  model = model_lib.build_model(mcfg)
  ab, shardings = sharding.abstract_and_shardings(step.init_fn(model, 8), mesh,
                                                  config.DEFAULT_RULES, jax.random.key(0))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      ab, shardings)


def some_params(mcfg):
  """Random weights of the model mcfg describes: a round trip holds for any."""
  return random_params(model_lib.build_model(mcfg), seed=1)


@pytest.mark.parametrize('saved_scan', [True, False])
def test_a_checkpoint_restores_into_the_other_layer_layout(saved_scan, tmp_path):
  saved = some_params(model_cfg(saved_scan))
  cfg = config.base_config()
  cfg.model = model_cfg(saved_scan)
  checkpoint.save_params(tmp_path / 'ckpt', saved, cfg)
  target = abstract_params(model_cfg(not saved_scan))
  restored = checkpoint.load_params(tmp_path / 'ckpt', target)
  convert = model_lib.unstack_layers if saved_scan else model_lib.stack_layers
  expected = model_lib.flatten_params(jax.device_get(convert(saved, 3)))
  got = model_lib.flatten_params(restored)
  assert sorted(got) == sorted(expected)
  wanted = model_lib.flatten_params(target)
  for path, value in expected.items():
    assert got[path].sharding == wanted[path].sharding, path  # Placed as the model wants.
    np.testing.assert_array_equal(jax.device_get(got[path]), value, err_msg=path)


def test_layers_that_cannot_be_stacked_name_model_scan_layers(tmp_path):
  flat = model_lib.flatten_params(some_params(model_cfg(False)))
  flat['layers_1/mlp/wo/kernel'] = flat['layers_1/mlp/wo/kernel'][:32]  # Not stackable.
  cfg = config.base_config()
  checkpoint.save_params(tmp_path / 'ckpt', model_lib.unflatten_params(flat), cfg)
  with pytest.raises(checkpoint.CheckpointError, match='model.scan_layers'):
    checkpoint.load_params(tmp_path / 'ckpt', abstract_params(model_cfg(True)))
  # A layer count that differs is a mismatch whose message names both keys.
  checkpoint.save_params(tmp_path / 'ckpt4', some_params(model_cfg(True, n_layers=4)), cfg)
  with pytest.raises(checkpoint.CheckpointError, match=r'(?s)model.scan_layers and model.n_layers.*'
                                                       r'unexpected layers_3/'):
    checkpoint.load_params(tmp_path / 'ckpt4', abstract_params(model_cfg(False)))


def test_an_explicit_architecture_that_differs_from_the_checkpoint_lists_the_keys(tmp_path):
  cfg = config.base_config()
  cfg.model = model_cfg(False)
  checkpoint.save_params(tmp_path / 'ckpt', some_params(cfg.model), cfg)
  ft = config.base_config()
  ft.finetune.restore_from = str(tmp_path / 'ckpt')
  ft.model.update(d_model=48, n_layers=3, mlp_dim=96, scan_layers=True)
  with pytest.raises(ConfigError) as error:
    finetune.inherit_architecture(ft)
  message = str(error.value)
  assert 'model.d_model: config 48, checkpoint 32' in message
  assert 'model.mlp_dim: config 96, checkpoint 64' in message
  assert 'n_layers' not in message and 'scan_layers' not in message  # Agreeing / runtime keys.
  # Keys left at their defaults take the checkpoint's values.
  ft = config.base_config()
  ft.finetune.restore_from = str(tmp_path / 'ckpt')
  ft.model.scan_layers = True
  finetune.inherit_architecture(ft)
  assert (ft.model.d_model, ft.model.n_layers, ft.model.scan_layers) == (32, 3, True)


def test_replicated_arrays_large_and_small_round_trip(tmp_path):
  # Replicated over 8 devices: the large array's copies each write a 1 MiB piece (Orbax's
  # replica-parallel save), the small one is written whole by one copy.
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('x',))
  replicated = jax.sharding.NamedSharding(mesh, P())
  rows = 8 * checkpoint.MIN_BYTES_PER_REPLICA_SLICE // (4 * 256)
  params = {'large': jnp.arange(rows * 256, dtype=jnp.float32).reshape(rows, 256),
            'small': jnp.arange(64, dtype=jnp.float32)}
  state = step.TrainState(step=jnp.asarray(3, jnp.int32), rng=jax.random.key(0),
                          params=jax.device_put(params, replicated), opt_state={})
  manager = checkpoint.make_manager(tmp_path / 'checkpoints', async_save=False)
  checkpoint.save(manager, 3, state, force=True)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        state)
  restored, latest = checkpoint.restore_latest(manager, target)
  assert latest == 3
  for name, value in params.items():
    np.testing.assert_array_equal(np.asarray(restored.params[name]), np.asarray(value),
                                  err_msg=name)

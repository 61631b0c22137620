"""lm.build: one config + mesh -> model, abstract sharded params, trainable set, optimizer; and
a saved checkpoint back to (config, params)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from lm import build, checkpoint, config, memory, sharding
from lm import model as model_lib


def tiny_cfg(**finetune):
  cfg = config.base_config()
  cfg.model.update(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128)
  cfg.data.update(seq_len=16, batch_size=8)
  cfg.mesh.update(data=2, fsdp=4, tensor=1)
  cfg.finetune.update(finetune)
  return config.validate(cfg, 8)


def test_pretraining_build_has_every_param_trainable_and_sharded_by_the_rules():
  cfg = tiny_cfg()
  mesh = sharding.make_mesh(cfg.mesh)
  built = build.build(cfg, mesh)
  assert not built.is_finetune and built.task == 'lm'
  host = model_lib.flatten_params(nn.meta.unbox(jax.eval_shape(
      lambda: built.model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))['params'])))
  flat = model_lib.flatten_params(built.abstract_params)
  assert {p: (x.shape, x.dtype) for p, x in flat.items()} == \
      {p: (x.shape, x.dtype) for p, x in host.items()}
  assert sorted(built.trainable) == sorted(flat)
  embed = next(x for p, x in flat.items() if p.startswith('embed'))
  assert embed.sharding.spec == P('tensor', 'fsdp')  # The rules table: vocab, embed.
  assert set(optax.tree_utils.tree_get(built.abstract_opt_state, 'mu')) == set(built.trainable)
  assert built.trainable_params(built.abstract_params).keys() == set(built.trainable)


def test_a_finetune_section_selects_the_trainable_set_and_lora_adds_adapters():
  frozen = build.build(tiny_cfg(restore_from='x', freeze=('embed/.*',)),
                       sharding.make_mesh(tiny_cfg().mesh))
  assert frozen.is_finetune and not any(p.startswith('embed') for p in frozen.trainable)
  assert any(p.startswith('layers') for p in frozen.trainable)
  lora = build.build(tiny_cfg(lora_rank=4), sharding.make_mesh(tiny_cfg().mesh))
  assert lora.trainable and all('lora' in p for p in lora.trainable)
  assert not build.build(tiny_cfg(lora_rank=4), sharding.make_mesh(tiny_cfg().mesh),
                         finetune=False).is_finetune
  with pytest.raises(config.ConfigError, match='leave no parameter to train'):
    build.build(tiny_cfg(freeze=('.*',)), sharding.make_mesh(tiny_cfg().mesh))


def test_an_abstract_mesh_builds_what_the_memory_planner_counts():
  cfg = tiny_cfg(restore_from='x', freeze=('embed/.*',))
  cfg.model.vocab_size = 0  # 'From the tokenizer': read as tokenizer.vocab_size without one.
  built = build.build(cfg, AbstractMesh((2, 4, 1), ('data', 'fsdp', 'tensor')))
  assert built.model_cfg.vocab_size == cfg.tokenizer.vocab_size
  trained = built.trainable_params(built.abstract_params)
  planned = memory.plan(cfg, 8, compile=False)
  assert planned['params'] == model_lib.count_params(built.abstract_params)
  assert planned['trainable'] == sum(math.prod(x.shape) for x in trained.values())
  assert planned['trainable'] < planned['params']  # The frozen embedding is not trained.


def test_load_checkpoint_restores_the_saved_params_on_one_device(tmp_path):
  cfg = tiny_cfg()
  built = build.build(cfg, build.single_device_mesh())
  params = nn.meta.unbox(jax.jit(built.init_fn)(jax.random.key(3)))
  checkpoint.save_params(tmp_path / 'ckpt', params, cfg)
  loaded_cfg, loaded = build.load_checkpoint(tmp_path / 'ckpt')
  assert loaded_cfg.model.d_model == 64
  for (path, a), b in zip(model_lib.flatten_params(params).items(),
                          model_lib.flatten_params(loaded).values()):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)
    assert len(b.sharding.device_set) == 1

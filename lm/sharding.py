"""Device meshes, the logical-axis rules, sharded initialisation and global batches.

One rules table (cfg.mesh.rules) maps the logical names the model puts on every parameter and
activation to the mesh axes (data, fsdp, tensor). Going from FSDP to tensor parallelism, or to
a multi-slice pod, is an edit of cfg.mesh, never of the model.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm.config import MESH_AXES, ConfigError, validate_mesh


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[dict, dict]:
  """Per-slice (ICI) sizes with -1 filled, and the across-slice (DCN) sizes."""
  validate_mesh(mesh_cfg, num_devices)
  dcn = {a: mesh_cfg[f'dcn_{a}'] for a in MESH_AXES}
  ici = {a: mesh_cfg[a] for a in MESH_AXES}
  per_slice = num_devices // math.prod(dcn.values())
  fixed = math.prod(s for s in ici.values() if s != -1)
  ici = {a: (per_slice // fixed if s == -1 else s) for a, s in ici.items()}
  return ici, dcn


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A Mesh with axes (data, fsdp, tensor); with dcn sizes > 1, a hybrid multi-slice mesh."""
  devices = list(devices if devices is not None else jax.devices())
  ici, dcn = mesh_shape(mesh_cfg, len(devices))
  ici_shape = tuple(ici[a] for a in MESH_AXES)
  dcn_shape = tuple(dcn[a] for a in MESH_AXES)
  if math.prod(dcn_shape) > 1:
    device_array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
  else:
    try:
      device_array = mesh_utils.create_device_mesh(ici_shape, devices)
    except (ValueError, AssertionError, NotImplementedError):
      # Backends without a physical topology (fake CPU devices) take devices in order.
      device_array = np.asarray(devices).reshape(ici_shape)
  return Mesh(device_array, MESH_AXES)


def rules_tuple(rules) -> tuple:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
  """Mesh + logical rules in scope, so the model's activation constraints take effect.

  flax applies nn.with_logical_constraint only under jax.set_mesh (it reads the abstract mesh);
  `with mesh` alone made every activation constraint a silent no-op.
  """
  with mesh, jax.set_mesh(mesh), nn.logical_axis_rules(rules_tuple(rules)):
    yield


def check_logical_names(logical_specs, rules) -> None:
  """Every logical axis name used by the parameters must have a rule (None is fine)."""
  known = {name for name, _ in rules}
  for spec in jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, P)):
    for name in spec:
      if name is not None and name not in known:
        raise ConfigError(
            f"config key mesh.rules: logical axis '{name}' used by the model has no rule "
            f'(known: {sorted(known)})')


def logical_to_shardings(logical_specs, mesh: Mesh, rules):
  """Logical PartitionSpecs -> NamedShardings on `mesh` under `rules`."""
  check_logical_names(logical_specs, rules)
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules_tuple(rules))


def abstract_and_shardings(init_fn: Callable, mesh: Mesh, rules, *args):
  """Shapes of init_fn(*args) without allocating, and the shardings the rules give them."""
  boxed = jax.eval_shape(init_fn, *args)
  logical_specs = nn.get_partition_spec(boxed)
  shardings = logical_to_shardings(logical_specs, mesh, rules)
  return nn.meta.unbox(boxed), shardings


def init_sharded(init_fn: Callable, mesh: Mesh, rules, *args, shardings=None):
  """Runs init_fn under jit with out_shardings: every array is born sharded, never whole.

  shardings: the params' shardings when the caller has them (lm.build), else derived here.
  """
  if shardings is None:
    _, shardings = abstract_and_shardings(init_fn, mesh, rules, *args)
  with activate(mesh, rules):
    boxed = jax.jit(init_fn, out_shardings=shardings)(*args)
  return nn.meta.unbox(boxed), shardings


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
  """Rows of a batch split over the axes the 'batch' rule names; other dims whole."""
  spec = nn.logical_to_mesh_axes(('batch',) + (None,) * (ndim - 1), rules_tuple(rules))
  return NamedSharding(mesh, spec)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
  """Host-local rows -> one global jax.Array per key, sharded on the batch axes.

  Each process passes only its own rows (its data shard); the global batch is their
  concatenation in process order.
  """
  out = {}
  for key, local in batch.items():
    local = np.asarray(local)
    sharding = batch_sharding(mesh, rules, local.ndim)
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
  return out


def per_device_bytes(tree) -> int:
  """Bytes held by device 0 for a tree of (sharded) arrays: what a device must store."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    if hasattr(leaf, 'addressable_shards'):
      shard = leaf.addressable_shards[0]
      total += shard.data.size * shard.data.dtype.itemsize
  return total


def sharded_bytes(abstract_tree, shardings) -> int:
  """Per-device bytes of arrays with these shapes and shardings, without allocating them."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))):
    shard_shape = sharding.shard_shape(leaf.shape)
    total += math.prod(shard_shape) * np.dtype(leaf.dtype).itemsize
  return total

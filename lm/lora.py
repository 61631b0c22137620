"""LoRA: low-rank adapters beside chosen kernels, and merging them back for export.

Adapters are ordinary parameters created by lm.model.Linear when finetune.lora_rank > 0 and
the kernel's path matches finetune.lora_targets (the same regex-over-paths mechanism as
freezing): `<module>/lora_a` [in..., r] and `<module>/lora_b` [r, out...], with B zero at
start so the adapted model begins exactly as the base model. With scanned layers one module
serves every layer, so a stacked kernel gets adapters when any layer is a target; the other
layers' slices keep B = 0 (no effect, and a merge leaves their kernels bitwise unchanged) and
do not train. Only adapters train (lm.optim.trainable_selection). `merge` folds
W + (alpha / r) * A @ B into the kernels and drops the adapters, giving a plain model any tool
(export, generate) can load; `merge_sharded` does it on the mesh, for several processes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from lm import model as model_lib


def adapter_paths(flat_params: dict) -> list[str]:
  return [p for p in flat_params if p.endswith(('/lora_a', '/lora_b'))]


def merge(params, finetune: ml_collections.ConfigDict):
  """Params with every adapter folded into its kernel (and the adapters removed)."""
  flat = dict(model_lib.flatten_params(params))
  scale = finetune.lora_alpha / finetune.lora_rank
  for a_path in [p for p in flat if p.endswith('/lora_a')]:
    module = a_path[:-len('/lora_a')]
    a, b, kernel = flat.pop(a_path), flat.pop(f'{module}/lora_b'), flat[f'{module}/kernel']
    rank = a.shape[-1]
    # Scanned layers carry a leading layer axis on A, B and the kernel alike.
    stacked = a.ndim + b.ndim - 2 == kernel.ndim + 1
    if stacked:
      layers = a.shape[0]
      delta = jnp.einsum('lir,lro->lio', a.reshape(layers, -1, rank).astype(jnp.float32),
                         b.reshape(layers, rank, -1).astype(jnp.float32))
    else:
      delta = a.reshape(-1, rank).astype(jnp.float32) @ b.reshape(rank, -1).astype(jnp.float32)
    flat[f'{module}/kernel'] = (kernel.astype(jnp.float32) + scale * delta.reshape(kernel.shape)
                                ).astype(kernel.dtype)
  return model_lib.unflatten_params(flat)


def merge_sharded(params, finetune: ml_collections.ConfigDict, params_shardings):
  """`merge` as one jitted function on the params' mesh: each kernel is merged where it lives
  and keeps its sharding, so it works across processes without gathering the model."""
  flat_shardings = model_lib.flatten_params(params_shardings)
  merged_shardings = model_lib.unflatten_params(
      {p: s for p, s in flat_shardings.items() if p not in adapter_paths(flat_shardings)})
  return jax.jit(lambda p: merge(p, finetune), out_shardings=merged_shardings)(params)


def merged_model_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of the merged model: the same, with LoRA off."""
  merged = ml_collections.ConfigDict(cfg.to_dict())
  merged.finetune.lora_rank = 0
  return merged



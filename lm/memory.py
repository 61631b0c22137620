"""Per-device memory plan of a training run, computed without allocating anything.

    python -m lm.bench --dry-run --config=configs/llama_1b.py --devices=32
    python -m lm.bench --dry-run --config=configs/llama_7b.py --devices=256 --config.mesh.tensor=4

`plan(cfg, num_devices)` builds the mesh the config asks for over `num_devices` devices (an
abstract mesh: the devices need not exist), takes the shapes and shardings of params and
optimizer state from lm.build (what the run itself would build), and reports per device:

  params       sharded bytes of the parameters (lm.sharding.sharded_bytes)
  optimizer    sharded bytes of the optimizer state (AdamW: two moments per trainable param,
               sharded like their parameter; frozen parameters hold none)
  gradients    one gradient per trainable parameter, sharded like it (the reduce-scattered
               gradient the update consumes); twice that with optim.grad_accum > 1 (the
               running sum and the current micro-batch's)
  batch        the step's input arrays (int32 tokens/targets/segments/positions, f32 mask)
  activations  what the backward pass keeps from the forward pass, plus the largest transient
               working set, estimated from the model config (formula below)

and, when the backend has `num_devices` devices (on CPU: set
XLA_FLAGS=--xla_force_host_platform_device_count=N), the compiled train step's own figures
from `jit(train_step).lower(...).compile().memory_analysis()`: arguments (state + batch),
outputs, aliased (donated) bytes, temporaries, and peak = arguments + outputs - aliased + temps.

Activation formula (per device). b = bytes of model.dtype; n = tokens per device per
micro-batch = rows x seq_len, rows = data.batch_size / optim.grad_accum / (mesh data x fsdp);
t = mesh tensor size (it divides every head, MLP and vocab dim); D d_model, F mlp_dim, H / K
query / kv heads, Dh head_dim, V vocab, L layers. The attention kernel is model.attention as
`--platform` (default: this backend) resolves it ('auto': splash on TPU, cudnn on GPU).

  one layer without remat keeps, per token, what its backward pass reads:
      b * (4D + (2H + 2K) Dh / t + 3F / t)      residual in, its norm, q k v, attention out,
                                                 residual mid, its norm, gate, up, gate*up
    + b * H / t * S'                             the softmax probabilities: xla keeps each
                                                 query chunk's block, S' = sum over chunks of
                                                 chunk x end / T (= (T + chunk) / 2; a window
                                                 masks keys, it does not shrink the block);
                                                 fused kernels keep a log-sum-exp, S' = 1
  remat 'none'          saved = L x that
  remat 'save_matmuls'  saved = L x n b (3D + (H + 2K) Dh / t + 2F / t)   (block input and the
                        projections' outputs), plus one layer's 'none' figure in the working set
                        (the layer being recomputed)
  remat 'full'          saved = L x n b D (block input), plus one layer's 'none' figure in the
                        working set
  working              += rows * 8 * H / t * (largest query chunk x its keys)   (xla only: the
                        backward pass's float32 gradients of one chunk's probabilities and scores)
  logits                rows * c * V / t * 4 * 3   (float32 logits, softmax, their gradient of
                        one loss chunk, c = model.logits_chunk positions: lm/loss.py)
  activations = saved + working + logits

FSDP working set: a parameter sharded over the data/fsdp axes is all-gathered before use, and
its full gradient exists before the reduce-scatter. Both are counted, at the compute dtype, for
the embedding/head and for the layers live at once: one with model.scan_layers (the loop body;
a compiler that prefetches the next layer's gather holds one more), all L without (XLA may
hoist every gather; the CPU compiler does).

It is an estimate: XLA fuses, schedules and rematerialises on its own, and the CPU compiler
(the only one this was checked against) keeps float32 copies of some bfloat16 values; see
docs/scaling.md for estimate vs compiled figures. tests/test_memory.py checks the tiny config on 8 CPU devices is within
20% of the compiled peak.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh

from lm import attention, loss as loss_lib
from lm import model as model_lib
from lm import build, sharding, step as step_lib
from lm.config import MESH_AXES, ConfigError

MB = 2**20


def mesh_sizes(cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """{axis: size} of the mesh cfg.mesh gives over num_devices devices (ICI x DCN sizes)."""
  ici, dcn = sharding.mesh_shape(cfg.mesh, num_devices)
  return {a: ici[a] * dcn[a] for a in MESH_AXES}


def abstract_mesh(cfg: ml_collections.ConfigDict, num_devices: int) -> AbstractMesh:
  sizes = mesh_sizes(cfg, num_devices)
  return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)


def batch_specs(cfg: ml_collections.ConfigDict, task: str) -> dict[str, jax.ShapeDtypeStruct]:
  B, T = cfg.data.batch_size, cfg.data.seq_len
  spec = {'inputs': jnp.int32, 'targets': jnp.int32, 'segment_ids': jnp.int32,
          'positions': jnp.int32, 'loss_mask': jnp.float32}
  out = {k: jax.ShapeDtypeStruct((B, T), d) for k, d in spec.items()}
  if task == 'classify':
    out['labels'] = jax.ShapeDtypeStruct((B,), jnp.int32)
  return out


def activation_bytes(built: build.Built, sizes: dict[str, int],
                     platform: str | None = None) -> dict[str, float]:
  """The activation estimate of the module docstring, per device: saved, working, logits."""
  cfg, m = built.cfg, built.model_cfg
  b = np.dtype(jnp.dtype(m.dtype)).itemsize
  rows = cfg.data.batch_size / cfg.optim.grad_accum / (sizes['data'] * sizes['fsdp'])
  T = cfg.data.seq_len
  n = rows * T
  t = sizes['tensor']
  D, F, H, K, Dh = m.d_model, m.mlp_dim, m.n_heads, m.n_kv_heads, model_lib.head_dim(m)

  kernel = attention.resolve_kernel(m.attention, platform)
  chunks = attention.query_chunks(T, T, m.attn_query_chunk)
  # xla materialises each query chunk's scores against the keys up to the chunk's end (a
  # window masks them, it does not shrink them): (T + chunk) / 2 keys per query on average.
  xla_keys = sum((stop - start) * end for start, stop, end in chunks) / T
  largest_block = max((stop - start) * end for start, stop, end in chunks)  # Per row.

  def probabilities(layer: int) -> float:
    """Per token: what attention keeps for its backward pass, in elements."""
    if kernel != 'xla':
      return H / t * 1.0  # Fused kernels keep the output and a float32 log-sum-exp per head.
    return H / t * xla_keys

  def full_layer(layer: int) -> float:
    return n * b * (4 * D + (2 * H + 2 * K) * Dh / t + 3 * F / t + probabilities(layer))

  per_layer = {
      'none': full_layer,
      'save_matmuls': lambda layer: n * b * (3 * D + (H + 2 * K) * Dh / t + 2 * F / t),
      'full': lambda layer: n * b * D,
  }[m.remat]
  saved = sum(per_layer(i) for i in range(m.n_layers))
  # Backward through xla attention holds float32 gradients of one chunk's probabilities and
  # scores (XLA runs the chunks one after another); fused kernels work in on-chip blocks.
  attention_grads = 0.0 if kernel != 'xla' else rows * 8 * H / t * largest_block
  recomputed = 0.0 if m.remat == 'none' else max(full_layer(i) for i in range(m.n_layers))
  working = recomputed + attention_grads
  # The loss projects loss.chunk_size positions at a time: float32 logits, softmax, gradient.
  logit_tokens = rows * loss_lib.chunk_size(T, m.logits_chunk)
  logits = logit_tokens * (m.vocab_size / t) * 4 * 3 if built.task != 'classify' else 0.0
  return {'saved': saved, 'working': working, 'logits': logits,
          'total': saved + working + logits}


def _is_layer(path: str) -> bool:
  return path.startswith('layers/') or re.match(r'layers_\d+/', path) is not None


def fsdp_working_bytes(built: build.Built) -> float:
  """Gathered parameters + unreduced gradients of the live layers (module docstring)."""
  m = built.model_cfg
  b = np.dtype(jnp.dtype(m.dtype)).itemsize
  compute_rules = [(name, _drop_axes(axes, ('data', 'fsdp')))
                   for name, axes in built.cfg.mesh.rules]
  flat = model_lib.flatten_params(built.abstract_params)
  logical = model_lib.flatten_params(built.logical_specs)
  stored = model_lib.flatten_params(built.params_shardings)
  layer_bytes = other_bytes = 0.0
  for path, x in flat.items():
    gathered = sharding.logical_to_shardings(logical[path], built.mesh, compute_rules)
    elements = math.prod(gathered.shard_shape(x.shape))
    if elements == math.prod(stored[path].shard_shape(x.shape)):
      continue  # Not sharded over data/fsdp: used in place, its gradient reduced in place.
    if _is_layer(path):
      layer_bytes += elements * b
    else:
      other_bytes += elements * b
  live = 1 if m.scan_layers else m.n_layers
  return 2 * (other_bytes + layer_bytes * live / m.n_layers)


def _drop_axes(axes, drop):
  if isinstance(axes, (tuple, list)):
    kept = tuple(a for a in axes if a not in drop)
    return kept if len(kept) > 1 else (kept[0] if kept else None)
  return None if axes in drop else axes


def compiled_memory(cfg: ml_collections.ConfigDict, devices) -> dict[str, float] | None:
  """memory_analysis() of the train step compiled for `devices` (nothing is allocated)."""
  mesh = sharding.make_mesh(cfg.mesh, devices)
  built = build.build(cfg, mesh)
  rules = cfg.mesh.rules
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                   sharding=sharding.batch_sharding(mesh, rules, len(v.shape)))
           for k, v in batch_specs(cfg, built.task).items()}
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(built.model, built.tx, built.schedule, built.trainable,
                               task=built.task, z_loss=cfg.train.z_loss,
                               grad_accum=cfg.optim.grad_accum),
      built.state_shardings, jax.tree.map(lambda x: x.sharding, batch))
  with sharding.activate(mesh, rules):
    compiled = train_step.lower(built.abstract_state(), batch).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  out = {'arguments': analysis.argument_size_in_bytes, 'outputs': analysis.output_size_in_bytes,
         'aliased': analysis.alias_size_in_bytes, 'temps': analysis.temp_size_in_bytes}
  out['peak'] = out['arguments'] + out['outputs'] - out['aliased'] + out['temps']
  return out


def plan(cfg: ml_collections.ConfigDict, num_devices: int, *, compile: bool = True,
         platform: str | None = None) -> dict:
  """The per-device memory plan (bytes) for cfg on num_devices devices; see the docstring.

  With compile=True and at least num_devices devices on the default backend, the compiled
  train step's memory_analysis is added under 'compiled'.
  """
  sizes = mesh_sizes(cfg, num_devices)
  batch_ways = sizes['data'] * sizes['fsdp']
  if cfg.data.batch_size % (batch_ways * cfg.optim.grad_accum):
    raise ConfigError(f'config key data.batch_size: {cfg.data.batch_size} rows (in '
                      f'{cfg.optim.grad_accum} micro-batches) cannot be split over mesh data x '
                      f'fsdp = {batch_ways} devices')
  mesh = abstract_mesh(cfg, num_devices)
  built = build.build(cfg, mesh)
  m = built.model_cfg
  rules = cfg.mesh.rules
  flat_shardings = model_lib.flatten_params(built.params_shardings)
  train_flat = built.trainable_params(built.abstract_params)
  params = sharding.sharded_bytes(built.abstract_params, built.params_shardings)
  opt = sharding.sharded_bytes(built.abstract_opt_state, built.state_shardings.opt_state)
  grads = sharding.sharded_bytes(train_flat, {p: flat_shardings[p] for p in built.trainable})
  if cfg.optim.grad_accum > 1:
    grads *= 2  # The running sum and the current micro-batch's gradients.
  specs = batch_specs(cfg, built.task)
  batch = sharding.sharded_bytes(
      specs, {k: sharding.batch_sharding(mesh, rules, len(v.shape)) for k, v in specs.items()})
  acts = activation_bytes(built, sizes, platform)
  fsdp = fsdp_working_bytes(built)
  total = params + opt + grads + batch + fsdp + acts['total']
  result = {
      'config': cfg.name, 'devices': num_devices, 'mesh': sizes,
      'params': int(model_lib.count_params(built.abstract_params)),
      'trainable': int(sum(math.prod(x.shape) for x in train_flat.values())),
      'tokens_per_device': cfg.data.batch_size * cfg.data.seq_len // (sizes['data'] * sizes['fsdp']),
      'remat': m.remat, 'dtype': m.dtype,
      'scan_layers': bool(m.scan_layers),
      'attention': attention.resolve_kernel(m.attention, platform),
      'attn_query_chunk': m.attn_query_chunk,
      'logits_chunk': loss_lib.chunk_size(cfg.data.seq_len, m.logits_chunk),
      'bytes': {'params': params, 'optimizer': opt, 'gradients': grads, 'batch': batch,
                'fsdp_gathered': fsdp, 'activations': acts['total'],
                'activations_saved': acts['saved'], 'activations_working': acts['working'],
                'logits': acts['logits'], 'total': total},
      'compiled': None,
  }
  if compile:
    if jax.device_count() >= num_devices:
      result['compiled'] = compiled_memory(cfg, jax.devices()[:num_devices])
      result['compiled_backend'] = jax.default_backend()
    else:
      result['compiled_note'] = (
          f'compiled figures: need {num_devices} devices, this {jax.default_backend()} backend '
          f'has {jax.device_count()} (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count='
          f'{num_devices})')
  return result


def format_plan(result: dict) -> str:
  """A readable per-device table (MiB) of a plan."""
  b = result['bytes']
  mesh = ' x '.join(f'{a}={n}' for a, n in result['mesh'].items())
  lines = [f"{result['config']}: {result['params'] / 1e6:,.1f}M params "
           f"({result['trainable'] / 1e6:,.1f}M trainable) on {result['devices']} devices, "
           f"mesh {mesh}; {result['tokens_per_device']:,} tokens/device/step, "
           f"dtype {result['dtype']}, remat {result['remat']}"
           f"{', scanned layers' if result['scan_layers'] else ''}",
           f"attention {result['attention']}"
           f"{' (query chunk ' + str(result['attn_query_chunk']) + ')' if result['attention'] == 'xla' else ''}"
           f", loss over {result['logits_chunk']} positions at a time",
           'per device (MiB):']
  for key in ('params', 'optimizer', 'gradients', 'batch', 'fsdp_gathered', 'activations'):
    lines.append(f'  {key:<14} {b[key] / MB:>12,.1f}')
  lines.append(f"    {'saved':<12} {b['activations_saved'] / MB:>12,.1f}")
  lines.append(f"    {'working':<12} {b['activations_working'] / MB:>12,.1f}")
  lines.append(f"    {'logits':<12} {b['logits'] / MB:>12,.1f}")
  lines.append(f"  {'total':<14} {b['total'] / MB:>12,.1f}")
  c = result.get('compiled')
  if c:
    lines.append(f"compiled train step ({result.get('compiled_backend')}) per device (MiB): "
                 f"arguments {c['arguments'] / MB:,.1f}, outputs {c['outputs'] / MB:,.1f}, "
                 f"aliased {c['aliased'] / MB:,.1f}, temps {c['temps'] / MB:,.1f}, "
                 f"peak {c['peak'] / MB:,.1f} (estimate/compiled "
                 f"{b['total'] / max(c['peak'], 1):.2f})")
  elif result.get('compiled_note'):
    lines.append(result['compiled_note'])
  return '\n'.join(lines)

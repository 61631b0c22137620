"""FLOPs per trained token: what the step computes (model FLOPs) and what the chips execute
(hardware FLOPs, with recomputation). The MFU numerator; see docs/performance.md.

Counted from the parameters the model really has (their shapes from `jax.eval_shape`), so
LoRA adapters, biases-free kernels and stacked (scanned) layers all count as built:

  every matmul weight W (a `kernel`, a LoRA `lora_a`/`lora_b`, the tied embedding when it is
  the output projection), per token:
      forward             2 |W|
      input gradient      2 |W|   (backpropagated through frozen weights too: LoRA, later layers)
      weight gradient     2 |W|   only if W trains: frozen weights and LoRA's base kernels skip it
  attention, per layer: QK^T and PV, 2 * 2 * n_heads * head_dim per key attended; a causal
      layer attends T/2 keys on average, a sliding-window layer min(window, T/2); the backward
      pass costs twice the forward (the gradients of both operands of both products).
  The embedding lookup is free; norms, softmax and elementwise work are not counted.

Hardware FLOPs add what is computed twice:
  model.remat 'full'          the layers' forward again (matmuls and attention)
  model.remat 'save_matmuls'  attention's forward again (its einsums have batch dims, unsaved)
  fused attention kernels     flash backward recomputes QK^T (half of attention's forward)
  logits in chunks            the output projection's forward again (model.logits_chunk < T)
"""

from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lm import attention, selection
from lm import model as model_lib


def matmul_weights(m: ml_collections.ConfigDict, param_shapes: dict[str, tuple], task: str) -> dict[str, int]:
  """{path: elements} of the parameters each token multiplies by once."""
  out = {}
  for path, shape in param_shapes.items():
    size = math.prod(shape)
    if path.startswith('cls_head/'):
      if task == 'classify' and path.endswith('/kernel'):
        out[path] = size  # Per row, not per token: an over-count of a tiny head.
    elif path == 'lm_head/kernel' or (path == 'embed/embedding' and m.tie_embeddings):
      if task != 'classify':
        out[path] = size
    elif re.search(r'/(kernel|lora_a|lora_b)$', path):
      out[path] = size
  return out


def attention_forward(m: ml_collections.ConfigDict, seq_len: int) -> float:
  dh = model_lib.head_dim(m)
  total = 0.0
  for layer in range(m.n_layers):
    keys = seq_len / 2
    if not model_lib.layer_is_global(m, layer):
      keys = min(m.sliding_window, seq_len / 2)
    total += 2 * 2 * m.n_heads * dh * keys
  return total


def count(m: ml_collections.ConfigDict, seq_len: int, param_shapes: dict[str, tuple],
          trainable=None, task: str = 'lm') -> dict[str, float]:
  """Per-token FLOPs: forward, model (forward + backward), hardware (+ recomputation).

  trainable: a selection (lm.selection: {path: None or the trained layers of a stacked leaf})
  or a list of whole-leaf paths; None trains everything. A stacked leaf computes weight
  gradients for its trained layers only.
  """
  weights = matmul_weights(m, param_shapes, task)
  trainable = ({p: None for p in param_shapes} if trainable is None
               else selection.as_selection(trainable))
  forward_mm = 2.0 * sum(weights.values())
  weight_grads = 2.0 * sum(selection.selected_size(p, trainable[p], param_shapes[p])
                           for p in weights if p in trainable)
  attn = attention_forward(m, seq_len)
  forward = forward_mm + attn
  model = forward + forward_mm + weight_grads + 2 * attn
  layer_mm = 2.0 * sum(n for p, n in weights.items()
                       if p.startswith('layers/') or re.match(r'layers_\d+/', p))
  recompute = 0.0
  if m.remat == 'full':
    recompute += layer_mm + attn
  elif m.remat == 'save_matmuls':
    recompute += attn
  if attention.resolve_kernel(m.attention) != 'xla':
    recompute += attn / 2
  head = [n for p, n in weights.items() if p in ('lm_head/kernel', 'embed/embedding')]
  if head and m.logits_chunk and m.logits_chunk < seq_len:
    recompute += 2.0 * head[0]
  return {'forward': forward, 'model': model, 'hardware': model + recompute,
          'recompute': recompute}


def param_shapes(m: ml_collections.ConfigDict, seq_len: int,
                 finetune: ml_collections.ConfigDict | None = None) -> dict[str, tuple]:
  """{path: shape} of the model's parameters, from jax.eval_shape (nothing allocated)."""
  model = model_lib.build_model(m, finetune)
  head = 'all' if m.num_classes else 'lm'
  boxed = jax.eval_shape(
      lambda rng: model.init(rng, jnp.zeros((1, seq_len), jnp.int32), head=head)['params'],
      jax.random.key(0))
  return {p: tuple(x.shape) for p, x in model_lib.flatten_params(nn.meta.unbox(boxed)).items()}


def per_token(m: ml_collections.ConfigDict, seq_len: int, *,
              finetune: ml_collections.ConfigDict | None = None,
              trainable=None, task: str = 'lm') -> dict[str, float]:
  """`count` for a model config (and fine-tuning config: LoRA adapters, frozen paths)."""
  return count(m, seq_len, param_shapes(m, seq_len, finetune), trainable, task)

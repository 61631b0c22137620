"""A decoder-only Transformer in Flax linen, expressive enough for Llama 2/3, Mistral, Qwen2/2.5,
Qwen3 and Gemma 3: family differences are config options, not classes.

Pure-functional: `model.apply({'params': params}, tokens_BT, positions_BT, segment_ids_BT)`.
Every parameter carries logical axis names (lm/config.py DEFAULT_RULES maps them to mesh axes)
and the main activations carry logical constraints, so the parallelism is a config change.

Parameter paths (`/`-joined, as freezing, LoRA and conversion select them):
  embed/embedding                       [vocab, embed]
  layers_{i}/pre_attn_norm/scale        [embed]
  layers_{i}/attn/{q,k,v,o}/kernel      q: [embed, heads, head_dim], k/v: [embed, kv_heads, head_dim],
                                        o: [heads, head_dim, embed]
  layers_{i}/attn/{q,k,v}/bias          [heads or kv_heads, head_dim]  (model.qkv_bias: Qwen2)
  layers_{i}/attn/o/bias                [embed]                 (model.o_bias: Llama attention_bias)
  layers_{i}/attn/{q_norm,k_norm}/scale [head_dim]              (model.qk_norm: Gemma 3, Qwen3)
  layers_{i}/post_attn_norm/scale                               (model.post_attn_norm)
  layers_{i}/pre_mlp_norm/scale
  layers_{i}/mlp/{wi_0,wi_1}/kernel     [embed, mlp]  (gate, up);  mlp/wo/kernel [mlp, embed]
  layers_{i}/post_mlp_norm/scale                                (model.post_mlp_norm)
  final_norm/scale
  lm_head/kernel                        [embed, vocab]          (untied only)
  cls_head/{kernel,bias}                                        (model.num_classes > 0)
With model.scan_layers the layers are one stacked subtree `layers/...` with a leading
`layers` axis; `stack_layers` / `unstack_layers` convert between the two layouts.
LoRA adapters live beside the kernel they adapt: `.../q/lora_a`, `.../q/lora_b`.

Masks: a query attends to a key iff the key is not later (causal), has the same non-zero
segment id (packed documents never see each other), and, on sliding-window layers, lies
within the window. RoPE uses the per-token positions, which restart for every document.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm import attention
from lm.layers import (ClassHead, Embed, Linear, apply_rope, linear, norm, rope_cos_sin,
                       rope_inv_freq)

Array = jax.Array


def _dtype(name: str):
  return jnp.dtype(name)


def head_dim(cfg: ml_collections.ConfigDict) -> int:
  return cfg.head_dim or cfg.d_model // cfg.n_heads


def layer_is_global(cfg: ml_collections.ConfigDict, layer: int) -> bool:
  """Gemma 3 pattern: with a window, every `global_every`-th layer attends globally."""
  if not cfg.sliding_window:
    return True
  return bool(cfg.global_every) and (layer + 1) % cfg.global_every == 0


def layer_rope_base(cfg: ml_collections.ConfigDict, layer: int) -> float:
  if layer_is_global(cfg, layer) or not cfg.rope_local_base:
    return cfg.rope_base
  return cfg.rope_local_base


# --------------------------------------------------------------------------- the model
# (its building blocks, RMSNorm, Linear, Embed, ClassHead and RoPE, are in lm/layers.py)


class ModelPart(nn.Module):
  """What every module of the model is built from: the model config, the finetune section
  when LoRA is on (else None), and whether it decodes with a KV cache."""
  cfg: ml_collections.ConfigDict
  lora: ml_collections.ConfigDict | None = None
  decode: bool = False


class Attention(ModelPart):
  """Grouped-query attention with RoPE (and q/k norms, biases, a sliding window as configured);
  with `decode`, over a KV cache."""

  def _linear(self, name, in_shape, out_shape, in_axes, out_axes):
    use_bias = self.cfg.o_bias if name == 'o' else self.cfg.qkv_bias
    return linear(self.cfg, self.lora, name, in_shape, out_shape, in_axes, out_axes, use_bias)

  @nn.compact
  def __call__(self, x_BTD: Array, positions_BT: Array, segment_ids_BT: Array,
               is_global: Array | bool, rope_base: Array | float,
               deterministic: bool = True) -> Array:
    m, decode = self.cfg, self.decode
    D, H, K, Dh = m.d_model, m.n_heads, m.n_kv_heads, head_dim(m)
    q_BTHD = self._linear('q', (D,), (H, Dh), ('embed',), ('heads', 'head_dim'))(x_BTD, deterministic)
    k_BTKD = self._linear('k', (D,), (K, Dh), ('embed',), ('kv_heads', 'head_dim'))(x_BTD, deterministic)
    v_BTKD = self._linear('v', (D,), (K, Dh), ('embed',), ('kv_heads', 'head_dim'))(x_BTD, deterministic)
    if m.qk_norm:
      q_BTHD, k_BTKD = norm(m, 'q_norm')(q_BTHD), norm(m, 'k_norm')(k_BTKD)
    inv_freq = rope_inv_freq(m, rope_base, Dh, apply_scaling=True)
    if m.sliding_window and m.rope_local_base:
      # Local layers use their own base without the global layers' scaling (as Gemma 3 does).
      inv_freq = jnp.where(is_global, inv_freq, rope_inv_freq(m, rope_base, Dh, apply_scaling=False))
    # Outside decoding, positions count tokens within a row, so a table of T angles covers them.
    cos_BT1F, sin_BT1F = rope_cos_sin(positions_BT, inv_freq, 0 if decode else x_BTD.shape[1])
    q_BTHD = apply_rope(q_BTHD, cos_BT1F, sin_BT1F)
    k_BTKD = apply_rope(k_BTKD, cos_BT1F, sin_BT1F)
    q_BTHD = nn.with_logical_constraint(q_BTHD, ('act_batch', 'act_length', 'act_heads', None))
    k_BTKD = nn.with_logical_constraint(k_BTKD, ('act_batch', 'act_length', 'act_kv_heads', None))

    scale = m.attn_scale or Dh ** -0.5
    q_BTHD = q_BTHD * jnp.asarray(scale, q_BTHD.dtype)
    if not decode:  # The kernel model.attention names (lm/attention.py).
      out_BTHD = attention.self_attention(
          q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, kernel=m.attention,
          window=m.sliding_window, is_global=is_global, softcap=m.attn_logit_softcap,
          query_chunk=m.attn_query_chunk)
    else:
      k_BTKD, v_BTKD, k_segment_BS, k_index_BS, q_index_BT = self._update_cache(
          k_BTKD, v_BTKD, segment_ids_BT)
      window = jnp.where(is_global, 0, m.sliding_window) if m.sliding_window else 0
      mask_B1TS = attention.attention_mask(q_index_BT, k_index_BS, segment_ids_BT, k_segment_BS, window)
      out_BTHD = attention.dot_product_attention(q_BTHD, k_BTKD, v_BTKD, mask_B1TS,
                                                 softcap=m.attn_logit_softcap)
    out_BTHD = nn.with_logical_constraint(out_BTHD, ('act_batch', 'act_length', 'act_heads', None))
    return self._linear('o', (H, Dh), (D,), ('heads', 'head_dim'), ('embed',))(out_BTHD, deterministic)

  def _update_cache(self, k_BTKD, v_BTKD, segment_ids_BT):
    """Writes new keys/values at the cache index; returns the whole cache to attend over.

    The cache is created by `init_cache` (a forward pass with full-length dummy inputs), so its
    length is the maximum decode length.
    """
    is_init = not self.has_variable('cache', 'key')
    key = self.variable('cache', 'key', jnp.zeros, k_BTKD.shape, k_BTKD.dtype)
    value = self.variable('cache', 'value', jnp.zeros, v_BTKD.shape, v_BTKD.dtype)
    segment = self.variable('cache', 'segment', jnp.zeros, segment_ids_BT.shape, jnp.int32)
    index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
    B, T = segment_ids_BT.shape
    S = key.value.shape[1]
    if is_init:
      idx = jnp.broadcast_to(jnp.arange(T), (B, T))
      return k_BTKD, v_BTKD, segment_ids_BT, idx, idx
    i = index.value
    key.value = jax.lax.dynamic_update_slice(key.value, k_BTKD.astype(key.value.dtype), (0, i, 0, 0))
    value.value = jax.lax.dynamic_update_slice(value.value, v_BTKD.astype(value.value.dtype), (0, i, 0, 0))
    segment.value = jax.lax.dynamic_update_slice(segment.value, segment_ids_BT.astype(jnp.int32), (0, i))
    index.value = i + T
    k_index_BS = jnp.broadcast_to(jnp.arange(S), (B, S))
    q_index_BT = jnp.broadcast_to(i + jnp.arange(T), (B, T))
    return key.value, value.value, segment.value, k_index_BS, q_index_BT


class Mlp(ModelPart):
  """The gated MLP (SwiGLU, or GeGLU with model.mlp_activation gelu)."""

  @nn.compact
  def __call__(self, x_BTD: Array, deterministic: bool = True) -> Array:
    m, lora = self.cfg, self.lora
    gate_BTF = linear(m, lora, 'wi_0', (m.d_model,), (m.mlp_dim,), ('embed',), ('mlp',))(
        x_BTD, deterministic)
    up_BTF = linear(m, lora, 'wi_1', (m.d_model,), (m.mlp_dim,), ('embed',), ('mlp',))(
        x_BTD, deterministic)
    if m.mlp_activation == 'silu':
      act_BTF = nn.silu(gate_BTF)
    else:
      act_BTF = nn.gelu(gate_BTF, approximate=(m.mlp_activation == 'gelu_tanh'))
    h_BTF = nn.with_logical_constraint(act_BTF * up_BTF, ('act_batch', 'act_length', 'act_mlp'))
    return linear(m, lora, 'wo', (m.mlp_dim,), (m.d_model,), ('mlp',), ('embed',))(
        h_BTF, deterministic)


class Block(ModelPart):
  """Pre-norm block; Gemma 3 adds norms on the attention and MLP outputs."""

  @nn.compact
  def __call__(self, x_BTD, layer_info, positions_BT, segment_ids_BT, deterministic=True):
    m = self.cfg
    is_global, rope_base = layer_info
    h_BTD = Attention(m, self.lora, self.decode, name='attn')(
        norm(m, 'pre_attn_norm')(x_BTD), positions_BT, segment_ids_BT, is_global, rope_base,
        deterministic)
    if m.post_attn_norm:
      h_BTD = norm(m, 'post_attn_norm')(h_BTD)
    x_BTD = x_BTD + h_BTD.astype(x_BTD.dtype)
    h_BTD = Mlp(m, self.lora, name='mlp')(norm(m, 'pre_mlp_norm')(x_BTD), deterministic)
    if m.post_mlp_norm:
      h_BTD = norm(m, 'post_mlp_norm')(h_BTD)
    x_BTD = x_BTD + h_BTD.astype(x_BTD.dtype)
    x_BTD = nn.with_logical_constraint(x_BTD, ('act_batch', 'act_length', 'act_embed'))
    return x_BTD, None


def _remat_policy(name: str):
  if name == 'save_matmuls':
    return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
  return None  # 'full': save nothing, recompute the whole block.


class Transformer(ModelPart):
  """`__call__` returns float32 logits [B, T, V] (head='lm'), class logits [B, C]
  (head='classify'), the final hidden states [B, T, D] (head='hidden'), or all three
  (head='all', used at init so every head's parameters exist).

  positions_BT (default 0..T-1) count tokens within a row or document, so outside decoding
  they are in [0, T); a position outside gives NaN (see rope_cos_sin)."""

  @nn.compact
  def __call__(self, tokens_BT: Array, positions_BT: Array | None = None,
               segment_ids_BT: Array | None = None, *, deterministic: bool = True,
               head: str = 'lm'):
    m = self.cfg
    B, T = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones((B, T), jnp.int32)
    embed = Embed(m.vocab_size, m.d_model, m.init_std, _dtype(m.param_dtype), name='embed')
    x_BTD = embed(tokens_BT).astype(_dtype(m.dtype))
    if m.scale_embeddings:
      x_BTD = x_BTD * jnp.asarray(math.sqrt(m.d_model), _dtype(m.dtype))
    x_BTD = nn.with_logical_constraint(x_BTD, ('act_batch', 'act_length', 'act_embed'))

    x_BTD = self._layers(x_BTD, positions_BT, segment_ids_BT, deterministic)
    hidden_BTD = norm(m, 'final_norm')(x_BTD)
    outputs = {}
    if head in ('lm', 'all'):
      outputs['lm'] = self._lm_logits(hidden_BTD, embed)
    if head in ('classify', 'all') and m.num_classes:
      outputs['classify'] = self._class_logits(hidden_BTD, segment_ids_BT)
    if head in ('hidden', 'all'):
      outputs['hidden'] = hidden_BTD
    return outputs if head == 'all' else outputs[head]

  def _layers(self, x_BTD, positions_BT, segment_ids_BT, deterministic):
    m = self.cfg
    block_cls = Block
    if m.remat != 'none':
      block_cls = nn.remat(Block, policy=_remat_policy(m.remat), prevent_cse=not m.scan_layers,
                           static_argnums=(5,))
    is_global = np.array([layer_is_global(m, i) for i in range(m.n_layers)])
    rope_base = np.array([layer_rope_base(m, i) for i in range(m.n_layers)], np.float32)
    if m.scan_layers:
      scanned = nn.scan(
          block_cls, variable_axes={'params': 0, 'cache': 0},
          split_rngs={'params': True, 'dropout': True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=m.n_layers,
          metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BTD, _ = scanned(m, self.lora, self.decode, name='layers')(
          x_BTD, (jnp.asarray(is_global), jnp.asarray(rope_base)), positions_BT, segment_ids_BT,
          deterministic)
      return x_BTD
    for i in range(m.n_layers):
      x_BTD, _ = block_cls(m, self.lora, self.decode, name=f'layers_{i}')(
          x_BTD, (bool(is_global[i]), float(rope_base[i])), positions_BT, segment_ids_BT,
          deterministic)
    return x_BTD

  def _lm_logits(self, hidden_BTD, embed):
    m = self.cfg
    if m.tie_embeddings:
      logits_BTV = embed.attend(hidden_BTD)
    else:
      logits_BTV = Linear((m.d_model,), (m.vocab_size,), ('embed',), ('vocab',),
                          init_std=m.init_std, dtype=_dtype(m.dtype),
                          param_dtype=_dtype(m.param_dtype), preferred_element_type=jnp.float32,
                          name='lm_head')(hidden_BTD)
    logits_BTV = _softcap_logits(m, logits_BTV.astype(jnp.float32))
    return nn.with_logical_constraint(logits_BTV, ('act_batch', 'act_length', 'act_vocab'))

  def _class_logits(self, hidden_BTD, segment_ids_BT):
    """Classifies from the hidden state of each row's last real (non-padding) token."""
    m = self.cfg
    last_B = jnp.maximum(jnp.sum(segment_ids_BT != 0, axis=1) - 1, 0)
    pooled_BD = jnp.take_along_axis(hidden_BTD, last_B[:, None, None], axis=1)[:, 0]
    return ClassHead(m.num_classes, m.init_std, _dtype(m.param_dtype), name='cls_head')(pooled_BD)


def _softcap_logits(m: ml_collections.ConfigDict, logits_BTV: Array) -> Array:
  if m.final_logit_softcap:
    return m.final_logit_softcap * jnp.tanh(logits_BTV / m.final_logit_softcap)
  return logits_BTV


def logits_from_hidden(m: ml_collections.ConfigDict, params, hidden_BTD: Array) -> Array:
  """float32 logits of final hidden states: `Transformer._lm_logits` as a pure function of
  params (lm/loss.py applies it a chunk of positions at a time)."""
  dtype = _dtype(m.dtype)
  h_BTD = hidden_BTD.astype(dtype)
  if m.tie_embeddings:
    logits_BTV = jnp.einsum('btd,vd->btv', h_BTD, nn.meta.unbox(params['embed']['embedding']).astype(dtype),
                            preferred_element_type=jnp.float32)
  else:
    B, T, D = h_BTD.shape
    kernel_DV = nn.meta.unbox(params['lm_head']['kernel']).astype(dtype)
    logits_BTV = jnp.matmul(h_BTD.reshape(B * T, D), kernel_DV,
                            preferred_element_type=jnp.float32).reshape(B, T, -1)
  return _softcap_logits(m, logits_BTV.astype(jnp.float32))


def build_model(cfg: ml_collections.ConfigDict, finetune: ml_collections.ConfigDict | None = None,
                decode: bool = False) -> Transformer:
  """The model for a (model, finetune) config pair; LoRA is on when finetune.lora_rank > 0."""
  lora = finetune if finetune is not None and finetune.lora_rank > 0 else None
  return Transformer(cfg, lora=lora, decode=decode)


# --------------------------------------------------------------------------- parameter paths


def flatten_params(params) -> dict[str, Any]:
  """{'a/b/kernel': leaf} for a nested params dict."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    flat['/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)] = leaf
  return flat


def unflatten_params(flat: dict[str, Any]) -> dict:
  nested: dict = {}
  for path, leaf in flat.items():
    node = nested
    *parents, last = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaf
  return nested


def stack_layers(params: dict, n_layers: int) -> dict:
  """layers_{i}/... -> layers/... with a leading layer axis (the scan layout)."""
  params = dict(params)
  per_layer = [params.pop(f'layers_{i}') for i in range(n_layers)]
  params['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  return params


def unstack_layers(params: dict, n_layers: int) -> dict:
  params = dict(params)
  stacked = params.pop('layers')
  for i in range(n_layers):
    params[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))

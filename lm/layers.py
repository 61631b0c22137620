"""The Transformer's building blocks (lm.model assembles them): RMSNorm, the LoRA-capable
Linear, the token embedding, the classification head, and RoPE.

Parameter names are set here (`scale`, `kernel`, `bias`, `lora_a`, `lora_b`, `embedding`) and
by the module names lm.model gives; lm.model's docstring lists the resulting paths.
`norm(m, name)` and `linear(m, lora, name, ...)` build a block from the model config (and the
finetune section's LoRA settings), as every caller in lm.model needs them.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lm import selection

Array = jax.Array


class RMSNorm(nn.Module):
  """RMSNorm computed in float32; Gemma's variant scales by (1 + w), with w starting at 0."""
  eps: float = 1e-6
  plus_one: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    scale = self.param('scale', nn.with_logical_partitioning(init, ('norm',)), (x.shape[-1],),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    weight = scale.astype(jnp.float32) + (1.0 if self.plus_one else 0.0)
    return (normed * weight).astype(self.dtype)


class Linear(nn.Module):
  """An einsum with a logically partitioned kernel and optional LoRA adapter.

  The kernel has shape in_shape + out_shape. LoRA (when `lora_rank` > 0 and this kernel's path
  matches one of `lora_targets`) adds scale * (x @ A) @ B with A: [in..., r], B: [r, out...];
  B starts at zero so the adapted model equals the base model at step 0.
  """
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  in_axes: tuple[str, ...]
  out_axes: tuple[str, ...]
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = ()
  preferred_element_type: Any = None
  use_bias: bool = False  # A bias [out...] after the matmul (Qwen2 q/k/v, Llama attention_bias).

  def _lora_enabled(self) -> bool:
    """Whether this kernel gets adapters. Under nn.scan one module serves every layer, so a
    stacked kernel gets them when any layer's path matches (lm.selection names layers the
    same in both layouts); only the matching layers' slices train (lm.optim)."""
    if not self.lora_rank:
      return False
    path = '/'.join(str(p) for p in self.path) + '/kernel'
    # The layer count comes from the enclosing Attention / Mlp's model config.
    n_layers = getattr(getattr(self.parent, 'cfg', None), 'n_layers', 1)
    return selection.matches_any_layer(path, self.lora_targets, n_layers)

  def _flat_matmul(self, x: Array, kernel: Array) -> Array:
    """x [..., *in_shape] @ kernel as one 2-D [tokens, in] x [in, out] matmul.

    The same contraction as an einsum, but XLA:CPU lays out the backward pass of a
    multi-dimensional einsum with transposed gradients that it then writes element by element
    (measured: the SwiGLU MLP's fwd+bwd 1.5x slower); the 2-D form keeps every operand row-major.
    On accelerators the reshapes are free.
    """
    lead = x.shape[:x.ndim - len(self.in_shape)]
    x_NI = x.reshape(-1, math.prod(self.in_shape)).astype(self.dtype)
    kernel_IO = kernel.reshape(math.prod(self.in_shape), -1).astype(self.dtype)
    y_NO = jnp.matmul(x_NI, kernel_IO, preferred_element_type=self.preferred_element_type)
    return y_NO.reshape(lead + self.out_shape)

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    n_in = len(self.in_shape)
    kernel = self.param(
        'kernel',
        nn.with_logical_partitioning(
            nn.initializers.normal(self.init_std), self.in_axes + self.out_axes),
        self.in_shape + self.out_shape, self.param_dtype)
    in_letters = 'abcd'[:n_in]
    out_letters = 'wxyz'[:len(self.out_shape)]
    y = self._flat_matmul(x, kernel)
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, self.out_axes),
                        self.out_shape, self.param_dtype)
      y = y + bias.astype(y.dtype)
    if self._lora_enabled():
      a = self.param('lora_a',
                     nn.with_logical_partitioning(
                         nn.initializers.normal(1.0 / math.sqrt(math.prod(self.in_shape))),
                         self.in_axes + ('lora_rank',)),
                     self.in_shape + (self.lora_rank,), self.param_dtype)
      b = self.param('lora_b',
                     nn.with_logical_partitioning(nn.initializers.zeros,
                                                  ('lora_rank',) + self.out_axes),
                     (self.lora_rank,) + self.out_shape, self.param_dtype)
      h = nn.Dropout(self.lora_dropout)(x, deterministic=deterministic)
      h = jnp.einsum(f'...{in_letters},{in_letters}r->...r', h.astype(self.dtype), a.astype(self.dtype))
      h = jnp.einsum(f'...r,r{out_letters}->...{out_letters}', h, b.astype(self.dtype))
      y = y + (self.lora_alpha / self.lora_rank) * h.astype(y.dtype)
    return y


class Embed(nn.Module):
  """Token embedding table [vocab, embed]; `attend` is the tied output projection."""
  vocab_size: int
  d_model: int
  init_std: float = 0.02
  param_dtype: Any = jnp.float32

  def setup(self):
    self.embedding = self.param(
        'embedding', nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                  ('vocab', 'embed')),
        (self.vocab_size, self.d_model), self.param_dtype)

  def __call__(self, tokens_BT: Array) -> Array:
    return jnp.take(self.embedding, tokens_BT, axis=0)

  def attend(self, hidden_BTD: Array) -> Array:
    return jnp.einsum('btd,vd->btv', hidden_BTD, self.embedding.astype(hidden_BTD.dtype),
                      preferred_element_type=jnp.float32)


class ClassHead(nn.Module):
  """Linear classifier in float32 on a pooled hidden state."""
  num_classes: int
  init_std: float = 0.02
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pooled_BD: Array) -> Array:
    kernel = self.param('kernel', nn.with_logical_partitioning(
        nn.initializers.normal(self.init_std), ('embed', 'classes')),
                        (pooled_BD.shape[-1], self.num_classes), self.param_dtype)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('classes',)),
                      (self.num_classes,), self.param_dtype)
    return pooled_BD.astype(jnp.float32) @ kernel.astype(jnp.float32) + bias.astype(jnp.float32)


def norm(m: ml_collections.ConfigDict, name: str) -> RMSNorm:
  """The model's RMSNorm (plain, or Gemma's (1 + w)) named `name`."""
  return RMSNorm(m.norm_eps, m.norm_plus_one, jnp.dtype(m.dtype), jnp.dtype(m.param_dtype),
                 name=name)


def linear(m: ml_collections.ConfigDict, lora: ml_collections.ConfigDict | None, name: str,
           in_shape: tuple[int, ...], out_shape: tuple[int, ...], in_axes: tuple[str, ...],
           out_axes: tuple[str, ...], use_bias: bool = False) -> Linear:
  """A Linear of the model's dtypes, with the finetune section's LoRA settings when it has them."""
  return Linear(in_shape, out_shape, in_axes, out_axes, init_std=m.init_std, use_bias=use_bias,
                dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype),
                lora_rank=lora.lora_rank if lora else 0,
                lora_alpha=lora.lora_alpha if lora else 1.0,
                lora_dropout=lora.lora_dropout if lora else 0.0,
                lora_targets=tuple(lora.lora_targets) if lora else (), name=name)


# --------------------------------------------------------------------------- RoPE


def rope_inv_freq(cfg: ml_collections.ConfigDict, base: Array | float, dim: int,
                  apply_scaling: bool) -> Array:
  """Inverse frequencies of RoPE; Llama 3.1 / linear scaling apply to global layers only."""
  inv_freq = 1.0 / (jnp.asarray(base, jnp.float32) ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  if not apply_scaling or cfg.rope_scaling == 'none':
    return inv_freq
  if cfg.rope_scaling == 'linear':
    return inv_freq / cfg.rope_scaling_factor
  # 'llama3': long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
  factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  old_len = cfg.rope_original_max_len
  wavelen = 2 * math.pi / inv_freq
  smooth = (old_len / wavelen - low) / (high - low)
  blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  is_medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
  return jnp.where(is_medium, blended, scaled)


def rope_cos_sin(positions_BT: Array, inv_freq_F: Array, table_len: int = 0) -> tuple[Array, Array]:
  """cos and sin [B, T, 1, F] of the RoPE angles positions * inv_freq.

  With `table_len` > 0 they are read from a [table_len, F] table of the same values instead of
  evaluated per token. Computed per token, XLA fuses cos/sin into the rotations that use them
  and evaluates them again for every head and every use: on the 2-core CPU that made RoPE 5x
  slower and 7% of the bench_cpu step. A gather keeps the trig to table_len * F values.
  Positions must be in [0, table_len); others read NaN rather than a wrong angle.
  """
  with jax.named_scope('rope'):  # Named for lm.op_profile.
    if table_len:
      angles_LF = jnp.arange(table_len, dtype=jnp.float32)[:, None] * inv_freq_F
      # jnp.take counts negative indices from the end: send them out of range instead.
      index_BT = jnp.where(positions_BT < 0, table_len, positions_BT)
      lookup = lambda table_LF: jnp.take(table_LF, index_BT, axis=0, mode='fill',
                                         fill_value=jnp.nan)
      cos_BTF, sin_BTF = lookup(jnp.cos(angles_LF)), lookup(jnp.sin(angles_LF))
    else:
      angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq_F
      cos_BTF, sin_BTF = jnp.cos(angles_BTF), jnp.sin(angles_BTF)
    return cos_BTF[:, :, None], sin_BTF[:, :, None]


def apply_rope(x_BTHD: Array, cos_BT1F: Array, sin_BT1F: Array) -> Array:
  """Rotate-half RoPE (the layout Hugging Face Llama/Gemma checkpoints store q/k in):
  the halves (x1, x2) of each head become (x1 cos - x2 sin, x2 cos + x1 sin)."""
  with jax.named_scope('rope'):  # Named for lm.op_profile.
    x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F],
                              axis=-1)
    return rotated.astype(x_BTHD.dtype)

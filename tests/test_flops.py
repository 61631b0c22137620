"""FLOPs per token (lm/flops.py) against hand counts: full training, a frozen embedding, LoRA,
remat recomputation and chunked logits (hardware FLOPs); the device-kind peak table."""

import jax
import jax.numpy as jnp

from lm import flops, metrics, optim
from lm.config import base_config

T = 10


def tiny():
  """1 layer, d_model 8, 2 heads of 4, MLP 16, vocab 32, tied embeddings. Matmul weights:
  q, k, v, o 4 x 64 = 256; gate, up, down 3 x 128 = 384; the tied output projection 256.
  Attention forward: QK^T and PV, 2 x 2 FLOPs x 2 heads x 4 dims x T/2 = 5 keys = 160."""
  cfg = base_config()
  cfg.model.update(n_layers=1, d_model=8, n_heads=2, n_kv_heads=2, mlp_dim=16, vocab_size=32,
                   attention='xla', logits_chunk=0)
  return cfg


def count(cfg):
  shapes = flops.param_shapes(cfg.model, T, cfg.finetune if cfg.finetune.lora_rank else None)
  finetune = cfg.finetune if (cfg.finetune.lora_rank or cfg.finetune.freeze) else None
  return flops.count(cfg.model, T, shapes, optim.trainable_selection(
      {p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in shapes.items()}, finetune))


def test_full_training_is_three_times_the_forward():
  got = count(tiny())
  # forward 2 x 896 + 160; input gradients 2 x 896 + 2 x 160; weight gradients 2 x 896.
  assert got['forward'] == 1952
  assert got['model'] == got['hardware'] == 3 * 1952


def test_frozen_embedding_skips_its_weight_gradient():
  cfg = tiny()
  cfg.finetune.freeze = ('embed/.*',)
  # The output projection (the tied embedding) still runs forward and passes gradients back
  # to the hidden states, but its own weight gradient (2 x 256) is not computed.
  assert count(cfg)['model'] == 3 * 1952 - 2 * 256


def test_lora_trains_only_adapters():
  cfg = tiny()
  cfg.finetune.update(lora_rank=2, lora_targets=('.*attn/(q|k|v|o)/kernel',))
  # Adapters: q/k/v A [8, 2] + B [2, 2, 4] = 32 each; o A [2, 4, 2] + B [2, 8] = 32: 128 in all.
  adapters = 128
  forward = 2 * (896 + adapters) + 160
  input_grads = 2 * (896 + adapters) + 2 * 160
  weight_grads = 2 * adapters  # Base kernels and the embedding are frozen.
  assert count(cfg)['model'] == forward + input_grads + weight_grads == 4832


def test_a_frozen_layer_of_a_scanned_model_counts_like_the_unscanned_one():
  counts = {}
  for scan in (False, True):
    cfg = tiny()
    cfg.model.update(n_layers=2, scan_layers=scan)
    cfg.finetune.freeze = ('layers_0/.*',)
    counts[scan] = count(cfg)['model']
  # Layer 0's weight gradients (2 x 640 matmul weights) are skipped in both layouts.
  everything = tiny()
  everything.model.update(n_layers=2)
  assert counts[True] == counts[False] == count(everything)['model'] - 2 * 640


def test_hardware_flops_count_recomputation():
  cfg = tiny()
  cfg.model.remat = 'full'  # The layer's forward again: 2 x 640 matmuls + 160 attention.
  got = count(cfg)
  assert got['model'] == 3 * 1952 and got['hardware'] == 3 * 1952 + 1280 + 160
  cfg.model.update(remat='save_matmuls')  # Attention's forward only.
  assert count(cfg)['hardware'] == 3 * 1952 + 160
  cfg.model.update(remat='none', logits_chunk=5)  # Chunked logits: the projection again.
  assert count(cfg)['hardware'] == 3 * 1952 + 2 * 256
  cfg.model.update(logits_chunk=0, attention='splash')  # Flash backward recomputes QK^T.
  assert count(cfg)['hardware'] == 3 * 1952 + 80


def test_peak_table_tells_device_kinds_apart():
  assert metrics.table_peak('NVIDIA H100 80GB HBM3') == (989e12, 'H100 SXM')
  assert metrics.table_peak('NVIDIA H100 PCIe') == (756e12, 'H100 PCIe')
  assert metrics.table_peak('NVIDIA H200')[1] == 'H200'
  assert metrics.table_peak('NVIDIA A100-SXM4-80GB')[0] == 312e12
  assert metrics.table_peak('TPU v4')[1] == 'TPU v4'
  assert metrics.table_peak('TPU v5 lite')[1] == 'TPU v5e'
  assert metrics.table_peak('TPU v5')[1] == 'TPU v5p'
  assert metrics.table_peak('TPU v6 lite')[1] == 'TPU v6e'
  assert metrics.table_peak('cpu') is None

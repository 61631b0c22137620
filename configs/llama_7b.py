"""A 6.7B Llama-2-7B-shaped model for a Cloud TPU pod slice (v5p-256 / v4-256) or GPU cluster.

Full FSDP over every chip by default; see docs/scaling.md for the per-device memory plan
(python -m lm.bench --dry-run --config=configs/llama_7b.py --devices=256) and launch commands.
"""

from lm.config import base_config


def get_config():
  c = base_config()
  c.name = 'llama_7b'
  c.model.update(vocab_size=32_000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                 mlp_dim=11_008, norm_eps=1e-5, rope_base=10_000.0, tie_embeddings=False,
                 dtype='bfloat16', remat='full', scan_layers=True)
  c.tokenizer.vocab_size = 32_000
  c.data.seq_len = 4096
  c.data.batch_size = 1024  # 4M tokens per step, as Llama 2.
  c.data.shard_count = 64  # Resume exactly on any process count dividing 64 (docs/scaling.md).
  c.optim.update(lr=3e-4, warmup_steps=2000, b2=0.95, weight_decay=0.1, min_lr_ratio=0.1)
  c.train.update(steps=250_000, eval_every=2000, eval_batches=16, log_every=50,
                 checkpoint_every=1000, keep=3, keep_period=25_000)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c

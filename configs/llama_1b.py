"""A ~1.0B (1.04B) Llama-3-style model for a TPU v4-32 / v5p-32 slice or 8 GPUs (FSDP over all chips).

For tensor parallelism instead: --config.mesh.fsdp=-1 --config.mesh.tensor=4.
"""

from lm.config import base_config


def get_config():
  c = base_config()
  c.name = 'llama_1b'
  c.model.update(vocab_size=32_768, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                 mlp_dim=8192, rope_base=500_000.0, tie_embeddings=True, dtype='bfloat16',
                 remat='full', scan_layers=True)
  c.tokenizer.vocab_size = 32_768
  c.data.seq_len = 2048
  c.data.batch_size = 512  # 1M tokens per step.
  # On 32 chips with 32 GB (v4) add --config.optim.grad_accum=4: activations then fit in about
  # 10 GiB/chip (python -m lm.bench --config=configs/llama_1b.py --dry-run --devices=32).
  c.optim.update(lr=3e-4, warmup_steps=2000, b2=0.95, weight_decay=0.1)
  c.train.update(steps=50_000, eval_every=1000, eval_batches=16, log_every=50,
                 checkpoint_every=1000, keep=3, keep_period=10_000)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c

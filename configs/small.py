"""~125M parameters (GPT-2 small scale), Llama-style, for one accelerator or a small slice."""

from lm.config import base_config


def get_config():
  c = base_config()
  c.name = 'small'
  c.model.update(vocab_size=32_768, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                 mlp_dim=2048, dtype='bfloat16', remat='save_matmuls', scan_layers=True)
  c.tokenizer.vocab_size = 32_768
  c.data.seq_len = 1024
  c.data.batch_size = 256
  c.optim.update(lr=6e-4, warmup_steps=2000, weight_decay=0.1)
  c.train.update(steps=100_000, eval_every=2000, eval_batches=32, log_every=100,
                 checkpoint_every=2000, keep=3, keep_period=20_000)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c

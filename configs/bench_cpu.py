"""The CPU benchmark model: nanoGPT's Shakespeare-char size (~10.7M params).

python -m lm.bench --config=configs/bench_cpu.py
"""

from lm.config import base_config


def get_config():
  c = base_config()
  c.name = 'bench_cpu'
  c.model.update(vocab_size=65, d_model=384, n_layers=6, n_heads=6, n_kv_heads=6, mlp_dim=1024,
                 tie_embeddings=False)
  c.data.seq_len = 256
  c.data.batch_size = 8
  c.mesh.update(data=1, fsdp=1, tensor=1)
  c.train.steps = 1000
  return c

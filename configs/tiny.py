"""The default main job: a ~3M-parameter model pre-trained on the built-in corpus on a CPU.

python train.py --config=configs/tiny.py       (a few minutes on a 2-core laptop CPU)
"""

from lm.config import base_config


def get_config():
  c = base_config()
  c.name = 'tiny'
  c.model.update(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=768)
  c.tokenizer.vocab_size = 2048
  c.data.seq_len = 128
  c.data.batch_size = 16
  c.optim.update(lr=2e-3, warmup_steps=30)
  c.train.update(steps=300, eval_every=100, eval_batches=8, log_every=20, checkpoint_every=100)
  return c

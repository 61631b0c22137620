"""Short steps, where the loop's host work shows: nanoGPT's CPU size (4 layers, d_model 128,
T 64, batch 12, ~40 ms a step on 2 cores). The loop-overhead benchmark compares train.py's
steady-state step with lm.bench's on this config (scripts/loop_overhead.py).

python train.py --config=configs/bench_loop.py
python -m lm.bench --config=configs/bench_loop.py
"""

from lm.config import base_config


def get_config():
  c = base_config()
  c.name = 'bench_loop'
  c.model.update(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, mlp_dim=512)
  c.tokenizer.vocab_size = 512
  c.data.seq_len = 64
  c.data.batch_size = 12
  c.mesh.update(data=1, fsdp=1, tensor=1)
  c.optim.update(lr=1e-3, warmup_steps=20)
  c.train.update(steps=400, eval_every=0, log_every=50, checkpoint_every=100_000, sample_tokens=0)
  return c

"""Supervised prompt -> completion: complete a function's docstring from its signature.

Loss on completion tokens only. Data: built from the stdlib (lm.tasks 'docstring_sft').
"""

from lm.config import base_config


def get_config():
  c = base_config()
  c.name = 'finetune_sft'
  c.finetune.update(restore_from='runs/tiny', task='sft', task_data='docstring_sft')
  c.data.update(source='jsonl', seq_len=128, batch_size=16, min_chars=0)
  c.optim.update(lr=1e-3, warmup_steps=10, weight_decay=0.0)
  c.train.update(steps=150, eval_every=50, eval_batches=8, log_every=10, checkpoint_every=50,
                 sample_prompts=('def read_lines(path):\n    """',))
  return c

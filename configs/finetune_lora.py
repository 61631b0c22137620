"""The domain demo with LoRA adapters on attention and MLP instead of full fine-tuning."""

from lm.config import base_config


def get_config():
  c = base_config()
  c.name = 'finetune_lora'
  c.finetune.update(restore_from='runs/tiny', lora_rank=8, lora_alpha=16.0,
                    lora_targets=('.*attn/(q|k|v|o)/kernel', '.*mlp/wi_[01]/kernel'),
                    probes=('gender_occupation', 'age_technology'))
  c.data.update(builtin_subset='email', seq_len=128, batch_size=16)
  c.optim.update(lr=3e-3, warmup_steps=10, weight_decay=0.0)
  c.train.update(steps=150, eval_every=50, eval_batches=8, log_every=10, checkpoint_every=50)
  return c

"""Sequence classification (sentiment-analysis style): which stdlib package a docstring
documents, from 4 classes; a new head on the final hidden state, lower layers frozen."""

from lm.config import base_config


def get_config():
  c = base_config()
  c.name = 'finetune_classify'
  c.model.num_classes = 4
  c.finetune.update(restore_from='runs/tiny', task='classify', task_data='package_classify',
                    allow_new_params=('cls_head/.*',), freeze=('embed/.*', 'layers_[01]/.*'))
  c.data.update(source='jsonl', seq_len=128, batch_size=16, min_chars=0)
  c.optim.update(lr=1e-3, warmup_steps=10, weight_decay=0.0)
  c.train.update(steps=150, eval_every=50, eval_batches=8, log_every=10, checkpoint_every=50)
  return c

"""Domain adaptation demo: the tiny pre-trained model (runs/tiny, from `python train.py`)
continues training on the held-out 'email' domain (email/http/urllib/... of the stdlib),
embeddings frozen. Prints the before/after table (domain and general loss, domain gain vs
general-loss change, bias probes with 95% CIs).

python finetune.py --config=configs/finetune_domain.py
"""

from lm.config import base_config


def get_config():
  c = base_config()
  c.name = 'finetune_domain'
  c.finetune.update(restore_from='runs/tiny', freeze=('embed/.*',),
                    probes=('gender_occupation', 'age_technology'),
                    # Share of each batch from the general corpus, against forgetting (e.g. 0.25:
                    # 4 of 16 rows); see docs/transfer_study.md for the frontier.
                    replay=0.0)
  c.data.update(builtin_subset='email', seq_len=128, batch_size=16)
  c.optim.update(lr=1e-3, warmup_steps=10, weight_decay=0.0)
  c.train.update(steps=150, eval_every=50, eval_batches=8, log_every=10, checkpoint_every=50,
                 sample_prompts=('import ', 'def send', 'The message '))
  return c

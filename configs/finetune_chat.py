"""Chat SFT of a converted model: conversations rendered with the model's chat template, loss on
the assistant turns only (lm.chat), packed like 'sft'.

  python -m lm.convert hf ~/models/Qwen2.5-0.5B-Instruct runs/qwen2.5-0.5b-instruct
  python finetune.py --config=configs/finetune_chat.py \
      --config.finetune.restore_from=runs/qwen2.5-0.5b-instruct \
      --config.data.paths=my_chats.jsonl

Data: JSONL lines of {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
(data.messages_field names another field; Parquet/ArrayRecord work the same). The default is
the small example bundled in configs/data/chat_example*.jsonl (train and validation). The template: data.chat_template
'' takes the converted model's own (tokenizer_config.json / chat_template.jinja beside its
tokenizer) and falls back to lm.chat.DEFAULT_TEMPLATE for a model without one; 'required'
refuses such a model instead; 'default' or a path (.jinja, tokenizer_config.json) override it.
`python -m lm.data prepare --config=configs/finetune_chat.py ...` writes shards with the same
assistant-only mask.
"""

import os

from lm.config import base_config

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
EXAMPLE = os.path.join(_DATA, 'chat_example.jsonl')
EXAMPLE_VALIDATION = os.path.join(_DATA, 'chat_example_validation.jsonl')


def get_config():
  c = base_config()
  c.name = 'finetune_chat'
  c.finetune.update(restore_from=os.environ.get('LM_CONVERTED_DIR', ''), task='chat',
                    lora_rank=8, lora_alpha=16.0,
                    lora_targets=('.*attn/(q|k|v|o)/kernel', '.*mlp/wi_[01]/kernel'),
                    general_eval=False)
  # Your own data: --config.data.paths=... and either --config.data.validation_paths=... or
  # --config.data.validation_paths='()' to hold out data.validation_share of it by hash.
  c.data.update(source='jsonl', paths=(EXAMPLE,), validation_paths=(EXAMPLE_VALIDATION,),
                messages_field='messages', chat_template='', seq_len=256, batch_size=4)
  c.optim.update(lr=2e-4, warmup_steps=5, schedule='constant', weight_decay=0.0)
  c.train.update(steps=50, eval_every=25, eval_batches=2, log_every=5, checkpoint_every=50,
                 sample_tokens=0)
  return c

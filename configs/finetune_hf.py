"""Fine-tune any model imported with `python -m lm.convert hf` (Llama 2/3, Mistral, Qwen2/2.5,
Qwen3, Gemma 3): LoRA on attention and MLP, on the built-in held-out 'email' domain.

  python -m lm.convert hf ~/models/Qwen2.5-0.5B runs/qwen2.5-0.5b
  python finetune.py --config=configs/finetune_hf.py --config.finetune.restore_from=runs/qwen2.5-0.5b

The architecture and the tokenizer (tokenizer.model or tokenizer.json) come from the converted
directory's saved config (finetune.inherit_architecture), so this file names no model.
Params restore in float32 (model.param_dtype) whatever the checkpoint stores (bf16 releases
stay bf16 on disk); set --config.model.param_dtype=bfloat16 to halve memory. Full fine-tuning:
--config.finetune.lora_rank=0 (then lower optim.lr to ~1e-5). Merged weights for transformers:
python -m lm.convert export runs/finetune_hf/merged hf_out/
"""

import os

from lm.config import base_config


def get_config():
  c = base_config()
  c.name = 'finetune_hf'
  c.finetune.update(restore_from=os.environ.get('LM_CONVERTED_DIR', ''), task='lm',
                    lora_rank=8, lora_alpha=16.0,
                    lora_targets=('.*attn/(q|k|v|o)/kernel', '.*mlp/wi_[01]/kernel'),
                    general_eval=False)
  c.data.update(builtin_subset='email', seq_len=256, batch_size=4)
  c.optim.update(lr=2e-4, warmup_steps=5, schedule='constant', weight_decay=0.0)
  c.train.update(steps=50, eval_every=25, eval_batches=2, log_every=5, checkpoint_every=50,
                 sample_prompts=('import email\n',), sample_tokens=24)
  return c

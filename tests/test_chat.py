"""lm.chat: conversations rendered and tokenized exactly as transformers' apply_chat_template,
the assistant-only loss mask, the default template and the errors."""


import numpy as np
import pytest

from hf_helpers import LLAMA3_TEMPLATE, build_llama3_tokenizer
from lm import chat
from lm import hf_tokenizer

transformers = pytest.importorskip('transformers')

CONVERSATION = {'messages': [
    {'role': 'system', 'content': 'You are terse.'},
    {'role': 'user', 'content': 'Add 2 and 3 🙂'},
    {'role': 'assistant', 'content': '5'},
    {'role': 'user', 'content': 'And in code?\n\n  (indented)'},
    {'role': 'assistant', 'content': 'def add(a, b):\n    return a + b'},
]}
# Qwen 2.5 style ChatML with a default system prompt and whitespace control.
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}{% continue %}{% endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# Llama 3 with the assistant's part in a {% generation %} block, so transformers can compute its
# own assistant mask to compare with.
LLAMA3_GENERATION = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def _dir(tmp_path, template):
  build_llama3_tokenizer(tmp_path, template=template, extra_specials=('<|im_start|>', '<|im_end|>'))
  return tmp_path


def _hf_ids(out):
  return list(out['input_ids'] if hasattr(out, 'keys') else out)


@pytest.mark.parametrize('template', [LLAMA3_TEMPLATE, CHATML, LLAMA3_GENERATION],
                         ids=['llama3', 'chatml', 'llama3-generation'])
def test_ids_match_apply_chat_template(tmp_path, template):
  d = _dir(tmp_path, template)
  ours = hf_tokenizer.HFTokenizer.load(d / 'tokenizer.json')
  theirs = transformers.AutoTokenizer.from_pretrained(d)
  messages = CONVERSATION['messages']
  tpl = chat.load_template(d, required=True)
  assert chat.render(tpl, messages, **chat.special_tokens(ours)) == theirs.apply_chat_template(
      messages, tokenize=False)
  for prompt in (False, True):
    assert chat.render(tpl, messages[:4], add_generation_prompt=prompt,
                       **chat.special_tokens(ours)) == theirs.apply_chat_template(
                           messages[:4], tokenize=False, add_generation_prompt=prompt)
  ids, mask = chat.encode_chat(CONVERSATION, ours, tpl)
  assert ids.tolist() == _hf_ids(theirs.apply_chat_template(messages, tokenize=True))
  assert mask.shape == ids.shape and mask.dtype == np.int32


def test_assistant_mask_equals_transformers_generation_mask(tmp_path):
  d = _dir(tmp_path, LLAMA3_GENERATION)
  ours = hf_tokenizer.HFTokenizer.load(d / 'tokenizer.json')
  theirs = transformers.AutoTokenizer.from_pretrained(d)
  ids, mask = chat.encode_chat(CONVERSATION, ours, chat.load_template(d))
  out = theirs.apply_chat_template(CONVERSATION['messages'], tokenize=True, return_dict=True,
                                   return_assistant_tokens_mask=True)
  assert ids.tolist() == list(out['input_ids'])
  assert mask.tolist() == list(out['assistant_masks'])


def test_mask_covers_assistant_turns_only(tmp_path):
  d = _dir(tmp_path, CHATML)
  tok = hf_tokenizer.HFTokenizer.load(d / 'tokenizer.json')
  ids, mask = chat.encode_chat(CONVERSATION, tok, chat.load_template(d))
  masked = tok._tok.decode(ids[mask == 1].tolist(), skip_special_tokens=False)
  assert masked == '5<|im_end|>\ndef add(a, b):\n    return a + b<|im_end|>\n'
  assert tok.decode(ids[mask == 0]).startswith('system\nYou are terse.')


def test_default_template_and_sentencepiece(tmp_path):
  from lm import config as lm_config
  from lm import tokenizer as lm_tokenizer
  tok_cfg = lm_config.tokenizer_config()
  tok_cfg.vocab_size = 300
  sp = lm_tokenizer.train_tokenizer(['user: hello there\n\nassistant: general kenobi\n\n' * 50,
                                     'def add(a, b):\n    return a + b\n' * 50], tok_cfg)
  assert chat.load_template(tmp_path) == chat.DEFAULT_TEMPLATE  # No template: the default.
  ids, mask = chat.encode_chat({'messages': [{'role': 'user', 'content': 'hello'},
                                             {'role': 'assistant', 'content': 'kenobi'}]},
                               sp, chat.DEFAULT_TEMPLATE)
  text = chat.render(chat.DEFAULT_TEMPLATE, [{'role': 'user', 'content': 'hello'},
                                             {'role': 'assistant', 'content': 'kenobi'}],
                     **chat.special_tokens(sp))
  assert text == '<s>user: hello\n\nassistant: kenobi</s>\n\n'
  # The template writes bos/eos as text; they become their ids, as transformers' added tokens do.
  assert ids.tolist() == ([sp.bos_id] + sp.encode('user: hello\n\nassistant: kenobi') + [sp.eos_id]
                          + sp.encode('\n\n'))
  assert sp.decode(ids[mask == 1]).strip() == 'kenobi' and sp.eos_id in ids[mask == 1]
  assert sp.decode(ids[mask == 0]).startswith('user: hello')


def test_errors_name_what_is_wrong(tmp_path):
  with pytest.raises(chat.ChatError, match='no chat template'):
    chat.load_template(tmp_path, required=True)
  d = _dir(tmp_path / 'tok', CHATML)
  tok = hf_tokenizer.HFTokenizer.load(d / 'tokenizer.json')
  with pytest.raises(chat.ChatError, match='line 3: no assistant message'):
    chat.encode_chat({'messages': [{'role': 'user', 'content': 'hi'}]}, tok, CHATML, where='line 3')
  with pytest.raises(chat.ChatError, match='message 1 needs a "role"'):
    chat.encode_chat({'messages': [{'role': 'user', 'content': 'hi'}, {'content': 'x'}]}, tok, CHATML)
  # A template that drops earlier assistant turns once another follows (as Qwen3 drops reasoning).
  forgetful = ("{% for m in messages %}{% if m.role != 'assistant' or loop.last %}"
               "{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}assistant: {% endif %}")
  with pytest.raises(chat.ChatError, match='message 2 \\(assistant\\) differently'):
    chat.encode_chat(CONVERSATION, tok, forgetful)
  with pytest.raises(chat.ChatError, match='chat template: stop'):
    chat.render("{{ raise_exception('stop') }}", [])

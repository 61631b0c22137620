"""Task 'chat' end to end: JSONL conversations -> the model's chat template -> packed batches whose
loss_mask is 1 exactly on assistant tokens (as transformers' assistant mask says), bad records
named by file:line, prepared shards with the same mask, and a short fine-tune of a converted
model."""

import json

import numpy as np
import pytest

from hf_helpers import build_llama3_tokenizer
from lm import chat
from lm import data as lm_data
from lm.config import base_config
from lm.data.stats import DataError
from lm.tokenizer import Tokenizer

transformers = pytest.importorskip('transformers')

# ChatML whose assistant part sits in a {% generation %} block, so transformers computes its
# own assistant mask to compare with.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CONVERSATIONS = [
    {'messages': [{'role': 'system', 'content': 'Be terse.'},
                  {'role': 'user', 'content': 'Add 2 and 3.'},
                  {'role': 'assistant', 'content': '5'},
                  {'role': 'user', 'content': 'In code?'},
                  {'role': 'assistant', 'content': 'def add(a, b):\n    return a + b'}]},
    {'messages': [{'role': 'user', 'content': 'Unicode: héllo 🙂'},
                  {'role': 'assistant', 'content': 'naïve café'}]},
]


def _tokenizer_dir(path, template=CHATML):
  build_llama3_tokenizer(path, template=template, extra_specials=('<|im_start|>', '<|im_end|>'))
  return path


def _write_jsonl(path, objects, extra_lines=()):
  path.write_text(''.join(json.dumps(o) + '\n' for o in objects) + ''.join(extra_lines))
  return path


def _cfg(tok_dir, paths, **data):
  cfg = base_config()
  cfg.finetune.task = 'chat'
  cfg.tokenizer.path = str(tok_dir / 'tokenizer.json')
  cfg.data.update(source='jsonl', paths=tuple(str(p) for p in paths), seq_len=256, batch_size=1,
                  validation_share=0.0, num_epochs=1, shuffle_window=0, prefetch_batches=0,
                  read_threads=1)
  cfg.data.update(**data)
  return cfg


def _expected(tok_dir):
  """Per conversation: transformers' ids and assistant mask for CONVERSATIONS."""
  theirs = transformers.AutoTokenizer.from_pretrained(tok_dir)
  out = []
  for conv in CONVERSATIONS:
    enc = theirs.apply_chat_template(conv['messages'], tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    out.append((list(enc['input_ids']), list(enc['assistant_masks'])))
  return out


def _check_packed(batch, expected):
  """inputs/targets hold the conversations back to back; loss_mask is 1 exactly where the
  target is an assistant token of the same conversation; one segment id per conversation."""
  ids = [i for e, _ in expected for i in e]
  n = len(ids)
  np.testing.assert_array_equal(batch['inputs'][0, :n], ids)
  np.testing.assert_array_equal(batch['targets'][0, :n - 1], ids[1:])
  segments = [k + 1 for k, (e, _) in enumerate(expected) for _ in e]
  np.testing.assert_array_equal(batch['segment_ids'][0, :n], segments)
  assert not batch['segment_ids'][0, n:].any()
  want = []
  for e, mask in expected:  # Target j of a conversation is its token j + 1.
    want += list(mask[1:]) + [0]
  np.testing.assert_array_equal(batch['loss_mask'][0, :n], np.asarray(want, np.float32))
  assert not batch['loss_mask'][0, n:].any()
  assert sum(want) > 0 and sum(want) < n


def test_batches_mask_exactly_the_assistant_tokens(tmp_path):
  tok_dir = _tokenizer_dir(tmp_path / 'tok')
  path = _write_jsonl(tmp_path / 'chats.jsonl', CONVERSATIONS)
  tokenizer = Tokenizer.load(tok_dir / 'tokenizer.json')
  expected = _expected(tok_dir)
  template = chat.load_template(tok_dir)
  for conv, (ids, mask) in zip(CONVERSATIONS, expected):  # lm.chat agrees with transformers.
    ours_ids, ours_mask = chat.encode_chat(conv, tokenizer, template)
    assert ours_ids.tolist() == ids and ours_mask.tolist() == mask
  it = lm_data.make_pipeline(_cfg(tok_dir, [path]), tokenizer, 'train')
  _check_packed(next(it), expected)
  ids, mask = expected[1]
  # The assistant's content and its end-of-turn marker (decode drops <|im_end|>), nothing else.
  assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == 'naïve café\n'
  assert '<|im_end|>' in tokenizer._tok.decode([t for t, m in zip(ids, mask) if m],
                                               skip_special_tokens=False)


def test_prepared_shards_carry_the_chat_mask(tmp_path):
  tok_dir = _tokenizer_dir(tmp_path / 'tok')
  path = _write_jsonl(tmp_path / 'chats.jsonl', CONVERSATIONS)
  tokenizer = Tokenizer.load(tok_dir / 'tokenizer.json')
  cfg = _cfg(tok_dir, [path], prepare_shards=1)
  lm_data.prepare(cfg, tokenizer, tmp_path / 'prepared')
  cfg.data.prepared_dir = str(tmp_path / 'prepared')
  batch = next(lm_data.make_pipeline(cfg, tokenizer, 'train'))
  # Prepared shards are globally shuffled: check whichever order they come in.
  expected = _expected(tok_dir)
  first = batch['inputs'][0, :len(expected[0][0])].tolist() == expected[0][0]
  _check_packed(batch, expected if first else expected[::-1])
  # The template is baked into the prepared tokens: a run with another one is refused.
  cfg.data.chat_template = 'default'
  with pytest.raises(DataError, match='config key data.chat_template: .* prepare the data again'):
    next(lm_data.make_pipeline(cfg, tokenizer, 'train'))


def test_bad_records_name_file_and_line(tmp_path):
  tok_dir = _tokenizer_dir(tmp_path / 'tok')
  tokenizer = Tokenizer.load(tok_dir / 'tokenizer.json')
  bad = [json.dumps({'messages': [{'role': 'user'}]}) + '\n',
         json.dumps({'conversation': []}) + '\n',
         json.dumps({'messages': 'hello'}) + '\n',
         json.dumps({'messages': [{'role': 'user', 'content': 'hi'}]}) + '\n']
  for k, line in enumerate(bad):
    path = _write_jsonl(tmp_path / f'bad{k}.jsonl', CONVERSATIONS[:1], [line])
    with pytest.raises(DataError, match=f'{path}:2: '):
      next(lm_data.make_pipeline(_cfg(tok_dir, [path]), tokenizer, 'train'))
  path = _write_jsonl(tmp_path / 'skip.jsonl', CONVERSATIONS, bad)
  it = lm_data.make_pipeline(_cfg(tok_dir, [path], on_error='skip'), tokenizer, 'train')
  _check_packed(next(it), _expected(tok_dir))
  assert it.data_stats.skipped == {'bad_messages': 3, 'missing_field': 1}


def test_template_resolution(tmp_path):
  plain = tmp_path / 'plain'
  build_llama3_tokenizer(plain, template=None)
  tokenizer = Tokenizer.load(plain / 'tokenizer.json')
  path = str(plain / 'tokenizer.json')
  assert chat.resolve_template('', tokenizer, path) == chat.DEFAULT_TEMPLATE
  assert chat.resolve_template('default', tokenizer, path) == chat.DEFAULT_TEMPLATE
  with pytest.raises(chat.ChatError, match="data.chat_template='required'.*no chat template"):
    chat.resolve_template('required', tokenizer, path)
  jinja = tmp_path / 'chatml.jinja'
  jinja.write_text(CHATML)
  assert chat.resolve_template(str(jinja), tokenizer, path) == CHATML
  with pytest.raises(chat.ChatError, match='data.chat_template: no such file'):
    chat.resolve_template(str(tmp_path / 'missing.jinja'), tokenizer, path)
  own = _tokenizer_dir(tmp_path / 'own')
  assert chat.resolve_template('required', Tokenizer.load(own / 'tokenizer.json')) == CHATML
  # The pipeline resolves it once, from the config: 'required' fails before any record is read.
  chats = _write_jsonl(tmp_path / 'chats.jsonl', CONVERSATIONS)
  with pytest.raises(chat.ChatError, match='required'):
    lm_data.make_pipeline(_cfg(plain, [chats], chat_template='required'), tokenizer, 'train')
  batch = next(lm_data.make_pipeline(_cfg(plain, [chats]), tokenizer, 'train'))
  ids, mask = chat.encode_chat(CONVERSATIONS[0], tokenizer, chat.DEFAULT_TEMPLATE)
  np.testing.assert_array_equal(batch['inputs'][0, :len(ids)], ids)
  np.testing.assert_array_equal(batch['loss_mask'][0, :len(ids) - 1], mask[1:])


def test_finetune_a_converted_model_on_chats(tmp_path):
  """configs/finetune_chat.py (its bundled example data) on a tiny converted Qwen2 with a
  ChatML tokenizer.json: a few steps run and the validation loss is finite and changes."""
  import importlib.util
  import pathlib
  import torch
  from hf_helpers import hf_model
  from lm import finetune
  from lm.convert import hf as chf
  spec = importlib.util.spec_from_file_location(
      'finetune_chat', pathlib.Path(__file__).parents[1] / 'configs' / 'finetune_chat.py')
  config_file = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(config_file)
  src = tmp_path / 'src'
  hf_model('qwen2', vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
           tie_word_embeddings=True, bos_token_id=0, eos_token_id=4).to(torch.float32
                                                                      ).save_pretrained(src)
  _tokenizer_dir(src)
  chf.convert_hf(src, tmp_path / 'lm', log=lambda *_: None)
  cfg = config_file.get_config()
  cfg.finetune.update(restore_from=str(tmp_path / 'lm'), lora_rank=0)
  # 'required': the converted model's own ChatML template must be found, not the default.
  cfg.data.update(seq_len=64, batch_size=8, chat_template='required')
  cfg.optim.lr = 1e-2
  cfg.train.update(steps=3, eval_every=3, eval_batches=1, log_every=1, checkpoint_every=3)
  summary = finetune.finetune(cfg, tmp_path / 'ft')
  report = summary['report']
  assert np.isfinite(report['before']['domain_loss']) and np.isfinite(report['after']['domain_loss'])
  assert report['after']['domain_loss'] != report['before']['domain_loss']


@pytest.mark.parametrize('as_json_string', [False, True], ids=['list-column', 'json-string-column'])
def test_parquet_messages_and_another_field_name(tmp_path, as_json_string):
  import pyarrow as pa
  import pyarrow.parquet as pq
  tok_dir = _tokenizer_dir(tmp_path / 'tok')
  tokenizer = Tokenizer.load(tok_dir / 'tokenizer.json')
  column = [json.dumps(c['messages']) if as_json_string else c['messages'] for c in CONVERSATIONS]
  path = tmp_path / 'chats.parquet'
  pq.write_table(pa.table({'conversation': column}), path)
  cfg = _cfg(tok_dir, [path], source='parquet', messages_field='conversation')
  _check_packed(next(lm_data.make_pipeline(cfg, tokenizer, 'train')), _expected(tok_dir))


def test_a_conversation_the_template_rejects_names_file_and_line(tmp_path):
  strict = ("{% for message in messages %}{% if message['role'] not in ('user', 'assistant') %}"
            "{{ raise_exception('only user and assistant roles') }}{% endif %}"
            "{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}")
  tok_dir = _tokenizer_dir(tmp_path / 'tok', template=strict)
  tokenizer = Tokenizer.load(tok_dir / 'tokenizer.json')
  path = _write_jsonl(tmp_path / 'chats.jsonl', CONVERSATIONS[1:] + CONVERSATIONS[:1])
  with pytest.raises(DataError, match=f'{path}:2: .*only user and assistant roles'):
    next(lm_data.make_pipeline(_cfg(tok_dir, [path]), tokenizer, 'train'))

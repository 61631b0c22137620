"""Chat data for supervised fine-tuning: render conversations with the model's chat template and
mark the assistant's tokens for the loss.

A record is `{"messages": [{"role": "system"|"user"|"assistant"|..., "content": "..."}, ...]}`
(one JSONL line). `encode_chat(record, tokenizer, template)` returns (ids, loss_mask):

- ids: the template rendered exactly as transformers' `apply_chat_template(messages,
  tokenize=True)` renders it (same Jinja sandbox and settings: trim_blocks, lstrip_blocks,
  loop controls, `tojson`, `raise_exception`, `strftime_now`, the special tokens as variables),
  then tokenized without adding bos/eos (the template writes them);
- loss_mask: 1 on tokens of assistant turns (their content and end-of-turn marker, which the
  model must learn to emit), 0 elsewhere. Token j's flag says whether predicting token j counts,
  the convention of lm.data's loss flags.

Assistant spans come from rendering prefixes of the conversation: turn i is what
`render(messages[:i+1])` adds to `render(messages[:i], add_generation_prompt=True)`. Templates
whose earlier turns change when later ones are added (Qwen3 strips past reasoning, for example)
break that; `encode_chat` then raises a ChatError naming the turn rather than mask wrongly.

The template: `load_template(directory)` reads `chat_template` from tokenizer_config.json or
`chat_template.jinja` (transformers 5 writes it there). A model without one gets
DEFAULT_TEMPLATE (plain "role: content" turns ending in eos) unless `required=True`, which
raises a ChatError for models whose chat format must not be guessed.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
from datetime import datetime
from typing import Any, Sequence

import numpy as np

from lm.errors import UserError

# The documented fallback for models without a template: "role: content" turns separated by a
# blank line, each assistant turn closed by eos so generation learns to stop.
DEFAULT_TEMPLATE = (
    "{{ bos_token or '' }}{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token or '' }}{% endif %}{{ '\\n\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


class ChatError(UserError, ValueError):
  """A conversation or template lm cannot render; the message names the record or file."""


@functools.lru_cache(maxsize=16)
def _compile(template: str):
  import jinja2
  from jinja2 import ext, nodes
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class Generation(ext.Extension):
    """transformers' `{% generation %}` block; the mask here comes from prefix renders."""
    tags = {'generation'}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(['name:endgeneration'], drop_needle=True)
      return nodes.CallBlock(self.call_method('_render'), [], [], body).set_lineno(lineno)

    def _render(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, ext.loopcontrols])
  env.filters['tojson'] = tojson
  env.globals.update(raise_exception=raise_exception,
                     strftime_now=lambda fmt: datetime.now().strftime(fmt))
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ChatError(f'chat template does not parse (line {e.lineno}): {e.message}') from None


def load_template_from_config(config_file: pathlib.Path) -> str | None:
  """The (default) chat_template of a tokenizer_config.json, or None."""
  try:
    template = json.loads(config_file.read_text()).get('chat_template')
  except json.JSONDecodeError as e:
    raise ChatError(f'{config_file}: not valid JSON ({e})') from None
  if isinstance(template, list):  # Named templates: [{"name": "default", "template": ...}, ...]
    named = {t.get('name'): t.get('template') for t in template}
    template = named.get('default')
  return template or None


def load_template(directory: str | pathlib.Path, required: bool = False) -> str:
  """The chat template stored with a model or tokenizer directory (see the module docstring)."""
  directory = pathlib.Path(directory)
  jinja_file = directory / 'chat_template.jinja'
  if jinja_file.exists():
    return jinja_file.read_text()
  config_file = directory / 'tokenizer_config.json'
  template = load_template_from_config(config_file) if config_file.exists() else None
  if template:
    return template
  if required:
    raise ChatError(f'{directory}: the model has no chat template (no chat_template in '
                    'tokenizer_config.json, no chat_template.jinja); pass one explicitly, or '
                    'use lm.chat.DEFAULT_TEMPLATE knowingly')
  return DEFAULT_TEMPLATE


def special_tokens(tokenizer) -> dict[str, str | None]:
  """bos_token / eos_token / ... as the template sees them."""
  if hasattr(tokenizer, 'special_tokens'):
    return tokenizer.special_tokens()
  piece = lambda i: tokenizer.id_to_piece(i) if i is not None and i >= 0 else None
  return {'bos_token': piece(tokenizer.bos_id), 'eos_token': piece(tokenizer.eos_id),
          'pad_token': piece(tokenizer.pad_id), 'unk_token': piece(tokenizer.unk_id)}


def render(template: str, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
           **variables) -> str:
  """The conversation as text, as transformers' apply_chat_template(tokenize=False) renders it."""
  import jinja2
  try:
    return _compile(template).render(messages=list(messages), tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **variables)
  except jinja2.exceptions.TemplateError as e:
    raise ChatError(f'chat template: {e}') from None


def messages_problem(messages: Any) -> str | None:
  """What makes `messages` unusable as a conversation to learn from, or None."""
  if not isinstance(messages, list) or not messages:
    return 'expected a non-empty list of {"role": ..., "content": ...} messages'
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get('role'), str) or 'content' not in m:
      return f'message {i} needs a "role" and a "content"'
  if not any(m['role'] == 'assistant' for m in messages):
    return 'no assistant message, so nothing to learn'
  return None


def _check_messages(record: Any, where: str) -> list[dict[str, Any]]:
  messages = record.get('messages') if isinstance(record, dict) else None
  if not isinstance(messages, list) or not messages:
    raise ChatError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
  problem = messages_problem(messages)
  if problem:
    raise ChatError(f'{where}: {problem}')
  return messages


def assistant_spans(template: str, messages: list[dict[str, Any]], where: str = 'record',
                    **variables) -> tuple[str, list[tuple[int, int]]]:
  """(rendered text, [(start, end) character spans of each assistant turn])."""
  try:
    return _assistant_spans(template, messages, where, **variables)
  except ChatError as e:
    message = str(e)
    raise ChatError(message if message.startswith(f'{where}:') else f'{where}: {message}') from None


def _assistant_spans(template: str, messages: list[dict[str, Any]], where: str,
                     **variables) -> tuple[str, list[tuple[int, int]]]:
  full = render(template, messages, **variables)
  spans = []
  for i, message in enumerate(messages):
    if message['role'] != 'assistant':
      continue
    before = render(template, messages[:i], add_generation_prompt=True, **variables)
    upto = render(template, messages[:i + 1], **variables)
    if not (upto.startswith(before) and full.startswith(upto)):
      raise ChatError(f'{where}: the chat template renders message {i} (assistant) differently '
                      'once later messages follow, so its tokens cannot be located for the loss '
                      'mask; use a template whose turns render the same in every prefix')
    spans.append((len(before), len(upto)))
  return full, spans


@functools.lru_cache(maxsize=4)
def _sentencepiece(proto: bytes):
  import sentencepiece as spm
  return spm.SentencePieceProcessor(model_proto=proto)


def _sentencepiece_offsets(tokenizer, text: str, shift: int) -> tuple[list[int], list[tuple[int, int]]]:
  pieces = _sentencepiece(tokenizer.model_proto).encode(text, return_type='proto').pieces
  byte_to_char = np.zeros(len(text.encode('utf-8')) + 1, np.int64)
  position = 0
  for c, ch in enumerate(text):
    width = len(ch.encode('utf-8'))
    byte_to_char[position:position + width] = c
    position += width
  byte_to_char[position] = len(text)
  return [p.id for p in pieces], [(shift + int(byte_to_char[p.begin]), shift + int(byte_to_char[p.end]))
                                  for p in pieces]


def _ids_and_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
  """Token ids of `text` and each token's character span in it.

  SentencePiece never reads its control pieces (<s>, </s>) from text, while a template writes
  them as text; like transformers' added tokens, they are split out first and become their ids.
  """
  if hasattr(tokenizer, 'encode_with_offsets'):
    return tokenizer.encode_with_offsets(text)
  specials = {tokenizer.id_to_piece(i): i for i in (tokenizer.bos_id, tokenizer.eos_id) if i >= 0}
  ids, offsets, start = [], [], 0
  pattern = re.compile('|'.join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
  for match in (pattern.finditer(text) if specials else ()):
    if match.start() > start:
      more_ids, more_offsets = _sentencepiece_offsets(tokenizer, text[start:match.start()], start)
      ids += more_ids
      offsets += more_offsets
    ids.append(specials[match.group()])
    offsets.append(match.span())
    start = match.end()
  if start < len(text):
    more_ids, more_offsets = _sentencepiece_offsets(tokenizer, text[start:], start)
    ids += more_ids
    offsets += more_offsets
  return ids, offsets


def encode_chat(record: dict[str, Any], tokenizer, template: str, where: str = 'record'
                ) -> tuple[np.ndarray, np.ndarray]:
  """(int32 ids, int32 loss mask: 1 on assistant tokens) of one conversation record."""
  messages = _check_messages(record, where)
  text, spans = assistant_spans(template, messages, where, **special_tokens(tokenizer))
  ids, offsets = _ids_and_offsets(tokenizer, text)
  starts = np.asarray([s for s, _ in offsets], np.int64).reshape(-1)
  ends = np.maximum(np.asarray([e for _, e in offsets], np.int64).reshape(-1), starts + 1)
  mask = np.zeros(len(ids), np.int32)
  for begin, end in spans:  # Every token holding a character of the turn, as transformers maps.
    mask |= ((starts < end) & (ends > begin)).astype(np.int32)
  return np.asarray(ids, np.int32), mask


# data.chat_template values that mean "the model's own template" (and what to do without one).
MODEL_TEMPLATE, REQUIRE_MODEL_TEMPLATE, USE_DEFAULT = '', 'required', 'default'


def model_template(tokenizer, tokenizer_path: str = '') -> str | None:
  """The template that came with the model: the tokenizer's own (tokenizer.json bundles carry
  it), else one stored beside tokenizer_path (a converted SentencePiece model's directory)."""
  template = getattr(tokenizer, 'chat_template', None)
  if isinstance(template, list):  # Named templates, as in tokenizer_config.json.
    template = {t.get('name'): t.get('template') for t in template}.get('default')
  if template:
    return template
  if tokenizer_path:
    try:
      return load_template(pathlib.Path(tokenizer_path).parent, required=True)
    except ChatError:
      return None
  return None


def resolve_template(setting: str, tokenizer, tokenizer_path: str = '') -> str:
  """The template data.chat_template names, resolved once per pipeline:
  '' the model's own, else DEFAULT_TEMPLATE; 'required' the model's own, else a ChatError;
  'default' DEFAULT_TEMPLATE; anything else a path: a .jinja file, a tokenizer_config.json,
  or a directory holding either."""
  if setting in (MODEL_TEMPLATE, REQUIRE_MODEL_TEMPLATE):
    template = model_template(tokenizer, tokenizer_path)
    if template:
      return template
    if setting == REQUIRE_MODEL_TEMPLATE:
      where = pathlib.Path(tokenizer_path).parent if tokenizer_path else 'the tokenizer'
      raise ChatError(f"config key data.chat_template='required': {where} has no chat template "
                      '(no chat_template in tokenizer_config.json, no chat_template.jinja); set '
                      "data.chat_template to a template file, or to 'default' for "
                      'lm.chat.DEFAULT_TEMPLATE')
    return DEFAULT_TEMPLATE
  if setting == USE_DEFAULT:
    return DEFAULT_TEMPLATE
  path = pathlib.Path(setting)
  if path.is_dir():
    return load_template(path, required=True)
  if not path.is_file():
    raise ChatError(f"config key data.chat_template: no such file or directory '{setting}' "
                    "(or use '', 'required' or 'default')")
  if path.name.endswith('.json'):
    template = load_template_from_config(path)
    if not template:
      raise ChatError(f'config key data.chat_template: {path} has no "chat_template"')
    return template
  return path.read_text()

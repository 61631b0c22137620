"""The tokenizer.json backend: id parity with transformers.AutoTokenizer on a Llama-3-style
byte-level BPE built here with `tokenizers`, the lm Tokenizer interface, automatic selection."""

import json
import pickle

import pytest

from hf_helpers import VARIED_TEXTS, build_llama3_tokenizer
from lm import hf_tokenizer
from lm import tokenizer as lm_tokenizer

transformers = pytest.importorskip('transformers')


@pytest.fixture(scope='module')
def tok_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('llama3_tok')
  build_llama3_tokenizer(path)
  return path


def test_ids_match_auto_tokenizer(tok_dir):
  ours = lm_tokenizer.Tokenizer.load(tok_dir / 'tokenizer.json')  # Picked by content.
  assert isinstance(ours, hf_tokenizer.HFTokenizer)
  theirs = transformers.AutoTokenizer.from_pretrained(tok_dir)
  for text in VARIED_TEXTS:
    want = theirs(text, add_special_tokens=False)['input_ids']
    assert ours.encode(text) == want, text
    # The data pipeline adds bos itself, as transformers' post-processor does.
    assert [ours.bos_id] + ours.encode(text) == theirs(text)['input_ids']
    assert ours.decode(ours.encode(text)) == theirs.decode(want, skip_special_tokens=True)
  assert ours.encode_batch(VARIED_TEXTS) == [ours.encode(t) for t in VARIED_TEXTS]
  assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
  assert ours.vocab_size == len(theirs)
  assert ours.id_to_piece(ours.bos_id) == '<|begin_of_text|>'


def test_byte_level_text_round_trips(tok_dir):
  ours = hf_tokenizer.HFTokenizer.load(tok_dir / 'tokenizer.json')
  for text in VARIED_TEXTS:
    if '<|' not in text:  # Special tokens written in text decode to nothing, as in transformers.
      assert ours.decode(ours.encode(text)) == text


def test_special_ids_and_padding(tok_dir):
  ours = hf_tokenizer.HFTokenizer.load(tok_dir / 'tokenizer.json')
  assert (ours.bos_id, ours.eos_id, ours.unk_id) == (0, 4, -1)
  assert ours.pad_id == ours.eos_id  # No pad or unk token: pad with a valid row (always masked).
  ids, offsets = ours.encode_with_offsets('ab cd')
  assert len(ids) == len(offsets) and offsets[-1][1] == 5


def test_run_saves_one_file_and_resumes_with_it(tok_dir, tmp_path):
  from lm import config as lm_config
  cfg = lm_config.base_config()
  cfg.tokenizer.path = str(tok_dir / 'tokenizer.json')
  first = lm_tokenizer.load_or_train(cfg, tmp_path)
  saved = tmp_path / lm_tokenizer.TOKENIZER_FILE
  assert json.loads(saved.read_bytes())[hf_tokenizer.BUNDLE_KEY] == 1
  cfg.tokenizer.path = ''
  again = lm_tokenizer.load_or_train(cfg, tmp_path)  # Step 2: the workdir's own copy.
  assert isinstance(again, hf_tokenizer.HFTokenizer)
  assert again.fingerprint == first.fingerprint
  assert again.chat_template == first.chat_template and again.bos_id == first.bos_id
  assert again.encode(VARIED_TEXTS[7]) == first.encode(VARIED_TEXTS[7])
  clone = pickle.loads(pickle.dumps(first))  # grain workers get a copy.
  assert clone.encode(VARIED_TEXTS[3]) == first.encode(VARIED_TEXTS[3])


def test_special_token_missing_from_vocabulary_is_named(tok_dir, tmp_path):
  (tmp_path / 'tokenizer.json').write_text((tok_dir / 'tokenizer.json').read_text())
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '</s>'}))
  with pytest.raises(ValueError, match=r"eos_token='</s>' is not in the tokenizer's vocabulary"):
    hf_tokenizer.HFTokenizer.load(tmp_path / 'tokenizer.json')

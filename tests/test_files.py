"""lm.files: small state files read with one clear error, written atomically."""

import pytest

from lm import files
from lm.errors import UserError


class _Bad(UserError, ValueError):
  pass


def test_json_round_trips_and_leaves_no_temporary_file(tmp_path):
  path = tmp_path / 'sub' / 'state.json'
  files.write_json(path, {'a': 1, 'b': [1.5, 'x']})
  assert files.read_json(path, _Bad) == {'a': 1, 'b': [1.5, 'x']}
  assert sorted(p.name for p in path.parent.iterdir()) == ['state.json']


def test_a_missing_file_reads_as_none_and_a_broken_one_is_named(tmp_path):
  assert files.read_json(tmp_path / 'none.json', _Bad) is None
  (tmp_path / 'bad.json').write_text('{"a": ')
  with pytest.raises(_Bad, match=r'bad\.json: not valid JSON .*; delete it'):
    files.read_json(tmp_path / 'bad.json', _Bad, 'delete it')


def test_read_bytes_names_what_is_missing(tmp_path):
  files.write_bytes(tmp_path / 'model', b'\x00\x01')
  assert files.read_bytes(tmp_path / 'model') == b'\x00\x01'
  with pytest.raises(FileNotFoundError, match='no tokenizer model at .*nowhere'):
    files.read_bytes(tmp_path / 'nowhere', 'tokenizer model')

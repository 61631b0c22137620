"""lm.files: small state files read with one clear error, written atomically."""

import os

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


def test_a_writer_that_fails_leaves_the_previous_file_and_no_temporary(tmp_path):
  path = tmp_path / 'shard.bin'
  files.write_bytes(path, b'old')
  with pytest.raises(RuntimeError, match='disk full'):
    with files.atomic_path(path) as tmp:
      tmp.write_bytes(b'half of the n')
      raise RuntimeError('disk full')
  assert path.read_bytes() == b'old'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['shard.bin']


def test_each_process_writes_its_own_temporary_file(tmp_path):
  # Two writers of one path (prepare workers, hosts sharing a disk) never share a temporary.
  with files.atomic_path(tmp_path / 'x') as tmp:
    assert str(os.getpid()) in tmp.name and tmp.parent == tmp_path
    tmp.write_bytes(b'new')
  assert (tmp_path / 'x').read_bytes() == b'new'

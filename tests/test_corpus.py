"""lm.corpus: the extracted-documents cache is plain JSON (never pickle) and round-trips."""

import json

import pytest

from lm import corpus


@pytest.fixture
def small_stdlib(tmp_path, monkeypatch):
  root = tmp_path / 'stdlib'
  (root / 'json').mkdir(parents=True)
  (root / 'json' / '__init__.py').write_text(
      '"""JSON encoding and decoding."""\n\n\ndef dumps(obj):\n  """Serialize obj."""\n'
      '  return str(obj)\n')
  monkeypatch.setattr(corpus, 'stdlib_root', lambda: root)
  monkeypatch.setenv('LM_CACHE_DIR', str(tmp_path / 'cache'))
  corpus.all_documents.cache_clear()
  yield tmp_path / 'cache' / 'corpus'
  corpus.all_documents.cache_clear()


def test_the_cache_is_json_and_reads_back_the_same_documents(small_stdlib):
  fresh = corpus.all_documents()
  assert any(d.name.startswith('docstrings:json') for d in fresh)
  [path] = small_stdlib.iterdir()
  assert path.suffix == '.json'
  assert tuple(corpus.Document(*fields) for fields in json.loads(path.read_text())) == fresh
  corpus.all_documents.cache_clear()
  assert corpus.all_documents() == fresh  # From the cache.


def test_a_cache_that_is_not_json_is_rebuilt_never_executed(small_stdlib):
  fresh = corpus.all_documents()
  [path] = small_stdlib.iterdir()
  # A pickle that would run code if unpickled.
  path.write_bytes(b"cos\nsystem\n(S'touch " + str(small_stdlib / 'pwned').encode() + b"'\ntR.")
  corpus.all_documents.cache_clear()
  assert corpus.all_documents() == fresh
  assert not (small_stdlib / 'pwned').exists()
  assert json.loads(path.read_text())  # Rewritten as JSON.

"""Data pipeline: packing, resume, host sharding, splits, sources, bad input, prepare, report."""

import collections
import json

import grain
import numpy as np
import pytest

from lm import config
from lm import corpus
from lm import data
from lm import tokenizer as tokenizer_lib
from helpers import data_cfg, make_texts, write_jsonl

BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')


@pytest.fixture(scope='module')
def tok():
  tok_cfg = config.base_config().tokenizer
  tok_cfg.model_type, tok_cfg.vocab_size, tok_cfg.byte_fallback = 'bpe', 200, False
  sample = make_texts(50) + [d.text for d in corpus.documents('general', ('topics',))[:20]]
  return tokenizer_lib.train_tokenizer(sample + ['{}[]()<>"\'`~!@#$%^&*-+=_|\\/?.,:;0123456789'],
                                       tok_cfg)


@pytest.fixture
def jsonl_cfg(tmp_path):
  texts = make_texts(60)
  return data_cfg(source='jsonl', paths=(write_jsonl(tmp_path / 'd.jsonl',
                                                     [{'text': t} for t in texts]),)), texts


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def real_stream(batches):
  """Concatenated real (non-padding) inputs of a sequence of batches, row-major."""
  return np.concatenate([b['inputs'][b['segment_ids'] > 0] for b in batches])


def split_docs(stream, bos):
  starts = np.flatnonzero(stream == bos)
  return [tuple(d) for d in np.split(stream, starts[1:])] if len(starts) else []


# --------------------------------------------------------------------------- packing


def packed(docs, rows, seq_len, pad_id=0, docs_per_element=3):
  ds = grain.MapDataset.source(docs).batch(docs_per_element, batch_fn=data.concat_docs)
  return data.PackedBatchIterDataset(ds.to_iter_dataset(), rows=rows, seq_len=seq_len,
                                     pad_id=pad_id)


def random_docs(seed, n=23):
  rng = np.random.default_rng(seed)
  lengths = rng.choice([1, 2, 5, 9, 17, 40], size=n)
  docs = [(rng.integers(4, 100, size=int(length)).astype(np.int32), int(rng.integers(0, 3)))
          for length in lengths]
  return docs


@pytest.mark.parametrize('seed', [0, 1])
def test_packing_loses_and_duplicates_no_token(seed):
  docs = random_docs(seed)
  rows, seq_len = 3, 7
  batches = list(packed(docs, rows, seq_len))
  stream = np.concatenate([t for t, _ in docs])
  np.testing.assert_array_equal(real_stream(batches), stream)

  # Expected per-token document index, position in document and loss flag.
  doc_of = np.concatenate([np.full(len(t), i) for i, (t, _) in enumerate(docs)])
  pos_of = np.concatenate([np.arange(len(t)) for t, _ in docs])
  flag_of = np.concatenate([np.arange(len(t)) >= aux for t, aux in docs])
  g = 0
  for batch in batches:
    assert all(batch[k].shape == (rows, seq_len) for k in BATCH_KEYS)
    for r in range(rows):
      real = batch['segment_ids'][r] > 0
      n = int(real.sum())
      assert real[:n].all() and not real[n:].any()  # Padding only at the end of a row.
      first_doc = doc_of[g] if n else 0
      for c in range(n):
        assert batch['segment_ids'][r, c] == doc_of[g] - first_doc + 1
        assert batch['positions'][r, c] == min(pos_of[g], c)
        has_next = g + 1 < len(stream)
        expect_loss = has_next and doc_of[g + 1] == doc_of[g] and flag_of[g + 1]
        assert batch['loss_mask'][r, c] == expect_loss
        if has_next:
          assert batch['targets'][r, c] == stream[g + 1]
        g += 1
      assert not batch['loss_mask'][r, n:].any()
  assert g == len(stream)


def test_packer_resumes_from_every_state():
  docs = random_docs(3, n=30)
  reference_iter = iter(packed(docs, 2, 5))
  states, batches = [], []
  while True:
    states.append(reference_iter.get_state())
    try:
      batches.append(next(reference_iter))
    except StopIteration:
      break
  for k, state in enumerate(states):
    fresh = iter(packed(docs, 2, 5))
    fresh.set_state(json.loads(json.dumps(state)))
    assert_batches_equal(list(fresh), batches[k:])


# --------------------------------------------------------------------------- pipeline


def test_batch_format(jsonl_cfg, tok):
  cfg, _ = jsonl_cfg
  batch = next(data.make_pipeline(cfg, tok, 'train'))
  for key in BATCH_KEYS:
    assert batch[key].shape == (4, 32)
  assert {batch[k].dtype for k in BATCH_KEYS} == {np.dtype('int32'), np.dtype('float32')}
  assert batch['loss_mask'].dtype == np.float32
  assert (batch['inputs'][:, 1:] == batch['targets'][:, :-1]).all()  # No padding mid-training.


@pytest.mark.parametrize('prefetch', [0, 2])
def test_resume_builtin_matches_uninterrupted_run(tok, prefetch):
  cfg = data_cfg(prefetch_batches=prefetch, seq_len=64)
  k, m = 3, 5
  uninterrupted = data.make_pipeline(cfg, tok, 'train')
  take(uninterrupted, k)
  expected = take(uninterrupted, m)

  first = data.make_pipeline(cfg, tok, 'train')
  take(first, k)
  state = json.loads(json.dumps(first.get_state()))
  resumed = data.make_pipeline(cfg, tok, 'train')
  resumed.set_state(state)
  assert_batches_equal(take(resumed, m), expected)


def test_host_shards_are_disjoint_and_cover_the_data(jsonl_cfg, tok):
  cfg, texts = jsonl_cfg
  cfg.data.num_epochs = 1
  cfg.data.batch_size = 6
  train_texts = {r.text for r in data.load_documents(cfg, 'train')}
  assert 40 < len(train_texts) <= len(texts)
  per_process = []
  for p in range(3):
    batches = list(data.make_pipeline(cfg, tok, 'train', process_index=p, process_count=3))
    assert all(b['inputs'].shape == (2, 32) for b in batches)
    docs = split_docs(real_stream(batches), tok.bos_id)
    per_process.append([tok.decode(d) for d in docs])
  seen = collections.Counter(t for texts_p in per_process for t in texts_p)
  assert set(seen) == train_texts  # Together they cover the data...
  assert all(count == 1 for count in seen.values())  # ...and no document is in two shards.
  assert all(per_process)


def test_epochs_repeat_every_document_reshuffled(jsonl_cfg, tok):
  cfg, _ = jsonl_cfg
  cfg.data.num_epochs = 2
  stream = real_stream(list(data.make_pipeline(cfg, tok, 'train')))
  docs = split_docs(stream, tok.bos_id)
  counts = collections.Counter(docs)
  assert set(counts.values()) == {2}
  half = len(docs) // 2
  assert docs[:half] != docs[half:]  # Each epoch is shuffled differently.


def test_validation_is_finite_repeatable_and_same_length_on_every_process(jsonl_cfg, tok):
  cfg, _ = jsonl_cfg
  cfg.data.validation_share = 0.3
  cfg.data.prefetch_batches = 2
  single = list(data.make_pipeline(cfg, tok, 'validation'))
  assert single
  assert_batches_equal(list(data.make_pipeline(cfg, tok, 'validation')), single)
  cfg.data.shuffle_seed = 7  # The training order changes; validation does not.
  assert_batches_equal(list(data.make_pipeline(cfg, tok, 'validation')), single)
  shards = [list(data.make_pipeline(cfg, tok, 'validation', process_index=p, process_count=2))
            for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == len(single)
  for b0, b1, whole in zip(*shards, single):
    for key in BATCH_KEYS:
      np.testing.assert_array_equal(np.concatenate([b0[key], b1[key]]), whole[key])


def test_splits_are_disjoint_and_train_fraction_is_a_nested_prefix(jsonl_cfg):
  cfg, texts = jsonl_cfg
  cfg.data.validation_share = 0.2
  train = data.load_documents(cfg, 'train')
  validation = data.load_documents(cfg, 'validation')
  assert {r.text for r in train}.isdisjoint({r.text for r in validation})
  assert len(train) + len(validation) == len(texts)
  cfg.data.train_fraction = 0.5
  half = data.load_documents(cfg, 'train')
  cfg.data.train_fraction = 0.25
  quarter = data.load_documents(cfg, 'train')
  assert half == train[:len(half)] and quarter == half[:len(quarter)]
  assert len(half) == round(0.5 * len(train))
  assert data.data_stats(cfg).held_out == len(train) - len(quarter)


def test_edited_file_is_read_again(tmp_path):
  path = tmp_path / 'e.jsonl'
  cfg = data_cfg(source='jsonl', paths=(write_jsonl(path, [{'text': t} for t in make_texts(5)]),),
                 validation_share=0.0)
  assert len(data.load_documents(cfg, 'train')) == 5
  write_jsonl(path, [{'text': t} for t in make_texts(7, seed=1)])
  assert len(data.load_documents(cfg, 'train')) == 7


def test_builtin_domains_are_held_out_of_general():
  assert 'email' in corpus.DOMAINS and 'asyncio' in corpus.DOMAINS
  general = corpus.documents('general')
  for domain, modules in corpus.DOMAIN_MODULES.items():
    docs = corpus.documents(domain)
    assert docs and all(d.domain == domain for d in docs)
    for doc in general:
      top = doc.group.split('/')[0].split('#')[0].removesuffix('.py')
      assert top not in modules, doc.name
      assert not doc.name.startswith(tuple(f'docstrings:{m}.' for m in modules)), doc.name
  kinds = collections.Counter(d.kind for d in general)
  assert set(kinds) == set(corpus.KINDS)


def test_builtin_source_chunks_reassemble_their_file():
  root = corpus.stdlib_root()
  for name in ('json/__init__.py', 'email/message.py'):
    chunks = [d.text for d in corpus.all_documents()
              if d.kind == 'source' and d.group.split('#')[0] == name]
    assert len(chunks) > 1 and ''.join(chunks) == (root / name).read_text()


def test_builtin_split_keeps_groups_together():
  cfg = data_cfg(builtin_subset='asyncio', validation_share=0.2)
  train = data.load_documents(cfg, 'train')
  validation = data.load_documents(cfg, 'validation')
  assert train and validation
  assert {r.group for r in train}.isdisjoint({r.group for r in validation})
  assert data.load_documents(cfg, 'validation') == validation  # Deterministic.


def test_quality_filters_and_dedup_are_counted(tmp_path, tok):
  texts = make_texts(20)
  rows = ([{'text': t} for t in texts] + [{'text': texts[0]}, {'text': 'short'},
          {'text': '\x00\x01\x02\x03' * 20 + 'mostly binary'}, {'text': texts[1] + ' extra'}])
  cfg = data_cfg(source='jsonl', paths=(write_jsonl(tmp_path / 'q.jsonl', rows),), near_dedup=True,
                 near_dedup_threshold=0.7)
  stats = data.data_stats(cfg)
  assert stats.read == 24
  assert stats.filtered == {'duplicate': 1, 'too_short': 1, 'non_text': 1, 'near_duplicate': 1}
  assert stats.kept['train'] + stats.kept['validation'] == 20
  assert 'duplicate 1' in stats.summary()


# --------------------------------------------------------------------------- sources and tasks


def test_text_parquet_and_arrayrecord_sources(tmp_path, tok):
  import pyarrow as pa
  import pyarrow.parquet as pq
  from array_record.python import array_record_module
  texts = make_texts(12)
  (tmp_path / 'txt').mkdir()
  for i, t in enumerate(texts[:4]):
    (tmp_path / 'txt' / f'{i}.txt').write_text(t)
  assert {r.text for r in data.load_documents(data_cfg(source='text', paths=(str(tmp_path / 'txt' / '*.txt'),), validation_share=0.0), 'train')} == set(texts[:4])
  (tmp_path / 'para.txt').write_text('\n\n'.join(texts[4:7]) + '\n')
  para = data_cfg(source='text', paths=(str(tmp_path / 'para.txt'),), text_unit='paragraph',
                  validation_share=0.0)
  assert {r.text.strip() for r in data.load_documents(para, 'train')} == set(texts[4:7])
  pq.write_table(pa.table({'text': texts[7:10], 'other': [1, 2, 3]}), tmp_path / 'd.parquet')
  parquet = data_cfg(source='parquet', paths=(str(tmp_path / 'd.parquet'),), validation_share=0.0)
  assert {r.text for r in data.load_documents(parquet, 'train')} == set(texts[7:10])
  writer = array_record_module.ArrayRecordWriter(str(tmp_path / 'd.array_record'), 'group_size:1')
  writer.write(texts[10].encode())
  writer.write(json.dumps({'text': texts[11]}).encode())
  writer.close()
  ar = data_cfg(source='arrayrecord', paths=(str(tmp_path / 'd.array_record'),),
                validation_share=0.0)
  assert {r.text for r in data.load_documents(ar, 'train')} == set(texts[10:12])
  assert next(data.make_pipeline(ar, tok, 'train'))['inputs'].shape == (4, 32)


def test_mixture_draws_by_weight(tmp_path, tok):
  a = write_jsonl(tmp_path / 'a.jsonl', [{'text': 'AAAA ' + t} for t in make_texts(40, 1)])
  b = write_jsonl(tmp_path / 'b.jsonl', [{'text': 'BBBB ' + t} for t in make_texts(40, 2)])
  cfg = data_cfg(source='mixture', mixture=((a, 3.0), (b, 1.0)), seq_len=64, batch_size=8)
  docs = split_docs(real_stream(take(data.make_pipeline(cfg, tok, 'train'), 60)), tok.bos_id)
  share_a = np.mean([tok.decode(d).startswith('AAAA') for d in docs])
  assert 0.65 < share_a < 0.85


def test_sft_loss_only_on_completion(tmp_path, tok):
  rows = [{'prompt': f'question {i} alpha beta?', 'completion': f' answer gamma {i}'}
          for i in range(30)]
  cfg = data_cfg(source='jsonl', paths=(write_jsonl(tmp_path / 's.jsonl', rows),), seq_len=48,
                 num_epochs=1)
  cfg.finetune.task = 'sft'
  batches = list(data.make_pipeline(cfg, tok, 'train'))
  learned = np.concatenate([b['targets'][b['loss_mask'] > 0] for b in batches])
  expected = np.concatenate([tok.encode(r.completion) + [tok.eos_id]
                             for r in data.load_documents(cfg, 'train')])
  # Exactly the completion tokens (and each eos) are learned, nothing of the prompts.
  assert collections.Counter(learned.tolist()) == collections.Counter(expected.tolist())
  assert len(real_stream(batches)) > len(learned)


def test_classify_rows_and_sorted_labels(tmp_path, tok):
  rows = [{'text': t, 'label': lbl} for t, lbl in zip(make_texts(30), ['neg', 'pos', 'neutral'] * 10)]
  cfg = data_cfg(source='jsonl', paths=(write_jsonl(tmp_path / 'c.jsonl', rows),), seq_len=16,
                 num_epochs=1, validation_share=0.0)
  cfg.finetune.task = 'classify'
  cfg.model.num_classes = 3
  assert data.class_names(cfg) == ['neg', 'neutral', 'pos']
  batches = list(data.make_pipeline(cfg, tok, 'train'))
  assert len(batches) == 8  # 30 examples in rows of 4: the last batch is padded, not dropped.
  labels = np.concatenate([b['labels'] for b in batches])
  real_rows = np.concatenate([b['loss_mask'].any(axis=1) for b in batches])
  assert real_rows.sum() == 30
  assert collections.Counter(labels[real_rows]) == {0: 10, 1: 10, 2: 10}
  first = batches[0]
  assert (first['inputs'][:, 0] == tok.bos_id).all()
  ends = first['segment_ids'].sum(axis=1) - 1
  assert (first['inputs'][np.arange(4), ends] == tok.eos_id).all()  # Truncation keeps eos.
  np.testing.assert_array_equal(first['loss_mask'], first['segment_ids'])
  cfg.model.num_classes = 2
  with pytest.raises(data.DataError, match='model.num_classes'):
    data.make_pipeline(cfg, tok, 'train')


# --------------------------------------------------------------------------- bad input


def _error(cfg):
  with pytest.raises(data.DataError) as info:
    data.load_documents(cfg, 'train')
  message = str(info.value)
  assert '\n' not in message
  return message


def test_missing_path_names_the_key(tmp_path):
  message = _error(data_cfg(source='text', paths=(str(tmp_path / 'nope' / '*.txt'),),
                            on_error='skip'))
  assert 'data.paths' in message and 'nope' in message


def test_bad_jsonl_lines_name_file_and_line(tmp_path):
  path = tmp_path / 'bad.jsonl'
  good = json.dumps({'text': make_texts(1)[0]})
  path.write_text(f'{good}\n{{not json\n')
  assert f'{path}:2: not valid JSON' in _error(data_cfg(source='jsonl', paths=(str(path),)))
  path.write_text(f'{good}\n\n{json.dumps({"body": "x"})}\n')
  message = _error(data_cfg(source='jsonl', paths=(str(path),)))
  assert f'{path}:3' in message and "'text'" in message and 'data.text_field' in message


def test_invalid_utf8_names_the_line(tmp_path):
  path = tmp_path / 'latin1.txt'
  path.write_bytes('line one\nline two\ncaf\xe9 on line three\n'.encode('latin-1'))
  message = _error(data_cfg(source='text', paths=(str(path),)))
  assert f'{path}:3' in message and 'UTF-8' in message


def test_empty_file_and_corrupt_parquet(tmp_path):
  (tmp_path / 'empty.txt').write_bytes(b'')
  assert 'empty file' in _error(data_cfg(source='text', paths=(str(tmp_path / 'empty.txt'),)))
  (tmp_path / 'broken.parquet').write_bytes(b'PAR1 this is not parquet')
  message = _error(data_cfg(source='parquet', paths=(str(tmp_path / 'broken.parquet'),)))
  assert 'broken.parquet' in message and 'Parquet' in message


def test_skip_mode_counts_every_bad_record_by_reason(tmp_path, tok):
  import pyarrow  # noqa: F401  (parquet support present)
  texts = make_texts(10)
  jsonl = tmp_path / 'mixed.jsonl'
  jsonl.write_bytes(b'\n'.join([json.dumps({'text': t}).encode() for t in texts] +
                               [b'{broken', json.dumps({'body': 'x'}).encode(), b'[1, 2]',
                                b'{"text": "caf\xe9 bad bytes here, long enough to pass"}']) + b'\n')
  (tmp_path / 'empty.jsonl').write_text('\n')
  (tmp_path / 'broken.parquet').write_bytes(b'not parquet at all')
  cfg = data_cfg(source='mixture', on_error='skip',
                 mixture=((str(jsonl), 1.0), (str(tmp_path / '*.jsonl'), 1.0),
                          (str(tmp_path / 'broken.parquet'), 1.0)))
  stats = data.data_stats(cfg)
  assert stats.skipped['invalid_json'] == 2  # mixed.jsonl is read by two components.
  assert stats.skipped['missing_field'] == 2
  assert stats.skipped['not_an_object'] == 2
  assert stats.skipped['invalid_utf8'] == 2
  assert stats.skipped['empty_file'] == 1
  assert stats.skipped['corrupt_file'] == 1
  assert 'mixed.jsonl:11' in stats.skip_examples['invalid_json']
  text = data.report(data_cfg(source='jsonl', paths=(str(jsonl),), on_error='skip'), tok)
  assert 'invalid_json 1' in text and 'mixed.jsonl:11' in text


def test_config_errors_name_the_key(tok):
  with pytest.raises(data.DataError, match='data.builtin_subset'):
    data.load_documents(data_cfg(builtin_subset='nope'), 'train')
  cfg = data_cfg(batch_size=5)
  with pytest.raises(data.DataError, match='data.batch_size'):
    data.make_pipeline(cfg, tok, 'train', process_count=2)
  cfg = data_cfg()
  cfg.finetune.task = 'sft'
  with pytest.raises(data.DataError, match="task 'sft'"):
    data.load_documents(cfg, 'train')


# --------------------------------------------------------------------------- prepare, report


def test_prepared_shards_hold_the_on_the_fly_documents_and_resume(jsonl_cfg, tok, tmp_path):
  cfg, _ = jsonl_cfg
  meta = data.prepare(cfg, tok, tmp_path / 'prep')
  assert meta['splits']['train']['documents'] == len(data.load_documents(cfg, 'train'))
  assert len(meta['splits']['train']['files']) == cfg.data.prepare_shards  # One per unit.
  prepared = data_cfg(**{**cfg.data.to_dict(), 'prepared_dir': str(tmp_path / 'prep')})
  prepared.data.num_epochs = 1
  docs = split_docs(real_stream(list(data.make_pipeline(prepared, tok, 'train'))), tok.bos_id)
  expected = [tuple(tok.encode(r.text)) for r in data.load_documents(cfg, 'train')]
  assert sorted(tuple(d[1:-1]) for d in docs) == sorted(expected)
  prepared.data.num_epochs = 0
  uninterrupted = take(data.make_pipeline(prepared, tok, 'train'), 6)
  from_shards = data.make_pipeline(prepared, tok, 'train')
  assert_batches_equal(take(from_shards, 2), uninterrupted[:2])
  state = json.loads(json.dumps(from_shards.get_state()))
  assert len(json.dumps(state)) < 1000  # O(shards), not O(documents).
  resumed = data.make_pipeline(prepared, tok, 'train')
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 4), uninterrupted[2:])
  validation = split_docs(real_stream(list(data.make_pipeline(prepared, tok, 'validation'))),
                          tok.bos_id)
  assert sorted(tuple(d[1:-1]) for d in validation) == sorted(
      tuple(tok.encode(r.text)) for r in data.load_documents(cfg, 'validation'))
  # The shards only make sense with the tokenizer that wrote them.
  other_cfg = config.base_config().tokenizer
  other_cfg.model_type, other_cfg.vocab_size, other_cfg.byte_fallback = 'char', 100, False
  other = tokenizer_lib.train_tokenizer(make_texts(5), other_cfg)
  with pytest.raises(data.DataError, match='tokenizer'):
    data.make_pipeline(prepared, other, 'train')
  assert tokenizer_lib.load_or_train(prepared, tmp_path / 'run').fingerprint == tok.fingerprint


def test_report_prints_counts_and_top_tokens(jsonl_cfg, tok):
  cfg, _ = jsonl_cfg
  text = data.report(cfg, tok, top=5)
  for needle in ('documents: read 60', 'bytes/token', 'duplicates removed', 'filtered:',
                 'top 5 tokens'):
    assert needle in text


@pytest.mark.slow
def test_worker_processes_resume_exactly(jsonl_cfg, tok):
  cfg, _ = jsonl_cfg
  cfg.data.worker_count = 2
  uninterrupted = data.make_pipeline(cfg, tok, 'train')
  take(uninterrupted, 3)
  state = json.loads(json.dumps(uninterrupted.get_state()))
  expected = take(uninterrupted, 4)
  resumed = data.make_pipeline(cfg, tok, 'train')
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 4), expected)


def test_tokenizer_never_imports_the_data_layer():
  import subprocess
  import sys
  code = ('import sys, lm.tokenizer; '
          "assert not [m for m in sys.modules if m.startswith('lm.data')], sorted(sys.modules)")
  subprocess.run([sys.executable, '-c', code], check=True)

"""Data at scale: per-process reads, process-count independence, prepare's resume and dedup."""

import collections
import json

import numpy as np
import pytest

from lm import config
from lm import data
from lm import tokenizer as tokenizer_lib
from lm.data import prepare_job, units as units_lib
from helpers import data_cfg

WORDS = 'alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron'.split()


def make_texts(n, seed=0):
  rng = np.random.default_rng(seed)
  return [f'doc {seed}-{i}: ' + ' '.join(rng.choice(WORDS, rng.integers(8, 60))) for i in range(n)]


def write_jsonl(path, texts):
  path.write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
  return str(path)


def make_cfg(**overrides):
  return data_cfg(**{'shuffle_window': 8, **overrides})


@pytest.fixture(scope='module')
def tok():
  tok_cfg = config.base_config().tokenizer
  tok_cfg.model_type, tok_cfg.vocab_size, tok_cfg.byte_fallback = 'bpe', 150, False
  return tokenizer_lib.train_tokenizer(make_texts(60) + ['0123456789:-'], tok_cfg)


@pytest.fixture
def files(tmp_path):
  return [write_jsonl(tmp_path / f'part-{i}.jsonl', make_texts(12, seed=i)) for i in range(8)]


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def docs_of(batches, bos):
  stream = np.concatenate([b['inputs'][b['segment_ids'] > 0] for b in batches])
  starts = np.flatnonzero(stream == bos)
  return [tuple(d) for d in np.split(stream, starts[1:])]


def test_each_process_reads_only_its_files_and_ranges(files, tok, tmp_path, monkeypatch):
  opened = collections.defaultdict(set)
  real_read = units_lib.read_file
  process = [0]

  def counting_read(kind, path, *args):
    opened[process[0]].add((str(path), args[-2], args[-1]))
    return real_read(kind, path, *args)

  monkeypatch.setattr(units_lib, 'read_file', counting_read)
  cfg = make_cfg(source='jsonl', paths=tuple(files), shard_count=2)
  for p in range(2):
    process[0] = p
    take(data.make_pipeline(cfg, tok, 'train', process_index=p, process_count=2), 12)
  names = [{path.rsplit('-', 1)[1] for path, _, _ in opened[p]} for p in range(2)]
  assert len(names[0]) >= 2 and len(names[1]) >= 2  # Files open lazily, in turn.
  assert names[0] <= {'0.jsonl', '2.jsonl', '4.jsonl', '6.jsonl'}
  assert names[1] <= {'1.jsonl', '3.jsonl', '5.jsonl', '7.jsonl'}
  # One big file: the processes read disjoint byte ranges of it.
  opened.clear()
  big = write_jsonl(tmp_path / 'big.jsonl', make_texts(200, seed=9))
  cfg = make_cfg(source='jsonl', paths=(big,), shard_count=2, read_chunk_bytes=2000)
  for p in range(2):
    process[0] = p
    take(data.make_pipeline(cfg, tok, 'train', process_index=p, process_count=2), 3)
  ranges = [{(b, e) for _, b, e in opened[p]} for p in range(2)]
  assert ranges[0] and ranges[1] and not ranges[0] & ranges[1]


def test_same_global_batches_for_1_2_and_4_processes(files, tok):
  cfg = make_cfg(source='jsonl', paths=tuple(files), shard_count=4, batch_size=8)
  reference = take(data.make_pipeline(cfg, tok, 'train'), 5)
  for count in (2, 4):
    per_process = [take(data.make_pipeline(cfg, tok, 'train', process_index=p,
                                           process_count=count), 5) for p in range(count)]
    for step, whole in enumerate(reference):
      for key in whole:
        np.testing.assert_array_equal(
            np.concatenate([rows[step][key] for rows in per_process]), whole[key])


def test_streamed_epoch_covers_every_training_document_once(files, tok):
  cfg = make_cfg(source='jsonl', paths=tuple(files), num_epochs=1, shard_count=2)
  seen = collections.Counter()
  for p in range(2):
    it = data.make_pipeline(cfg, tok, 'train', process_index=p, process_count=2)
    seen.update(tok.decode(d) for d in docs_of(list(it), tok.bos_id))
  assert set(seen) == {r.text for r in data.load_documents(cfg, 'train')}
  assert set(seen.values()) == {1}


def test_prepared_resume_across_a_process_count_change(files, tok, tmp_path):
  cfg = make_cfg(source='jsonl', paths=tuple(files), shard_count=2)
  data.prepare(cfg, tok, tmp_path / 'prep', workers=1)
  cfg.data.prepared_dir = str(tmp_path / 'prep')
  uninterrupted = take(data.make_pipeline(cfg, tok, 'train'), 7)
  states = []
  for p in range(2):
    it = data.make_pipeline(cfg, tok, 'train', process_index=p, process_count=2)
    take(it, 3)
    states.append(json.loads(json.dumps(it.get_state())))
  resumed = data.make_pipeline(cfg, tok, 'train')
  resumed.set_state(data.merge_iterator_states(states))
  assert_batches_equal(take(resumed, 4), uninterrupted[3:])


def _shard_bytes(directory):
  return {p.name: p.read_bytes() for p in sorted(directory.glob('*.array_record'))}


def test_killed_prepare_resumes_to_byte_identical_shards(files, tok, tmp_path, monkeypatch):
  cfg = make_cfg(source='jsonl', paths=tuple(files), prepare_shards=8)
  whole = data.prepare(cfg, tok, tmp_path / 'whole', workers=1)
  real = prepare_job._tokenize_unit  # pylint: disable=protected-access
  done = []

  def dies_after_three(job):
    if len(done) == 3:
      raise KeyboardInterrupt('killed')
    done.append(job[0])
    return real(job)

  monkeypatch.setattr(prepare_job, '_tokenize_unit', dies_after_three)
  with pytest.raises(KeyboardInterrupt):
    data.prepare(cfg, tok, tmp_path / 'resumed', workers=1)
  monkeypatch.setattr(prepare_job, '_tokenize_unit', real)
  assert not (tmp_path / 'resumed' / 'meta.json').exists()
  ran = prepare_job.tokenize_stage(cfg, tok, tmp_path / 'resumed', workers=1, progress=False)
  assert ran == list(range(3, 8))  # The three finished units are not redone.
  resumed = data.prepare(cfg, tok, tmp_path / 'resumed', workers=2)
  assert resumed['splits'] == whole['splits']
  assert _shard_bytes(tmp_path / 'resumed') == _shard_bytes(tmp_path / 'whole')


def test_prepare_split_into_tasks_then_merged_equals_one_job(files, tok, tmp_path):
  cfg = make_cfg(source='jsonl', paths=tuple(files))
  whole = data.prepare(cfg, tok, tmp_path / 'whole')
  for task in range(3):
    assert data.prepare(cfg, tok, tmp_path / 'split', task_index=task, task_count=3) is None
  merged = data.prepare(cfg, tok, tmp_path / 'split', task_count=3, merge=True)
  assert merged['splits'] == whole['splits'] and merged['stats'] == whole['stats']
  assert _shard_bytes(tmp_path / 'split') == _shard_bytes(tmp_path / 'whole')


def test_bucket_dedup_equals_in_memory_dedup(tmp_path, tok):
  texts = make_texts(40)
  rng = np.random.default_rng(3)
  paths = []
  for i in range(4):  # Every file repeats documents of the others, in a shuffled order.
    chosen = [texts[j] for j in rng.choice(40, 25)]
    paths.append(write_jsonl(tmp_path / f'd{i}.jsonl', chosen))
  cfg = make_cfg(source='jsonl', paths=tuple(paths), dedup_buckets=3, prepare_shards=6)
  meta = data.prepare(cfg, tok, tmp_path / 'prep')
  in_memory = data.data_stats(cfg)
  assert in_memory.filtered['duplicate'] > 20
  assert meta['stats']['filtered'] == dict(in_memory.filtered)
  assert meta['stats']['kept'] == in_memory.kept
  cfg.data.prepared_dir, cfg.data.num_epochs = str(tmp_path / 'prep'), 1
  docs = docs_of(list(data.make_pipeline(cfg, tok, 'train')), tok.bos_id)
  assert sorted(tok.decode(d) for d in docs) == sorted(
      r.text for r in data.load_documents(make_cfg(source='jsonl', paths=tuple(paths)), 'train'))


def test_near_dedup_past_its_bound_is_refused(files, tok, tmp_path):
  cfg = make_cfg(source='jsonl', paths=tuple(files[:2]), near_dedup=True, near_dedup_max_docs=10)
  with pytest.raises(data.DataError, match='data.near_dedup_max_docs'):
    data.prepare(cfg, tok, tmp_path / 'prep')


def test_missing_or_truncated_shard_is_named(files, tok, tmp_path):
  cfg = make_cfg(source='jsonl', paths=tuple(files))
  meta = data.prepare(cfg, tok, tmp_path / 'prep')
  cfg.data.prepared_dir = str(tmp_path / 'prep')
  first, second = meta['splits']['train']['files'][:2]
  raw = (tmp_path / 'prep' / first).read_bytes()
  (tmp_path / 'prep' / first).write_bytes(raw[:len(raw) // 2])
  with pytest.raises(data.DataError, match=first):
    data.make_pipeline(cfg, tok, 'train')
  (tmp_path / 'prep' / first).write_bytes(raw)
  (tmp_path / 'prep' / second).unlink()
  with pytest.raises(data.DataError, match=f'{second}: prepared shard is missing'):
    data.make_pipeline(cfg, tok, 'train')


def test_validation_paths_replace_the_hash_split(files, tok, tmp_path):
  held = write_jsonl(tmp_path / 'held.jsonl', make_texts(10, seed=50))
  cfg = make_cfg(source='jsonl', paths=tuple(files), validation_paths=(held,), num_epochs=1)
  validation = docs_of(list(data.make_pipeline(cfg, tok, 'validation')), tok.bos_id)
  assert sorted(tok.decode(d) for d in validation) == sorted(make_texts(10, seed=50))
  train = docs_of(list(data.make_pipeline(cfg, tok, 'train')), tok.bos_id)
  assert len(train) == sum(12 for _ in files)  # Every source document trains.
  assert len(data.load_documents(cfg, 'validation')) == 10
  meta = data.prepare(cfg, tok, tmp_path / 'prep')
  assert meta['splits']['validation']['documents'] == 10
  assert meta['splits']['train']['documents'] == 96


def test_train_and_finetune_evaluate_on_validation_paths(files, tmp_path):
  from lm import finetune, run as run_lib
  held = write_jsonl(tmp_path / 'held.jsonl', make_texts(10, seed=50))
  cfg = make_cfg(source='jsonl', paths=tuple(files), validation_paths=(held,))
  for key, value in {'d_model': 32, 'n_layers': 1, 'n_heads': 2, 'n_kv_heads': 1,
                     'mlp_dim': 64}.items():
    cfg.model[key] = value
  cfg.tokenizer.vocab_size, cfg.tokenizer.byte_fallback = 150, False
  cfg.mesh.data, cfg.mesh.fsdp, cfg.data.batch_size = 8, 1, 8
  for is_finetune in (False, True):
    run = run_lib.build_run(cfg, tmp_path / f'run{is_finetune}', is_finetune=is_finetune)
    batches = list(run_lib.make_iterator(run, 'validation'))
    docs = [d[1:-1] for d in docs_of(batches, run.tokenizer.bos_id)]
    assert sorted(docs) == sorted(tuple(run.tokenizer.encode(t)) for t in make_texts(10, seed=50))
  # The before/after report's general loss reads the general corpus, not the domain's files.
  assert not finetune.general_config(cfg).data.validation_paths


def test_a_task_is_a_function_to_ids_and_a_loss_mask(tok):
  import grain
  from lm.data import tokenize
  ids = np.arange(4, 14, dtype=np.int32)
  mask = np.array([0, 0, 1, 1, 0, 0, 1, 1, 1, 0], bool)  # E.g. two assistant turns of a chat.
  back_ids, back_mask = tokenize.decode_prepared(tokenize.encode_prepared(ids, mask))
  np.testing.assert_array_equal(back_ids, ids)
  np.testing.assert_array_equal(back_mask, mask)
  assert tokenize.decode_prepared(tokenize.encode_prepared(ids, np.arange(10) >= 3))[1] == 3
  elements = grain.MapDataset.source([(ids, mask)]).batch(1, batch_fn=data.concat_docs)
  [batch] = list(data.PackedBatchIterDataset(elements.to_iter_dataset(), rows=1, seq_len=10,
                                             pad_id=0))
  np.testing.assert_array_equal(batch['loss_mask'][0, :-1], mask[1:])  # Targets in the mask.
  sft_ids, sft_mask = tokenize.TASK_FUNCTIONS['sft'](
      data.Record('question alpha', completion=' beta'), tok)
  assert sft_ids[0] == tok.bos_id and sft_ids[-1] == tok.eos_id
  assert not sft_mask[:1 + len(tok.encode('question alpha'))].any() and sft_mask[-1]


def test_batch_size_override_for_a_second_pipeline_resumes(files, tok):
  cfg = make_cfg(source='jsonl', paths=tuple(files), batch_size=8)
  first = data.make_pipeline(cfg, tok, 'train', batch_size=2)
  assert next(first)['inputs'].shape == (2, 32)
  state = json.loads(json.dumps({'main': None, 'replay': first.get_state()}))
  expected = take(first, 3)
  resumed = data.make_pipeline(cfg, tok, 'train', batch_size=2)
  resumed.set_state(state['replay'])
  assert_batches_equal(take(resumed, 3), expected)

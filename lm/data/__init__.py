"""The data layer: sources -> quality filters -> tokenize -> pack -> batch, as one grain pipeline.

    it = make_pipeline(cfg, tokenizer, 'train', process_index=i, process_count=n)
    batch = next(it)          # dict of host-local numpy arrays, this process's rows
    state = it.get_state()    # JSON-serialisable; a fresh pipeline + set_state(state)
                              # continues with exactly the batches this one would produce
    it.data_stats             # DataStats: documents read/kept, filtered and skipped by reason

Sources (cfg.data.source; paths through etils.epath, so gs:// works):
  'builtin'      the running interpreter's standard library (lm.corpus), subset
                 cfg.data.builtin_subset ('general' or a held-out domain of lm.corpus.DOMAINS);
  'text'         files/globs/directories; one document per file, or per blank-line-separated
                 block with data.text_unit='paragraph';
  'jsonl'        one JSON object per line; fields data.text_field (task 'lm'), prompt_field +
                 completion_field ('sft'), text_field + label_field ('classify'),
                 messages_field ('chat': [{"role", "content"}, ...], rendered with the chat
                 template data.chat_template names, loss on assistant turns; lm.chat);
  'parquet'      the same fields as columns (pyarrow);
  'arrayrecord'  records of UTF-8 text, or JSON objects (a record starting with '{' that parses
                 as an object) with the fields above;
  'mixture'      cfg.data.mixture = ((name, weight), ...): a builtin subset name or a path/glob
                 (type from its extension: .jsonl/.json, .parquet, .array_record, else text).
                 Documents are drawn from the components with probability ~ weight.
  cfg.data.prepared_dir, when set, replaces all of these with the token shards written by
  `python -m lm.data prepare` (the large-corpus path, below).
  cfg.data.validation_paths (files/globs, any format above), when set, is the validation split
  and every document of the sources trains (instead of the hash split below).

Three ways documents reach a shard (shard_documents.py), none holding the corpus in memory
except the built-in one (its size is fixed):
  prepared shards   grain random access over the ArrayRecord shards: a global shuffle per epoch,
                    each logical shard reading records s, s+S, ... of it; state O(1) per shard.
  files, streamed   cut into units (units.py: whole files, JSONL byte ranges of about
                    data.read_chunk_bytes, Parquet row groups, ArrayRecord record ranges); shard
                    s reads units s, s+S, ... in a per-epoch shuffled order, through a window
                    shuffle of data.shuffle_window documents. Exact dedup is within a unit and
                    the DataStats are counts so far; corpus-wide exact/near dedup and exact
                    counts are prepare's job.
  built-in corpus   read, filtered and de-duplicated in memory (documents.py), as are the small
                    helpers load_documents, data_stats, class_names and report on raw sources.
Filters, in order: too_short / too_long (chars; task 'lm' only, short task examples are
legitimate), non_text (share of control characters / U+FFFD above data.max_nontext_fraction),
duplicate (exact content hash), near_duplicate (MinHash LSH, data.near_dedup; prepare and the
in-memory path only).

Split: every document has a group (its content hash; for the built-in corpus, the source
chunk it came from) and a rank = hash(group) in [0, 1). rank < data.validation_share is
validation, the rest is training. data.train_fraction keeps a nested, hash-random subset of
the training documents: the lowest-ranked share (in memory), the rank band
[share, share + fraction * (1 - share)) (streamed), or a rank-ordered prefix of each prepared
shard.

Prepare (prepare_job.py): a streaming, parallel (--workers), resumable job; --task=i --tasks=N
splits its tokenize stage over machines, `--merge` then de-duplicates through on-disk hash
buckets (dedup.py) and writes the shards and meta.json. docs/scaling.md has the commands.

Bad input: a missing path, an empty file, a JSONL line that is not a JSON object or lacks a
field, an unreadable Parquet/ArrayRecord file, or bytes that are not UTF-8 raise DataError
with one line naming file and line (or row / record). With data.on_error='skip' the record
(or file) is skipped instead and counted by reason in DataStats.skipped; a path that matches
nothing always raises, since it is a typo rather than bad data.

Batches (T = data.seq_len, B = data.batch_size // process_count rows per process):
  inputs      int32   [B, T]  tokens; documents are wrapped as bos + tokens + eos
  targets     int32   [B, T]  the next token of the stream
  segment_ids int32   [B, T]  1, 2, ... per document in the row; 0 = padding
  positions   int32   [B, T]  0, 1, ... restarting with every segment of the row
  loss_mask   float32 [B, T]  1 where the target is the next token of the same document
                              (0 on padding and across document boundaries; for task 'sft'
                              also 0 where the target is a prompt token, for 'chat' where it
                              is not an assistant-turn token)
  labels      int32   [B]     task 'classify' only; ids in the order of class_names(cfg)
Tasks 'lm', 'sft' and 'chat' concatenate documents and cut the stream into rows: no token is lost
or repeated, long documents continue in the next row (the last target of a row is the first
input of the next, so no prediction is lost either). Task 'classify' puts one document per
row, truncated to T (keeping the final eos) and padded; loss_mask marks its real tokens.
Padding appears only at the end of a finite split (validation, or data.num_epochs > 0);
padding rows of 'classify' have label 0 and an all-zero loss_mask.

Processes: training documents are split into S = data.shard_count logical shards (0 = the
process count); shard s holds every S-th document (prepared, built-in) or unit (files) from s
and packs batch_size/S rows per step; a process opens only its shards' files and ranges.
Process p of P reads only shards p*(S/P) .. (p+1)*(S/P)-1 and stacks their rows in shard order,
so every process count dividing S yields the same global batches (the checkpointed iterator
state holds each shard's position; restore_iterator restores it under another process
count). For validation every process packs the same
global stream and keeps its rows, so every process sees the same number of batches (collective
evaluation needs that); validation is finite, in a fixed order and independent of
data.shuffle_seed, so calling make_pipeline again repeats it exactly. A finite mixture ends
when its first component runs out. data.worker_count applies to training only; validation
always runs in-process.
With data.num_epochs > 0 and several processes, training iterators may end a batch apart;
the train loop stops at train.steps anyway.

Stats: `DataStats` counts documents read, kept per split (and their bytes), held out by
train_fraction, filtered by reason and skipped by reason (with the first message of each).
Get it as `iterator.data_stats`, or `data_stats(cfg, task)`; `stats.summary()` is one line.

CLI: `python -m lm.data {tokenizer,prepare,report,bench,memory}` (see __main__.py).
The tokenizer comes from load_or_train_tokenizer(cfg, workdir) (lm.tokenizer, handed this
config's training texts); for `prepare` the workdir defaults to data.prepared_dir, so the
shards carry the tokenizer that wrote them.

Stages, one module each: sources (what to read), readers (files -> records), units (files
cut for shards and workers), filters (quality), dedup (prepare's corpus-wide dedup), split
(hash rank), stream (streamed records), documents (a small corpus in memory), tokenize (a task:
record -> ids + loss mask), packing, shards (logical data shards and iterator state),
shard_documents (a shard's documents), prepared (reading prepared shards), prepare_job
(writing them), pipeline (make_pipeline), measure (report, bench), scale_bench (`memory`),
__main__ (the CLI).
"""

import importlib

# Names re-exported from the stage modules, imported on first use: `import lm.data` stays
# light (prepare's worker processes and the CLI's error handling need no grain or JAX).
_MODULE_NAMES = {
    'documents': 'class_names data_stats load_documents load_or_train_tokenizer split_components '
                 'tokenizer_cache_key tokenizer_training_texts',
    'measure': 'bench report',
    'packing': 'ClassifyRow PackedBatchIterDataset StackRows TakeRows TokenStream pack_rows',
    'pipeline': 'make_pipeline',
    'prepare_job': 'prepare',
    'prepared': 'prepared_dataset read_prepared_meta',
    'readers': 'expand_paths',
    'shards': 'ShardedBatchesIterDataset merge_iterator_states process_shards restore_iterator',
    'sources': 'Component Record SOURCES TASKS check_data_config components is_builtin_only '
               'source_key',
    'split': 'split_rank',
    'stats': 'DataError DataStats SPLITS',
    'tokenize': 'TokenizeRecord concat_docs decode_prepared encode_prepared task_template '
                'tokenize_records',
}
_EXPORTS = {name: module for module, names in _MODULE_NAMES.items() for name in names.split()}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  value = getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))

"""Replay: a share of every fine-tuning batch drawn from a general source, to limit forgetting.

With finetune.replay = r and a global batch of B rows, each batch holds round((1 - r) * B)
rows of the fine-tuning (domain) data followed by the rest from the replay source, each built
by the data layer's own pipeline (lm.data.make_pipeline: same reading, filtering, packing and
shuffling, per-process shards) with its own batch size. Rows are grouped by logical data shard (data.shard_count, lm.data): for each shard
in order, its domain rows then its replay rows,

    [shard 0: domain | replay][shard 1: domain | replay] ...

so every global batch holds exactly the configured share and, as with plain data, every
process count dividing the shard count sees the same global batches.

The replay source is finetune.replay_data, a data section like cfg.data. Its default
(source '') is the built-in general corpus split exactly as the before/after report's general
evaluation splits it (the main data section's split settings), so replay never trains on the
documents the general loss is measured on. Sequence length and data.shard_count always come
from the main data section.

The iterator's state holds both pipelines' states ({'domain': ..., 'replay': ...}), so the
checkpoint that saves it (lm.checkpoint) resumes both exactly where they were.
"""

from __future__ import annotations

import copy
from typing import Any

import grain
import ml_collections
import numpy as np

from lm import data
from lm.config import ConfigError

REPLAY_TASKS = ('lm', 'sft', 'chat')  # Classification batches hold no next-token rows to mix.


def replay_rows(batch_size: int, share: float) -> tuple[int, int]:
  """(domain rows, replay rows) of a global batch of `batch_size` rows."""
  domain = int(round((1.0 - share) * batch_size))
  return domain, batch_size - domain


def general_data(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The built-in general corpus as a data section, split as cfg.data splits it: the
  before/after report's general loss reads its validation split (lm.finetune), replay its
  training split. The domain's validation files are not the general corpus's."""
  general = copy.deepcopy(cfg.data)
  general.update(source='builtin', builtin_subset='general', paths=(), prepared_dir='',
                 mixture=(), validation_paths=())
  return general


def replay_config(cfg: ml_collections.ConfigDict, rows: int) -> ml_collections.ConfigDict:
  """The run's config with the replay source as its data section and `rows` rows a batch."""
  section = cfg.finetune.replay_data
  if section.source:
    source = copy.deepcopy(section)
  else:
    source = general_data(cfg)
    source.update(train_fraction=1.0, num_epochs=0)  # All its training documents, forever.
  source.update(seq_len=cfg.data.seq_len, shard_count=cfg.data.shard_count, batch_size=rows)
  out = copy.deepcopy(cfg)
  out.data = source
  return out


def check(cfg: ml_collections.ConfigDict, task: str, process_count: int) -> tuple[int, int]:
  """Validates the replay settings against the batch; returns (domain rows, replay rows)."""
  share = cfg.finetune.replay
  if not 0.0 <= share < 1.0:
    raise ConfigError(f'config key finetune.replay: the share of each batch from the replay '
                      f'source must be in [0, 1), got {share}')
  if task not in REPLAY_TASKS:
    raise ConfigError(f"config key finetune.replay: replay mixes next-token rows into the batch; "
                      f"task {task!r} has none (use it with task 'lm', 'sft' or 'chat')")
  domain, replay = replay_rows(cfg.data.batch_size, share)
  shards = cfg.data.shard_count or process_count
  for name, rows in (('domain', domain), ('replay', replay)):
    if rows == 0 or rows % shards:
      raise ConfigError(
          f'config key finetune.replay: {share} of data.batch_size={cfg.data.batch_size} gives '
          f'{domain} domain + {replay} replay rows; each part must be > 0 and a multiple of the '
          f'{shards} data shards (data.shard_count, or the process count) — {name} has {rows}')
  return domain, replay


class ReplayIterator(grain.DatasetIterator):
  """Concatenates each batch of a domain iterator with a batch of a replay iterator, row-wise.

  Not given to grain as parents: the two pipelines keep their own contexts (prefetch threads,
  workers) and this iterator closes both.
  """

  def __init__(self, domain, replay, local_shards: int = 1):
    super().__init__()
    self._domain, self._replay = domain, replay
    self._local_shards = local_shards
    self.data_stats = getattr(domain, 'data_stats', None)
    self.replay_stats = getattr(replay, 'data_stats', None)

  def __next__(self) -> dict[str, np.ndarray]:
    domain = next(self._domain)  # A finite domain split ends the run (data.num_epochs).
    replay = next(self._replay)
    if domain.keys() != replay.keys():
      raise data.DataError(f'replay batches hold {sorted(replay)}, domain batches '
                           f'{sorted(domain)}: the two sources do not mix')
    n = self._local_shards
    return {k: np.concatenate([part for blocks in zip(np.split(domain[k], n),
                                                      np.split(replay[k], n))
                               for part in blocks]) for k in domain}

  def get_state(self) -> dict[str, Any]:
    return {'domain': self._domain.get_state(), 'replay': self._replay.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.keys() != {'domain', 'replay'}:
      raise data.DataError('data iterator state has no replay part (saved by a run without '
                           'finetune.replay, or another share)')
    self._domain.set_state(state['domain'])
    self._replay.set_state(state['replay'])

  def start_prefetch(self) -> None:
    for part in (self._domain, self._replay):
      if hasattr(part, 'start_prefetch'):
        part.start_prefetch()

  def close(self) -> None:
    for part in (self._domain, self._replay):
      if hasattr(part, 'close'):
        part.close()

  def __str__(self) -> str:
    return f'ReplayIterator(domain={self._domain}, replay={self._replay})'


def make_train_iterator(cfg: ml_collections.ConfigDict, tokenizer, *, process_index: int = 0,
                        process_count: int = 1, task: str | None = None):
  """This process's training batches: domain rows, then finetune.replay's share of replay rows."""
  task = task or cfg.finetune.task
  domain_rows, replay_rows_ = check(cfg, task, process_count)
  domain_cfg = copy.deepcopy(cfg)
  domain_cfg.data.batch_size = domain_rows
  domain = data.make_pipeline(domain_cfg, tokenizer, 'train', process_index=process_index,
                              process_count=process_count, task=task)
  try:
    replay = data.make_pipeline(replay_config(cfg, replay_rows_), tokenizer, 'train',
                                process_index=process_index, process_count=process_count,
                                task='lm')
  except data.DataError as e:  # Its messages name data.* keys: say which section they are.
    raise data.DataError(f'finetune.replay_data (the replay source): {e}') from None
  shards = cfg.data.shard_count or process_count
  return ReplayIterator(domain, replay, local_shards=shards // process_count)


def tradeoff(before: dict, after: dict, share: float) -> dict:
  """What fine-tuning bought (domain-loss gain) next to what it cost (general-loss change)."""
  return {'replay': share, 'domain_gain': before['domain_loss'] - after['domain_loss'],
          'general_change': after['general_loss'] - before['general_loss']}


def format_tradeoff(t: dict) -> str:
  return ('| replay share | domain gain (loss before - after) | general-loss change |\n'
          '|---:|---:|---:|\n'
          f"| {t['replay']:.2f} | {t['domain_gain']:+.4f} | {t['general_change']:+.4f} |")

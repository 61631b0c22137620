"""DataError and DataStats: every document read is either kept or counted under a reason."""

from __future__ import annotations

import collections
import dataclasses

from lm.errors import UserError

SPLITS = ('train', 'validation')


class DataError(UserError, ValueError):
  """A user-caused data problem; the one-line message names the file and line, or config key."""


# --------------------------------------------------------------------------- stats


@dataclasses.dataclass
class DataStats:
  """What happened to every document read (nothing is dropped without being counted here)."""

  read: int = 0  # Records read from the sources, before filters.
  kept: dict = dataclasses.field(default_factory=lambda: {s: 0 for s in SPLITS})
  kept_bytes: dict = dataclasses.field(default_factory=lambda: {s: 0 for s in SPLITS})
  held_out: int = 0  # Training documents left unused by data.train_fraction < 1.
  filtered: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skip_examples: dict = dataclasses.field(default_factory=dict)  # Reason -> first message.
  note: str = ''  # E.g. that a streaming pipeline's counts are so far, not final.

  def merge(self, other: 'DataStats') -> 'DataStats':
    merged = DataStats(read=self.read + other.read, held_out=self.held_out + other.held_out,
                       filtered=self.filtered + other.filtered,
                       skipped=self.skipped + other.skipped,
                       skip_examples={**other.skip_examples, **self.skip_examples},
                       note=self.note or other.note)
    for split in SPLITS:
      merged.kept[split] = self.kept[split] + other.kept[split]
      merged.kept_bytes[split] = self.kept_bytes[split] + other.kept_bytes[split]
    return merged

  def add(self, other: 'DataStats') -> None:
    """Adds other's counts into this one, in place (live streaming counts stay shared)."""
    merged = self.merge(other)
    for field in dataclasses.fields(self):
      setattr(self, field.name, getattr(merged, field.name))

  def to_dict(self) -> dict:
    return {'read': self.read, 'kept': dict(self.kept), 'kept_bytes': dict(self.kept_bytes),
            'held_out': self.held_out, 'filtered': dict(self.filtered),
            'skipped': dict(self.skipped), 'skip_examples': dict(self.skip_examples)}

  @classmethod
  def from_dict(cls, d: dict) -> 'DataStats':
    return cls(read=d['read'], kept=dict(d['kept']), kept_bytes=dict(d['kept_bytes']),
               held_out=d['held_out'], filtered=collections.Counter(d['filtered']),
               skipped=collections.Counter(d['skipped']), skip_examples=dict(d['skip_examples']))

  def summary(self) -> str:
    def counts(counter):
      return ', '.join(f'{k} {v}' for k, v in sorted(counter.items())) or 'none'
    line = (f"documents: read {self.read}, train {self.kept['train']} "
            f"({self.kept_bytes['train'] / 1e6:.2f} MB), validation {self.kept['validation']}")
    if self.held_out:
      line += f', held out by train_fraction {self.held_out}'
    line = f'{line}; filtered: {counts(self.filtered)}; skipped: {counts(self.skipped)}'
    return f'{line} ({self.note})' if self.note else line


class OnError:
  """Raises DataError, or counts the problem and skips, as data.on_error says."""

  def __init__(self, policy: str, stats: DataStats):
    self.policy, self.stats = policy, stats

  def __call__(self, reason: str, where, message: str, count: int = 1) -> None:
    """`where` is 'file:line' or a function returning it (a line number may cost a scan)."""
    if self.policy == 'skip':
      self.stats.skipped[reason] += count
      if reason in self.stats.skip_examples:
        return
    text = f'{where() if callable(where) else where}: {message}'
    if self.policy != 'skip':
      raise DataError(f"{text} (set data.on_error='skip' to skip and count such records)")
    self.stats.skip_examples[reason] = text


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

  def merge(self, other: 'DataStats') -> 'DataStats':
    merged = DataStats(read=self.read + other.read, held_out=self.held_out + other.held_out,
                       filtered=self.filtered + other.filtered,
                       skipped=self.skipped + other.skipped,
                       skip_examples={**other.skip_examples, **self.skip_examples})
    for split in SPLITS:
      merged.kept[split] = self.kept[split] + other.kept[split]
      merged.kept_bytes[split] = self.kept_bytes[split] + other.kept_bytes[split]
    return merged

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
    return f'{line}; filtered: {counts(self.filtered)}; skipped: {counts(self.skipped)}'


class OnError:
  """Raises DataError, or counts the problem and skips, as data.on_error says."""

  def __init__(self, policy: str, stats: DataStats):
    self.policy, self.stats = policy, stats

  def __call__(self, reason: str, where: str, message: str, count: int = 1) -> None:
    text = f'{where}: {message}'
    if self.policy != 'skip':
      raise DataError(f"{text} (set data.on_error='skip' to skip and count such records)")
    self.stats.skipped[reason] += count
    self.stats.skip_examples.setdefault(reason, text)


"""Quality filters and de-duplication (exact content hash, MinHash LSH near-duplicates)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from lm.data.sources import Record
from lm.data.stats import DataStats

_NEAR_DEDUP_PERMUTATIONS = 128
_NEAR_DEDUP_SHINGLE = 5  # Words per shingle.
# Control characters other than tab/newline/CR/form feed, DEL, and the replacement character.
_NON_TEXT = re.compile('[\x00-\x08\x0b\x0e-\x1f\x7f\ufffd]')


def filter_text(record: Record) -> str:
  return record.text + record.completion + record.messages


def quality_reason(text: str, d, task: str) -> str | None:
  """Why a document fails the quality filters, or None if it passes."""
  if task == 'lm' and len(text) < d.min_chars:
    return 'too_short'
  if task == 'lm' and len(text) > d.max_chars:
    return 'too_long'
  if text and len(_NON_TEXT.findall(text)) > d.max_nontext_fraction * len(text):
    return 'non_text'
  return None


def content_hash(record: Record) -> bytes:
  parts = (record.text, record.completion, record.label) + ((record.messages,) if record.messages
                                                             else ())  # Other tasks' hashes stay.
  payload = '\x00'.join(parts).encode('utf-8', 'replace')
  return hashlib.blake2b(payload, digest_size=16).digest()


class NearDuplicates:
  """MinHash LSH over word shingles: flags documents too similar to one seen before."""

  def __init__(self, threshold: float):
    import datasketch  # pylint: disable=import-outside-toplevel
    self._datasketch = datasketch
    self._lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=_NEAR_DEDUP_PERMUTATIONS)
    self._count = 0

  def seen(self, text: str) -> bool:
    words = re.findall(r'\w+', text.lower())
    n = _NEAR_DEDUP_SHINGLE
    shingles = {' '.join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}
    minhash = self._datasketch.MinHash(num_perm=_NEAR_DEDUP_PERMUTATIONS)
    minhash.update_batch([s.encode('utf-8') for s in shingles])
    if self._lsh.query(minhash):
      return True
    self._lsh.insert(str(self._count), minhash)
    self._count += 1
    return False


def screen(record: Record, d, task: str, stats: DataStats, seen: set[bytes] | None = None,
           near: NearDuplicates | None = None) -> bytes | None:
  """Counts `record` as read; its content hash if it passes the quality filters and, with
  `seen` (data.dedup) / `near`, de-duplication (the hash joins `seen`); else None, with the
  reason counted in stats.filtered."""
  stats.read += 1
  text = filter_text(record)
  reason = quality_reason(text, d, task)
  digest = content_hash(record)
  if reason is None and seen is not None and d.dedup and digest in seen:
    reason = 'duplicate'
  if reason is None and near is not None and near.seen(text):
    reason = 'near_duplicate'
  if reason is not None:
    stats.filtered[reason] += 1
    return None
  if seen is not None:
    seen.add(digest)
  return digest


def filter_records(records: Iterable[Record], d, task: str, stats: DataStats) -> list[Record]:
  """Applies quality filters and de-duplication, in source order; fills group from content."""
  seen, near, kept = set(), (NearDuplicates(d.near_dedup_threshold) if d.near_dedup else None), []
  for record in records:
    digest = screen(record, d, task, stats, seen, near)
    if digest is not None:
      kept.append(record if record.group else record._replace(group=digest.hex()))
  return kept


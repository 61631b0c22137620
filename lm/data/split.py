"""The split: hash(group) in [0, 1) decides train or validation, and the order within a split."""

from __future__ import annotations

import hashlib


def split_rank(group: str) -> float:
  """hash(group) in [0, 1): decides the split and the order of documents."""
  digest = hashlib.blake2b(group.encode('utf-8'), digest_size=8).digest()
  return int.from_bytes(digest, 'big') / 2.0**64


def fraction_count(n: int, fraction: float) -> int:
  return n if fraction >= 1.0 else min(n, max(1, round(fraction * n))) if n else 0

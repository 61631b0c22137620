"""Corpus-wide de-duplication for `prepare`, in memory that does not grow with the corpus.

Exact: every unit writes its documents' 16-byte content hashes sorted by bucket
(hash mod data.dedup_buckets) with the bucket offsets. The merge step then loads one bucket at
a time from every unit (a memory-mapped slice each), sorts it by (hash, unit, document) and
drops every occurrence after the first: the same documents an in-memory pass over the corpus in
source order drops. Peak memory: ~24 bytes x documents / buckets, plus 8 bytes per duplicate.

Near (MinHash LSH, data.near_dedup): units store each document's MinHash signature; the merge
step walks the units in source order through one in-memory LSH index, which costs about 1 KB
per document. That index cannot be split into buckets (similar documents hash anywhere), so
a corpus of more than data.near_dedup_max_docs documents is refused with an error.
"""

from __future__ import annotations

import re

from etils import epath
import numpy as np

from lm.data.stats import DataError

NEAR_PERMUTATIONS = 128
_NEAR_SHINGLE = 5  # Words per shingle.
HASH_DTYPE = np.dtype([('hash', 'V16'), ('doc', '<i4')])


def bucket_of(digests: np.ndarray, buckets: int) -> np.ndarray:
  """Bucket of each 16-byte digest (an array of HASH_DTYPE['hash'])."""
  return np.frombuffer(digests.tobytes(), '<u8').reshape(-1, 2)[:, 0] % np.uint64(buckets)


def write_hashes(path: epath.Path, digests: list[bytes], buckets: int) -> list[int]:
  """Saves (hash, doc index) sorted by bucket; returns the bucket offsets (buckets + 1)."""
  entries = np.zeros(len(digests), HASH_DTYPE)
  if digests:
    entries['hash'] = np.frombuffer(b''.join(digests), 'V16')
    entries['doc'] = np.arange(len(digests))
  which = bucket_of(entries['hash'], buckets) if digests else np.zeros(0, np.uint64)
  order = np.argsort(which, kind='stable')
  with path.open('wb') as f:
    np.save(f, entries[order])
  return np.searchsorted(which[order], np.arange(buckets + 1)).tolist()


def exact_duplicates(hash_files: list[epath.Path], offsets: list[list[int]],
                     buckets: int) -> dict[int, np.ndarray]:
  """unit index -> sorted document indices that repeat an earlier document (source order)."""
  dropped: dict[int, list[np.ndarray]] = {}
  tables = [np.load(f, mmap_mode='r') for f in hash_files]
  for bucket in range(buckets):
    parts = [(u, t[o[bucket]:o[bucket + 1]]) for u, (t, o) in enumerate(zip(tables, offsets))]
    parts = [(u, p) for u, p in parts if len(p)]
    if not parts:
      continue
    digests = np.concatenate([np.asarray(p['hash']) for _, p in parts])
    docs = np.concatenate([np.asarray(p['doc']) for _, p in parts])
    units = np.concatenate([np.full(len(p), u, np.int32) for u, p in parts])
    words = np.frombuffer(digests.tobytes(), '<u8').reshape(-1, 2)
    order = np.lexsort((docs, units, words[:, 1], words[:, 0]))
    words = words[order]
    repeat = np.zeros(len(order), bool)
    repeat[1:] = (words[1:] == words[:-1]).all(axis=1)
    for unit in np.unique(units[order][repeat]):
      dropped.setdefault(int(unit), []).append(docs[order][repeat & (units[order] == unit)])
  return {u: np.sort(np.concatenate(d)) for u, d in dropped.items()}


def minhash_signature(text: str) -> np.ndarray:
  import datasketch  # pylint: disable=import-outside-toplevel
  words = re.findall(r'\w+', text.lower())
  n = _NEAR_SHINGLE
  shingles = {' '.join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}
  minhash = datasketch.MinHash(num_perm=NEAR_PERMUTATIONS)
  minhash.update_batch([s.encode('utf-8') for s in shingles])
  return minhash.hashvalues.astype(np.uint64)


def near_duplicates(signature_files: list[epath.Path], exact: dict[int, np.ndarray],
                    threshold: float, max_docs: int, total_docs: int) -> dict[int, np.ndarray]:
  """unit index -> document indices too similar to an earlier kept document."""
  import datasketch  # pylint: disable=import-outside-toplevel
  if total_docs > max_docs:
    raise DataError(f'config key data.near_dedup_max_docs: near de-duplication keeps a MinHash '
                    f'index in memory (~1 KB per document) and this corpus has {total_docs:,} '
                    f'documents > {max_docs:,}; raise the limit if the memory is there, or set '
                    'data.near_dedup=False (exact de-duplication has no limit)')
  lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=NEAR_PERMUTATIONS)
  dropped, count = {}, 0
  for unit, path in enumerate(signature_files):
    signatures = np.load(path)
    skip = set(exact.get(unit, np.zeros(0, np.int64)).tolist())
    near = []
    for doc, values in enumerate(signatures):
      if doc in skip:
        continue
      minhash = datasketch.MinHash(num_perm=NEAR_PERMUTATIONS, hashvalues=values)
      if lsh.query(minhash):
        near.append(doc)
        continue
      lsh.insert(str(count), minhash)
      count += 1
    if near:
      dropped[unit] = np.asarray(near, np.int64)
  return dropped

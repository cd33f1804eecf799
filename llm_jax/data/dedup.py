"""Deduplication: exact (content hash) and near-duplicate (MinHash LSH over word 5-gram shingles)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
from datasketch import MinHash, MinHashLSH

SHINGLE_WORDS = 5
SEED = 1
SCHEME = "affine32"


def minhash(text: str, num_perm: int) -> np.ndarray:
  """MinHash signature [num_perm] of a text's lower-cased word 5-grams."""
  words = text.lower().split()
  n = max(1, len(words) - SHINGLE_WORDS + 1)
  shingles = {" ".join(words[i : i + SHINGLE_WORDS]).encode("utf-8") for i in range(n)}
  m = MinHash(num_perm=num_perm, seed=SEED, hashfunc=zlib.crc32, scheme=SCHEME)
  m.update_batch(shingles)
  return m.hashvalues


def exact_duplicates(keys: Sequence[str]) -> list[int]:
  """Indices of items whose key appeared earlier in the sequence."""
  seen, dups = set(), []
  for i, k in enumerate(keys):
    if k in seen:
      dups.append(i)
    else:
      seen.add(k)
  return dups


def near_duplicates(signatures: Sequence[np.ndarray], threshold: float, num_perm: int) -> dict[int, int]:
  """{index: earlier index it nearly copies}; earlier items win (put validation documents first)."""
  if threshold <= 0 or not signatures:
    return {}
  # Recall-heavy banding: candidates are confirmed by their estimated Jaccard below, so false positives
  # cost only a comparison while false negatives would leave duplicates in.
  lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.05, 0.95))
  found = {}
  for i, hv in enumerate(signatures):
    m = MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME, hashvalues=hv)
    for j in lsh.query(m):
      other = MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME, hashvalues=signatures[j])
      if other.jaccard(m) >= threshold:
        found[i] = j
        break
    else:
      lsh.insert(i, m)
  return found

"""Windows over the packed token stream (seq_len + 1 tokens, stride seq_len, optionally offset per
epoch), data.mixture weights, and the endless seeded epochs of window positions the loader reads."""

from __future__ import annotations

import bisect
import collections
import hashlib
import sys
import threading

import grain
import grain.experimental
import numpy as np

from llm_jax.data import manifest as manifest_lib
from llm_jax.data.errors import DataError
from llm_jax.data.shards import Shard, open_split, separator_ids

_SHUFFLE_ROUNDS = 4  # as grain's MapDataset.shuffle


class Windows:
  """Windows of L + 1 tokens, stride L, inside each shard of a split, on a grid shifted by an offset.

  A window is named by its start position in the split's stream (the shards concatenated in order). On
  the grid at offset o, shard k holds the windows starting at o, o + L, o + 2L, ... that fit in it, so
  targets never overlap and windows never cross shards.
  """

  def __init__(self, prepared_dir: str, split: str, seq_len: int):
    self.manifest = manifest_lib.load(prepared_dir)
    self.shards: list[Shard] = open_split(prepared_dir, split, self.manifest)
    self.eos_id = separator_ids(self.manifest)[0]  # the document separator the shards were written with
    self.seq_len = int(seq_len)
    if self.seq_len <= 0:
      raise DataError(f"seq_len={seq_len} must be positive (train.seq_len)")
    self.lengths = np.array([len(s.tokens) for s in self.shards], np.int64)
    self.bases = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
    self._bases = self.bases.tolist()
    self._cum: dict[int, list[int]] = {}
    self.size = self.count(0)
    if self.size == 0:
      raise DataError(
        f"{prepared_dir}: split {split!r} has {int(self.lengths.sum())} tokens, not enough for "
        f"one window of seq_len+1={self.seq_len + 1}; lower train.seq_len or add data"
      )
    # Offsets run over [0, L): offset L is offset 0 without its first window. Above max_offset no window fits.
    self.max_offset = int(min(self.seq_len - 1, self.lengths.max() - 1 - self.seq_len))
    self._arange = np.arange(self.seq_len + 1, dtype=np.int64)
    self._by_domain: collections.OrderedDict[int, list[np.ndarray]] = collections.OrderedDict()
    self._domain_counts: dict[int, list[int]] = {}
    self._lock = threading.Lock()

  def per_shard(self, offset: int = 0) -> np.ndarray:
    """[shards] windows of each shard on the grid at `offset`."""
    return np.maximum(0, (self.lengths - 1 - offset) // self.seq_len)

  def count(self, offset: int = 0) -> int:
    """Windows of the split on the grid at `offset`."""
    return int(self._cumulative(offset)[-1])

  def _cumulative(self, offset: int) -> list[int]:
    cum = self._cum.get(offset)
    if cum is None:
      cum = self._cum[offset] = np.cumsum(self.per_shard(offset)).tolist()
    return cum

  def position(self, k: int, offset: int = 0) -> int:
    """Stream position of window k (0 <= k < count(offset)) of the grid at `offset`."""
    cum = self._cumulative(offset)
    s = bisect.bisect_right(cum, k)
    before = cum[s - 1] if s else 0
    return self._bases[s] + offset + (k - before) * self.seq_len

  def positions(self, ids: np.ndarray, offset: int = 0) -> np.ndarray:
    """[n] stream positions of window numbers `ids` of the grid at `offset`."""
    ids = np.asarray(ids, np.int64)
    cum = np.asarray(self._cumulative(offset), np.int64)
    s = np.searchsorted(cum, ids, side="right")
    before = cum[s] - self.per_shard(offset)[s]
    return self.bases[s] + offset + (ids - before) * self.seq_len

  def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shard index, start token in the shard) of stream positions."""
    positions = np.asarray(positions, np.int64)
    shard = np.searchsorted(self.bases, positions, side="right") - 1
    return shard, positions - self.bases[shard]

  def first_domains(self, positions: np.ndarray) -> np.ndarray:
    """[n] domain id of the first target token of the windows at `positions`."""
    shard_idx, starts = self.locate(positions)
    out = np.empty(len(starts), np.int64)
    for k in np.unique(shard_idx):
      rows = shard_idx == k
      sh = self.shards[k]
      out[rows] = sh.domains[np.searchsorted(sh.offsets, starts[rows] + 1, side="right") - 1]
    return out

  def domain_counts(self, offset: int) -> list[int]:
    """Windows per domain id (by first target token) on the grid at `offset`."""
    counts = self._domain_counts.get(offset)
    if counts is None:
      counts = self._domain_counts[offset] = [len(p) for p in self.domain_positions(offset)]
    return counts

  def domain_positions(self, offset: int) -> list[np.ndarray]:
    """Per domain id, the positions of the windows whose first target is in that domain (grid at `offset`)."""
    with self._lock:
      cached = self._by_domain.get(offset)
      if cached is not None:
        self._by_domain.move_to_end(offset)
        return cached
    pos = self.positions(np.arange(self.count(offset)), offset)
    first = self.first_domains(pos)
    cached = [pos[first == d] for d in range(len(self.manifest["domains"]))]
    with self._lock:
      self._by_domain[offset] = cached
      while len(self._by_domain) > 2 * len(self.manifest["domains"]) + 2:  # streams use one or two each
        self._by_domain.popitem(last=False)
    return cached

  def gather(self, positions: np.ndarray, segment_windows: bool) -> dict[str, np.ndarray]:
    """The batch of windows at `positions` [b]: inputs, targets, domain_ids (of targets) [b, L] int32
    (+ segment_ids)."""
    shard_idx, starts = self.locate(positions)
    L = self.seq_len
    if len(self.shards) == 1:  # the common case: one fancy-indexing gather, no grouping
      sh = self.shards[0]
      win = sh.tokens[starts[:, None] + self._arange].astype(np.int32)
      start_doc = np.searchsorted(sh.offsets, starts, side="right") - 1
      eos_seen = np.cumsum(win[:, :L] == self.eos_id, axis=1, dtype=np.int32)  # EOS among inputs [0..j]
      domain_ids = sh.domains[start_doc[:, None] + eos_seen]  # domain of target j (token j + 1)
    else:
      win = np.empty((len(starts), L + 1), np.int32)
      start_doc = np.empty(len(starts), np.int64)
      groups = []
      for k in np.unique(shard_idx):
        rows = np.nonzero(shard_idx == k)[0]
        sh = self.shards[k]
        win[rows] = sh.tokens[starts[rows, None] + self._arange]
        start_doc[rows] = np.searchsorted(sh.offsets, starts[rows], side="right") - 1
        groups.append((rows, sh.domains))
      eos_seen = np.cumsum(win[:, :L] == self.eos_id, axis=1, dtype=np.int32)
      doc = start_doc[:, None] + eos_seen
      domain_ids = np.empty((len(starts), L), np.int32)
      for rows, doms in groups:
        domain_ids[rows] = doms[doc[rows]]
    out = {"inputs": win[:, :L], "targets": win[:, 1:], "domain_ids": domain_ids}
    if segment_windows:
      # EOS opens the next segment (it acts as BOS), so no position attends across a document boundary.
      out["segment_ids"] = eos_seen - eos_seen[:, :1] + 1
    return out


def parse_mixture(spec: str, domains: list[str]) -> dict[str, float]:
  """'docs=0.3,code=0.7' -> {name: weight}; names must be domains of the prepared data."""
  weights = {}
  for part in [p.strip() for p in spec.split(",") if p.strip()]:
    name, sep, value = part.partition("=")
    try:
      w = float(value)
    except ValueError:
      w = -1.0
    if not sep or w < 0:
      raise DataError(f"data.mixture={spec!r}: {part!r} must look like domain=weight with weight >= 0")
    if name.strip() not in domains:
      raise DataError(f"data.mixture={spec!r}: unknown domain {name.strip()!r}; domains are {domains}")
    weights[name.strip()] = w
  if weights and sum(weights.values()) <= 0:
    raise DataError(f"data.mixture={spec!r}: the weights sum to 0")
  return weights


def _draw(seed: int, salt: int, epoch: int) -> tuple[int, int]:
  """Two 32-bit numbers that depend only on (seed, salt, epoch): the grid offset draw and the shuffle seed."""
  digest = hashlib.blake2b(f"{seed},{salt},{epoch}".encode(), digest_size=8).digest()
  return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


class ShiftedEpochs(grain.MapDataset):
  """Window positions, epoch after epoch without end: epoch e is a seeded permutation of the windows on the
  grid at offset o_e (of one domain, for mixtures); o_e and the permutation depend on (seed, salt, e) only.

  Epochs differ in size by the windows that do not fit at their offset; the first index of every epoch
  is found by adding up the sizes of the epochs before it (computed once, when first needed).
  """

  def __init__(self, windows: Windows, seed: int, salt: int, domain: int | None = None):
    super().__init__()
    self._windows, self._seed, self._salt, self._domain = windows, int(seed), int(salt), domain
    self._starts = [0]  # first index of each epoch added so far, then of the next one
    self._offsets: list[int] = []
    self._seeds: list[int] = []
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"ShiftedEpochs(salt={self._salt}, domain={self._domain})"

  def _size(self, offset: int) -> int:
    if self._domain is None:
      return self._windows.count(offset)
    return self._windows.domain_counts(offset)[self._domain]

  def _grow(self, index: int) -> None:
    with self._lock:
      while index >= self._starts[-1]:
        draw, shuffle_seed = _draw(self._seed, self._salt, len(self._offsets))
        offset = draw % (self._windows.max_offset + 1)
        self._offsets.append(offset)
        self._seeds.append(shuffle_seed)
        self._starts.append(self._starts[-1] + self._size(offset))  # last: readers check it first

  def offset(self, epoch: int) -> int:
    """Grid offset of `epoch`."""
    while epoch >= len(self._offsets):
      self._grow(self._starts[-1])
    return self._offsets[epoch]

  def first_index(self, epoch: int) -> int:
    """Index of the first window of `epoch` in the stream."""
    self.offset(epoch)
    return self._starts[epoch]

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    if index >= self._starts[-1]:
      self._grow(index)
    epoch = bisect.bisect_right(self._starts, index) - 1  # an empty epoch shares its start with the next
    offset, start = self._offsets[epoch], self._starts[epoch]
    size = self._starts[epoch + 1] - start
    k = grain.experimental.index_shuffle(
      index - start, max_index=size - 1, seed=self._seeds[epoch], rounds=_SHUFFLE_ROUNDS
    )
    if self._domain is None:
      return self._windows.position(k, offset)
    return int(self._windows.domain_positions(offset)[self._domain][k])

"""Batches from prepared shards: a Grain MapDataset of fixed windows (seq_len + 1 tokens) over the packed
stream, globally shuffled by seed and reshuffled every epoch; evaluation windows in order.

The global batch at step s is rows [s*G, (s+1)*G) of the shuffled, repeated window sequence, so it depends
only on (data, seed, step); process p of n reads rows [p*b, (p+1)*b) of it, b = G / n.
"""
from __future__ import annotations

import os
from typing import Iterator

import grain
import numpy as np

from llm_jax.data import manifest as manifest_lib
from llm_jax.data.errors import DataError
from llm_jax.data.shards import Shard, open_split
from llm_jax.data.tokenizer import EOS_ID, PAD_ID

_STATE_KEYS = ("split", "seq_len", "global_batch_size", "seed", "segment_windows", "mixture", "data_key")


class Windows:
  """Fixed windows of L + 1 tokens, stride L, within each shard of a split (targets never overlap)."""

  def __init__(self, prepared_dir: str, split: str, seq_len: int):
    self.manifest = manifest_lib.load(prepared_dir)
    self.shards: list[Shard] = open_split(prepared_dir, split, self.manifest)
    self.seq_len = int(seq_len)
    if self.seq_len <= 0:
      raise DataError(f"seq_len={seq_len} must be positive (train.seq_len)")
    self.per_shard = np.array([max(0, (len(s.tokens) - 1) // self.seq_len) for s in self.shards], np.int64)
    self.cum = np.cumsum(self.per_shard)
    self.size = int(self.cum[-1])
    if self.size == 0:
      tokens = sum(len(s.tokens) for s in self.shards)
      raise DataError(f"{prepared_dir}: split {split!r} has {tokens} tokens, not enough for one window of "
                      f"seq_len+1={self.seq_len + 1}; lower train.seq_len or add data")
    self._arange = np.arange(self.seq_len + 1, dtype=np.int64)

  def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shard index, start token) of window ids."""
    shard = np.searchsorted(self.cum, ids, side="right")
    before = self.cum[shard] - self.per_shard[shard]
    return shard, (ids - before) * self.seq_len

  def first_domain(self) -> np.ndarray:
    """[size] domain id of each window's first target token (for mixtures)."""
    out = []
    for s, n in zip(self.shards, self.per_shard):
      starts = np.arange(n, dtype=np.int64) * self.seq_len + 1
      out.append(s.domains[np.searchsorted(s.offsets, starts, side="right") - 1])
    return np.concatenate(out).astype(np.int64)

  def gather(self, ids: np.ndarray, segment_windows: bool) -> dict[str, np.ndarray]:
    """The batch of window ids [b]: inputs, targets, domain_ids (of targets) [b, L] int32 (+ segment_ids)."""
    ids = np.asarray(ids, np.int64)
    shard_idx, starts = self.locate(ids)
    L = self.seq_len
    if len(self.shards) == 1:  # the common case: one fancy-indexing gather, no grouping
      sh = self.shards[0]
      win = sh.tokens[starts[:, None] + self._arange].astype(np.int32)
      start_doc = np.searchsorted(sh.offsets, starts, side="right") - 1
      eos_seen = np.cumsum(win[:, :L] == EOS_ID, axis=1, dtype=np.int32)  # EOS among inputs [0..j]
      domain_ids = sh.domains[start_doc[:, None] + eos_seen]  # domain of target j (token j + 1)
    else:
      win = np.empty((len(ids), L + 1), np.int32)
      start_doc = np.empty(len(ids), np.int64)
      groups = []
      for k in np.unique(shard_idx):
        rows = np.nonzero(shard_idx == k)[0]
        sh = self.shards[k]
        win[rows] = sh.tokens[starts[rows, None] + self._arange]
        start_doc[rows] = np.searchsorted(sh.offsets, starts[rows], side="right") - 1
        groups.append((rows, sh.domains))
      eos_seen = np.cumsum(win[:, :L] == EOS_ID, axis=1, dtype=np.int32)
      doc = start_doc[:, None] + eos_seen
      domain_ids = np.empty((len(ids), L), np.int32)
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


class TrainLoader:
  """Deterministic, resumable training batches; `batch_at(step)` is this process's rows of global batch `step`."""

  def __init__(self, prepared_dir: str, split: str, seq_len: int, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1, segment_windows: bool = False,
               mixture: str = ""):
    if process_count < 1 or not 0 <= process_index < process_count:
      raise DataError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
      raise DataError(f"train.global_batch_size={global_batch_size} must be a positive multiple of the "
                      f"process count {process_count}")
    self.windows = Windows(prepared_dir, split, seq_len)
    self.split, self.seq_len, self.seed = split, int(seq_len), int(seed)
    self.global_batch_size = int(global_batch_size)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.local_batch_size = self.global_batch_size // self.process_count
    self.segment_windows, self.mixture = bool(segment_windows), mixture
    self.data_key = self.windows.manifest["key"]
    self.step = 0
    self.dataset = self._pipeline()

  def _shuffled(self, ds: grain.MapDataset, salt: int) -> grain.MapDataset:
    return ds.shuffle(seed=(self.seed * 1_000_003 + salt) % (1 << 32)).repeat()

  def _pipeline(self) -> grain.MapDataset:
    """range(windows) -> shuffle(seed), reshuffled every epoch -> (mixture) -> this process's batches."""
    if self.mixture:
      domains = self.windows.manifest["domains"]
      weights = parse_mixture(self.mixture, domains)
      first = self.windows.first_domain()
      parts, ws = [], []
      for name, w in sorted(weights.items()):
        ids = np.nonzero(first == domains.index(name))[0]
        if w > 0 and len(ids):
          parts.append(self._shuffled(grain.MapDataset.source(ids), 1 + domains.index(name)))
          ws.append(w)
        elif w > 0:
          raise DataError(f"data.mixture: domain {name!r} has no windows in split {self.split!r}")
      windows = grain.MapDataset.mix(parts, ws)
    else:
      windows = self._shuffled(grain.MapDataset.range(self.windows.size), 0)
    # Element k of `rows` is window ids [k*b, (k+1)*b); global batch s holds rows s*n .. s*n + n - 1,
    # so this process's batch s is element s*n + p.
    rows = windows.batch(self.local_batch_size, batch_fn=lambda ids: np.asarray(ids, np.int64))
    self.window_ids = rows[self.process_index::self.process_count]  # [b] window ids of each step
    return self.window_ids.map(lambda ids: self.windows.gather(ids, self.segment_windows))

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch at `step`."""
    return self.dataset[int(step)]

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch_at(self.step)
    self.step += 1
    return batch

  def get_state(self) -> dict:
    """JSON-able iterator state: the next step and what the stream depends on."""
    return {"step": self.step, **{k: getattr(self, k) for k in _STATE_KEYS}}

  def set_state(self, state: dict) -> None:
    """Continues from a saved state; a state from a different stream is refused, naming the field."""
    for k in _STATE_KEYS:
      if k in state and state[k] != getattr(self, k):
        raise DataError(f"loader state field {k!r} is {state[k]!r} but this loader has "
                        f"{getattr(self, k)!r}; the checkpoint was made with different data or settings")
    self.step = int(state["step"])

  @property
  def epoch(self) -> float:
    """Windows served so far over the windows in the split."""
    return self.step * self.global_batch_size / self.windows.size


def eval_batches(prepared_dir: str, split: str, seq_len: int, batch_size: int, max_batches: int | None = None,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """In-order, non-overlapping windows covering every token of a split once as a target.

  batch_size is global: process p gets rows [p*b, (p+1)*b), b = batch_size / process_count. Every process
  yields the same number of batches; padding rows and the tail of the last window have weights 0.
  """
  if batch_size <= 0 or batch_size % process_count or not 0 <= process_index < process_count:
    raise DataError(f"eval batch_size={batch_size} must be a positive multiple of process_count="
                    f"{process_count} and process_index={process_index} in range")
  L = int(seq_len)
  manifest = manifest_lib.load(prepared_dir)
  shards = open_split(prepared_dir, split, manifest)
  spans = [(k, s) for k, sh in enumerate(shards) for s in range(0, len(sh.tokens) - 1, L)]
  n_batches = -(-len(spans) // batch_size)
  if max_batches is not None:
    n_batches = min(n_batches, int(max_batches))
  b = batch_size // process_count
  for i in range(n_batches):
    lo = i * batch_size + process_index * b
    win = np.full((b, L + 1), PAD_ID, np.int32)
    valid = np.zeros((b, L + 1), bool)
    dom = np.zeros((b, L), np.int32)
    for r, (k, start) in enumerate(spans[lo:lo + b]):
      sh = shards[k]
      n = min(L + 1, len(sh.tokens) - start)
      win[r, :n] = sh.tokens[start:start + n]
      valid[r, :n] = True
      pos = start + 1 + np.arange(L)
      doc = np.clip(np.searchsorted(sh.offsets, pos, side="right") - 1, 0, len(sh.domains) - 1)
      dom[r] = np.where(valid[r, 1:], sh.domains[doc], 0)
    yield {"inputs": win[:, :L], "targets": win[:, 1:], "domain_ids": dom,
           "weights": valid[:, 1:].astype(np.float32)}

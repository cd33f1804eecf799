"""Batches from prepared shards: a Grain MapDataset of windows (seq_len + 1 tokens, stride seq_len) over
the packed stream, globally shuffled by seed and reshuffled every epoch; evaluation windows in order.

With window offsets (the default) the grid of windows is shifted every epoch by an offset in
[0, seq_len) drawn from (seed, epoch), so an epoch's windows are not the previous epoch's in another
order. The global batch at step s is rows [s*G, (s+1)*G) of the window sequence, so it depends only on
(data, seed, step); process p of n reads rows [p*b, (p+1)*b) of it, b = G / n.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import grain.experimental
import numpy as np

from llm_jax.data import manifest as manifest_lib
from llm_jax.data.errors import DataError
from llm_jax.data.shards import open_split, separator_ids
from llm_jax.data.windows import ShiftedEpochs, Windows, parse_mixture

_STATE_KEYS = (
  "split",
  "seq_len",
  "global_batch_size",
  "seed",
  "segment_windows",
  "mixture",
  "window_offsets",
  "data_key",
)

# The config key behind each state field (the resume error names it).
_CONFIG_KEYS = {
  "seq_len": "train.seq_len",
  "global_batch_size": "train.global_batch_size",
  "seed": "data.seed",
  "segment_windows": "data.segment_windows",
  "mixture": "data.mixture",
  "window_offsets": "data.window_offsets",
}


class StepLoader:
  """The iterator protocol of step-indexed loaders: `batch_at(step)`, `next()`, get/set_state.

  Subclasses set `dataset` (a Grain MapDataset whose element s is this process's batch at step s),
  `step`, and `state_keys` (the attributes that identify the stream, saved with the state).
  """

  state_keys: tuple[str, ...] = ()
  dataset: grain.MapDataset
  step: int = 0

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
    return {"step": self.step, **{k: getattr(self, k) for k in self.state_keys}}

  def set_state(self, state: dict) -> None:
    """Continues from a saved state; a state from a different stream is refused, naming the field."""
    state = self._upgrade_state(dict(state))
    for k in self.state_keys:
      if k in state and state[k] != getattr(self, k):
        raise self._mismatch(k, state[k])
    self.step = int(state["step"])

  def _upgrade_state(self, state: dict) -> dict:
    return state

  def _mismatch(self, key: str, saved) -> Exception:
    setting = _CONFIG_KEYS.get(key)
    hint = f"; resume with {setting}={saved!r}, or use a new --workdir" if setting else ""
    return DataError(
      f"loader state field {key!r} is {saved!r} but this loader has "
      f"{getattr(self, key)!r}; the checkpoint was made with different data or settings{hint}"
    )


class TrainLoader(StepLoader):
  """Deterministic, resumable training batches. `batch_at(step)`: this process's rows of global batch step."""

  state_keys = _STATE_KEYS

  def __init__(
    self,
    prepared_dir: str,
    split: str,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    segment_windows: bool = False,
    mixture: str = "",
    window_offsets: bool = True,
  ):
    if process_count < 1 or not 0 <= process_index < process_count:
      raise DataError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
      raise DataError(
        f"train.global_batch_size={global_batch_size} must be a positive multiple of the "
        f"process count {process_count}"
      )
    self.windows = Windows(prepared_dir, split, seq_len)
    self.split, self.seq_len, self.seed = split, int(seq_len), int(seed)
    self.global_batch_size = int(global_batch_size)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.local_batch_size = self.global_batch_size // self.process_count
    self.segment_windows, self.mixture = bool(segment_windows), mixture
    self.window_offsets = bool(window_offsets)
    self.data_key = self.windows.manifest["key"]
    self.step = 0
    self.epochs: ShiftedEpochs | None = None  # the window stream, when window offsets and no mixture
    self.dataset = self._pipeline()

  def _shuffled(self, ds: grain.MapDataset, salt: int) -> grain.MapDataset:
    return ds.shuffle(seed=(self.seed * 1_000_003 + salt) % (1 << 32)).repeat()

  def _domain_streams(self) -> grain.MapDataset:
    """One window stream per domain named in the mixture, mixed in its proportions."""
    domains = self.windows.manifest["domains"]
    weights = parse_mixture(self.mixture, domains)
    first = (
      None
      if self.window_offsets
      else self.windows.first_domains(self.windows.positions(np.arange(self.windows.size)))
    )
    parts, ws = [], []
    for name, w in sorted(weights.items()):
      d = domains.index(name)
      n = self.windows.domain_counts(0)[d] if self.window_offsets else int((first == d).sum())
      if w > 0 and not n:
        raise DataError(f"data.mixture: domain {name!r} has no windows in split {self.split!r}")
      if w > 0 and self.window_offsets:
        parts.append(ShiftedEpochs(self.windows, self.seed, 1 + d, domain=d))
      elif w > 0:
        parts.append(self._shuffled(grain.MapDataset.source(np.nonzero(first == d)[0]), 1 + d))
      if w > 0:
        ws.append(w)
    return grain.MapDataset.mix(parts, ws)

  def _pipeline(self) -> grain.MapDataset:
    """Window stream (shifted grid per epoch, or the fixed grid: range(windows) -> shuffle(seed) ->
    repeat, reshuffled every epoch) -> (mixture) -> this process's batches -> gather."""
    if self.mixture:
      windows = self._domain_streams()
    elif self.window_offsets:
      windows = self.epochs = ShiftedEpochs(self.windows, self.seed, 0)
    else:
      windows = self._shuffled(grain.MapDataset.range(self.windows.size), 0)
    if self.window_offsets:
      to_positions = lambda items: np.asarray(items, np.int64)
    else:  # fixed-grid window numbers -> positions
      to_positions = lambda items: self.windows.positions(np.asarray(items, np.int64))
    # Element k of `rows` is windows [k*b, (k+1)*b); global batch s holds rows s*n .. s*n + n - 1,
    # so this process's batch s is element s*n + p.
    rows = windows.batch(self.local_batch_size, batch_fn=to_positions)
    self.window_ids = rows[self.process_index :: self.process_count]  # [b] window positions of each step
    return self.window_ids.map(lambda pos: self.windows.gather(pos, self.segment_windows))

  def _upgrade_state(self, state: dict) -> dict:
    return {"window_offsets": False, **state}  # states saved before window offsets used the fixed grid

  @property
  def epoch(self) -> float:
    """Windows served so far over the windows in the split (on the unshifted grid)."""
    return self.step * self.global_batch_size / self.windows.size


def eval_batches(
  prepared_dir: str,
  split: str,
  seq_len: int,
  batch_size: int,
  max_batches: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """In-order, non-overlapping windows covering every token of a split once as a target.

  batch_size is global: process p gets rows [p*b, (p+1)*b), b = batch_size / process_count. Every process
  yields the same number of batches; padding rows and the tail of the last window have weights 0.
  """
  if batch_size <= 0 or batch_size % process_count or not 0 <= process_index < process_count:
    raise DataError(
      f"eval batch_size={batch_size} must be a positive multiple of process_count="
      f"{process_count} and process_index={process_index} in range"
    )
  L = int(seq_len)
  manifest = manifest_lib.load(prepared_dir)
  shards = open_split(prepared_dir, split, manifest)
  pad_id = separator_ids(manifest)[1]
  spans = [(k, s) for k, sh in enumerate(shards) for s in range(0, len(sh.tokens) - 1, L)]
  n_batches = -(-len(spans) // batch_size)
  if max_batches is not None:
    n_batches = min(n_batches, int(max_batches))
  b = batch_size // process_count
  for i in range(n_batches):
    lo = i * batch_size + process_index * b
    win = np.full((b, L + 1), pad_id, np.int32)
    valid = np.zeros((b, L + 1), bool)
    dom = np.zeros((b, L), np.int32)
    for r, (k, start) in enumerate(spans[lo : lo + b]):
      sh = shards[k]
      n = min(L + 1, len(sh.tokens) - start)
      win[r, :n] = sh.tokens[start : start + n]
      valid[r, :n] = True
      pos = start + 1 + np.arange(L)
      doc = np.clip(np.searchsorted(sh.offsets, pos, side="right") - 1, 0, len(sh.domains) - 1)
      dom[r] = np.where(valid[r, 1:], sh.domains[doc], 0)
    yield {
      "inputs": win[:, :L],
      "targets": win[:, 1:],
      "domain_ids": dom,
      "weights": valid[:, 1:].astype(np.float32),
    }

"""The engine's rows: the shapes its programs are built for (cache spans, prompt widths and counts,
row buckets) and the work that places requests in rows (batched admission under a per-iteration
prefill budget; the busy rows kept compacted at the bottom of the state). A mixin of `Engine`."""

from __future__ import annotations

import logging
import time

import jax
import numpy as np

from llm_jax import generate as G
from llm_jax.serve.prefill import pack_admission

log = logging.getLogger("llm_jax.serve.engine")
PREFILL_TOKENS = 1024  # prompt tokens (padded) prefilled per iteration, at least one prompt


class Rows:
  """Program shapes, admission and compaction of `Engine` (which holds the state they use)."""

  def spans(self) -> list[int]:
    """Every cache span a decode chunk may be compiled for (0: the whole cache)."""
    return sorted(
      {G.decode_span(p, self.cfg) for p in range(self.cfg.max_seq_len)},
      key=lambda s: s or self.cfg.max_seq_len,
    )

  def prefill_buckets(self) -> list[int]:
    """The padded prompt widths: 64, 128, 256, ... up to max_seq_len, or up to a piece's width when
    longer prompts are prefilled in pieces (Pieces)."""
    out, b, top = [], self.min_prefill, self.piece or self.cfg.max_seq_len
    while True:
      out.append(min(b, top))
      if b >= top:
        return out
      b *= 2

  def row_buckets(self) -> list[int]:
    """The row counts a decode chunk is compiled for: 2, 8, 32, ... (x4), and all rows."""
    out, b = [], G.MIN_ROWS
    while b < self.rows:
      out.append(b)
      b *= 4
    return [*out, self.rows]

  def admit_counts(self, width: int) -> list[int]:
    """The prompt counts one admission call of this width is compiled for: 1 and the most that fit
    the per-iteration prefill budget (and the slots). Two or more prompts are padded to the most
    (padding entries write nowhere): a call prefills at most `prefill_tokens` padded tokens, and
    start-up builds two programs per width instead of one per count 1, 4, 16, ..."""
    return sorted({1, max(1, min(self.slots, self.prefill_tokens // width))})

  def chunk_spans(self, rows: int) -> list[int]:
    """The cache spans a decode chunk over `rows` rows is compiled for: every span at all rows and
    at the fewest rows (one client: on an H200 a 2-row chunk of gpt_small over the whole 1,024-token
    cache took 10.4 ms, the 32-row one over 128 tokens 9.9 ms; docs/serving.md); in between only the
    whole cache (0): each span is one more program to build."""
    return self.spans() if rows in (self.rows, self.row_buckets()[0]) else [0]

  def program_keys(self) -> list[tuple]:
    """Every program the engine runs (programs.Programs keys), in the order they are built: decode
    chunks without top-k/top-p filtering or top log-probs at every row bucket and span; with either
    over the whole cache at every row bucket (a sort or a top-k over the vocabulary weighs on such
    a step; each span would be one more program); with both at all rows only (rare: a chunk with
    rows of each kind)."""
    keys = [("decode", r, s, False, False) for r in self.row_buckets() for s in self.chunk_spans(r)]
    keys += [("decode", r, 0, f, not f) for r in self.row_buckets() for f in (True, False)]
    keys += [("decode", self.rows, 0, True, True)]
    keys += [("admit", w, p) for w in self.prefill_buckets() for p in self.admit_counts(w)]
    if self.piece:  # a long prompt's piece alone, and after a chunk as decode_key chooses them
      keys += [("extend", self.piece)] + [("piece", r, False, False, self.piece) for r in self.row_buckets()]
      keys += [("piece", self.rows, True, True, self.piece)]
    return [*keys, ("move",)]

  def core_keys(self) -> list[tuple]:
    """The programs that cover every call (all rows over the whole cache with filtering and top
    log-probs, one prompt of the widest width, the move, a piece alone): what a server built in the background
    serves with until the rest are built."""
    core = [("decode", self.rows, 0, True, True), ("admit", self.prefill_buckets()[-1], 1), ("move",)]
    return core + [("extend", self.piece)] * bool(self.piece)

  def _admit_waiting(self) -> None:
    """Admits waiting requests into free rows (the lowest first): at most `prefill_tokens` padded
    prompt tokens per iteration (and always one prompt or piece), prompts of one width prefilled
    together in one call, so the decode chunk that follows waits for a bounded prefill. A prompt
    longer than a piece takes a row and is prefilled a piece per iteration (Pieces), first of all."""
    pieced = self._plan_piece()  # the next piece of a prompt in pieces comes first
    budget, groups = self.prefill_tokens - pieced, {}
    with self._cond:
      free = [i for i, s in enumerate(self._slot) if s is None]
    while free:
      with self._cond:
        if not self._queue:
          break
        handle, choice = self._queue[0]
        n = len(choice.prompt_ids)
        long = bool(self.piece) and n > self.piece  # prefilled in pieces
        width = self.piece if long else G.bucket(n, self.cfg.max_seq_len, self.min_prefill)
        if ((groups or pieced) and width > budget) or (long and self._in_pieces() is not None):
          break  # (one prompt in pieces at a time; the queue keeps its order)
        self._queue.popleft()
      if handle.cancelled.is_set() or time.monotonic() > handle.deadline:
        self._finish(handle, choice, "cancelled" if handle.cancelled.is_set() else "timeout")
        continue
      try:  # this request's own values: it alone fails
        arrays = G.sampling_arrays([choice.sampling])
      except Exception:
        log.exception("request %s: admission failed", handle.id)
        self._fail(handle, choice)
        continue
      budget -= width
      if long:
        self._begin_pieces(handle, choice, free.pop(0), arrays)
        pieced = self._plan_piece()
        continue
      groups.setdefault(width, []).append((handle, choice, free.pop(0), arrays))
    for width, items in groups.items():
      counts = self.admit_counts(width)
      while items:  # the built program for these prompts (Programs.admit_key), wider while building
        want = next(c for c in counts if c >= min(len(items), counts[-1]))
        _, built_width, count = self.programs.admit_key(width, want)
        part, items = items[:count], items[count:]
        self._admit_group(built_width, count, part)
    self._gauges()

  def _admit_group(self, width: int, count: int, part: list) -> None:
    """One prefill call for `part` (padded to `count` prompts); a failure fails these requests."""
    tokens = np.zeros((count, width), np.int32)
    lengths = np.ones((count,), np.int32)
    rows = np.full((count,), self.rows, np.int32)  # padding entries write nowhere
    arrays = {k: np.zeros((count,), v.dtype) for k, v in part[0][3].items()}
    for i, (_, choice, row, one) in enumerate(part):
      tokens[i, : len(choice.prompt_ids)] = choice.prompt_ids
      lengths[i], rows[i] = len(choice.prompt_ids), row
      for k, v in one.items():
        arrays[k][i] = v[0]
    try:
      packed_PX = pack_admission(rows, tokens, lengths, arrays)  # one host-to-device copy
      self.state, packed = self.programs.run(("admit", width, count), self.state, packed_PX)
    except Exception:  # these requests' prefill: they alone fail
      log.exception("requests %s: admission failed", [h.id for h, *_ in part])
      for handle, choice, *_ in part:
        self._fail(handle, choice)
      if any(x.is_deleted() for x in jax.tree.leaves(self.state)):
        raise  # the batch state was donated to the failed call: nothing left to decode from
      return
    # the call drew each prompt's first token: its outputs are handled once the decode chunk behind
    # it is dispatched (Engine._handle_admitted), so a first token never waits for a chunk
    self._admitted.append((packed, [(h, c) for h, c, *_ in part] + [None] * (count - len(part))))
    for handle, choice, row, _ in part:
      self._occupy(row, handle, choice)

  def _occupy(self, row: int, handle, choice) -> None:
    """Row `row` decodes `choice` from its prompt's end (the prompt written, its first token drawn)."""
    choice.slot = row
    # the first step feeds the drawn token (writing position len(prompt)), each later one draws and
    # feeds the next: n tokens take n steps after admission, one token none
    budget = min(choice.sampling.max_new_tokens, self.cfg.max_seq_len - len(choice.prompt_ids))
    self._last_pos[row] = len(choice.prompt_ids)
    self._steps_left[row] = budget if budget > 1 else 0
    with self._cond:
      self._slot[row] = (handle, choice)

  def _compact(self) -> None:
    """Moves busy rows down only where that shrinks the row bucket: with n busy rows, every busy row
    at or past the smallest bucket covering n moves into the lowest free row (a device copy of one
    row; the chunk in flight keeps its own owners). When the bucket would not change (e.g. most
    slots busy), nothing moves: a move is a device call the next chunk would wait for."""
    busy = [i for i, s in enumerate(self._slot) if s is not None]
    if not busy:
      return
    need = next(r for r in self.row_buckets() if r >= len(busy))
    for src in [i for i in busy if i >= need]:
      dst = next(i for i, s in enumerate(self._slot) if s is None)  # below `need`: enough are free
      self.state = self.programs.run(("move",), self.state, np.int32(src), np.int32(dst))
      with self._cond:
        entry, self._slot[src], self._slot[dst] = self._slot[src], None, self._slot[src]
      entry[1].slot = dst
      self._last_pos[dst], self._steps_left[dst] = self._last_pos[src], self._steps_left[src]

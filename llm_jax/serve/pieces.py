"""Long prompts prefilled in pieces (chunked prefill; a mixin of `Engine`).

A prompt longer than a piece (`piece_tokens`: the largest power of two within the per-iteration
prefill budget, when the cache holds longer prompts than that) takes a row at once and is written
into it one piece per engine iteration, each piece attending to the pieces before it in the row's
cache. The piece runs in the same device call as the iteration's decode chunk (a ("piece", ...)
program: the chunk, then the piece), so the rows decoding wait for one piece per iteration, never for
a whole long prompt. Every piece is exactly `piece` tokens: the last one ends at the prompt's end
(overlapping the one before, whose positions it writes again with the same values) and draws the
first token as an admission does; that token is read after the next call is dispatched, as a chunk's
outputs are (read at once, the engine thread would wait for the whole call). One prompt is in
pieces at a time, and the queue behind it keeps its order; a cancelled one frees its row between
pieces. Between pieces the row's cache is also kept in a buffer of its own (`_row`, one row of the
batch cache), which each piece reads and returns: read from the batch cache, whose buffer the call
updates in place, it cost XLA two copies of the whole batch cache per piece.
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from llm_jax import generate as G
from llm_jax.serve.prefill import pack_admission
from llm_jax.serve.sequences import Choice, Handle

log = logging.getLogger("llm_jax.serve.engine")


class Pieces:
  """Chunked prefill of `Engine` (which holds the slots, the state and the programs it uses)."""

  def piece_tokens(self) -> int:
    """Prompt tokens per piece; 0 when every prompt the cache holds fits the budget whole."""
    if self.prefill_tokens >= self.cfg.max_seq_len:
      return 0
    piece = G.MIN_PREFILL
    while piece * 2 <= self.prefill_tokens:
      piece *= 2
    return piece

  def _in_pieces(self) -> int | None:
    """The row of the prompt being prefilled in pieces, if one is."""
    return next((i for i, e in enumerate(self._slot) if e is not None and e[1].prefill_at is not None), None)

  def _begin_pieces(self, handle: Handle, choice: Choice, row: int, arrays: dict) -> None:
    """Gives a long prompt its row (busy, not decoded until its last piece); a piece each iteration
    follows (`_plan_piece`)."""
    choice.slot, choice.prefill_at, choice.arrays = row, 0, arrays
    self._steps_left[row] = 0
    with self._cond:
      self._slot[row] = (handle, choice)

  def _plan_piece(self) -> int:
    """This iteration's piece of the prompt in pieces (`self._piece`: its packed arguments, its row,
    whether it is the last); returns its tokens, 0 when no prompt is in pieces. A piece before the
    last asks for no new tokens: its row stays inactive on the device."""
    row = self._in_pieces() if self.piece else None
    if row is None:
      return 0
    choice = self._slot[row][1]
    n, at = len(choice.prompt_ids), choice.prefill_at
    last = at + self.piece >= n
    start = n - self.piece if last else at
    arrays = dict(choice.arrays)
    if not last:
      arrays["max_new_B"] = np.zeros_like(arrays["max_new_B"])
    tokens = np.asarray([choice.prompt_ids[start : start + self.piece]], np.int32)
    one = np.array([self.piece], np.int32)
    self._piece = (
      pack_admission(np.array([row], np.int32), tokens, one, arrays, np.array([start])),
      row,
      last,
    )
    return self.piece

  def _pieced(self, piece: tuple, first, shared: bool = False) -> None:
    """After `piece` was dispatched (`first`: its packed outputs): the next piece's position, or
    after the last one the row decodes from the token it drew, as an admitted prompt's row does.
    The drawn token of a piece `shared` with a chunk is read in the next iteration, after the next
    call is dispatched (as the chunk's outputs are): read now, it would hold the engine thread until
    the whole call ends, with nothing queued on the device behind it."""
    _, row, last = piece
    handle, choice = self._slot[row]
    if not last:
      choice.prefill_at += self.piece
      return
    choice.prefill_at = choice.arrays = None
    self._occupy(row, handle, choice)
    (self._held if shared else self._admitted).append((first, [(handle, choice)]))

  def _extend_alone(self) -> None:
    """Runs this iteration's piece, if one is planned, in a call of its own (no row decodes, the
    engine is paused, or no ("piece", ...) program is built yet); a failure fails its request alone."""
    piece, self._piece = self._piece, None
    if piece is None:
      return
    try:
      self.state, self._row, first = self.programs.run(
        ("extend", self.piece), self.state, self._row_cache(), piece[0]
      )
    except Exception:
      handle, choice = self._slot[piece[1]]
      log.exception("request %s: prefilling a piece of its prompt failed", handle.id)
      self._fail(handle, choice)
      if any(x.is_deleted() for x in jax.tree.leaves(self.state)):
        raise  # the batch state was donated to the failed call: nothing left to decode from
      return
    self._pieced(piece, first)

  def _row_cache(self) -> list:
    """The row in pieces' cache buffer (donated to each piece's call, which returns the new one):
    made once, again only after a failed call consumed it. Its contents past the piece's offset
    are never read (a first piece reads none)."""
    if self._row is None or any(x.is_deleted() for x in self._row):
      self._row = self.programs.empty_row()
    return self._row

  def _dispatch(self, key: tuple, alive):
    """(state, packed outputs) of decode program `key` over alive[:R]. A planned piece runs in the
    same call (the cheapest built ("piece", ...) program covering the chunk: its rows, filtering and
    top log-probs, over the whole cache), or in a call of its own before the chunk while none is built."""
    pkey = None if self._piece is None else self.programs.piece_key(key[1], key[3], key[4])
    if pkey is None:
      self._extend_alone()
      return self.programs.run(key, self.state, alive[: key[1]])
    piece, self._piece = self._piece, None
    self.state, self._row, packed, first = self.programs.run(
      pkey, self.state, self._row_cache(), alive[: pkey[1]], piece[0]
    )
    self._pieced(piece, first, shared=True)
    return self.state, packed

"""What the engine does with a chunk's outputs on the host (a mixin of `Engine`): text, tokens and
log-probs per request, finishing and failing requests, and this iteration's events posted to the
clients' event loops in one call each (the engine thread never waits on a client)."""

from __future__ import annotations

import logging
from typing import Any

from llm_jax.serve.chunk import chunk_lists, slot_update
from llm_jax.serve.sequences import Choice, Handle, deliver

log = logging.getLogger("llm_jax.serve.engine")
TOP_LOGPROBS = 5  # top log-probs each decode step computes (a request asks for 0..5)


class Outputs:
  """Output handling of `Engine` (which holds the slots, the queue and the outbox these use)."""

  def _emit(self, handle: Handle, event: tuple) -> None:
    self._outbox.append((handle, event))

  def _flush(self) -> None:
    """Posts this iteration's events: one call per event loop (one wake-up), never blocking."""
    if not self._outbox:
      return
    by_loop: dict[Any, list] = {}
    for handle, event in self._outbox:
      by_loop.setdefault(handle.loop, []).append((handle, event))
    self._outbox = []
    for loop, items in by_loop.items():
      try:
        loop.call_soon_threadsafe(deliver, items)
      except RuntimeError:  # the event loop is closed: nobody is listening any more
        for handle, _ in items:
          handle.cancel()

  def _handle_admitted(self) -> None:
    """Handles the first tokens drawn by this iteration's admission calls (each its own call's
    outputs, a chunk of one step; they come before any chunk's tokens for those rows)."""
    admitted, self._admitted = self._admitted, []
    for packed, owners in admitted:
      self._handle_outputs(packed, owners, steps=1)

  def _handle_outputs(self, packed, owners, steps: int | None = None) -> None:
    steps = steps or self.chunk
    want_top = any(e is not None and e[1].top_n for e in owners)
    lists = chunk_lists(packed, steps, want_top)
    for slot, entry in enumerate(owners):
      if entry is None:
        continue
      handle, choice = entry
      if choice.finish_reason is not None:  # finished (stop, filter, cancel) after dispatch
        continue
      try:
        self._handle_slot(handle, choice, slot, lists, steps)
      except Exception:  # this sequence's host work failed: it alone ends
        log.exception("request %s: handling the outputs of slot %d failed", handle.id, slot)
        self._fail(handle, choice)

  def _handle_slot(self, handle: Handle, choice: Choice, slot: int, o: dict, steps: int) -> None:
    """Text, tokens and log-probs of one slot's chunk: a delta event, and "done" when it ended."""
    text, new_tokens, new_lps, new_top, reason = slot_update(choice, slot, o, steps)
    if new_tokens or text:
      handle.record(choice, new_tokens, new_lps, new_top, self.metrics)
      self._emit(handle, ("delta", choice.index, text, new_tokens, new_lps, new_top))
    if reason is not None:
      self._finish(handle, choice, reason)

  def _finish(self, handle: Handle, choice: Choice, reason: str) -> None:
    choice.finish_reason = reason
    if self.metrics is not None:
      self.metrics.finished.labels(reason).inc()
    with self._cond:
      if (
        choice.slot is not None
        and self._slot[choice.slot] is not None
        and self._slot[choice.slot][1] is choice
      ):
        self._slot[choice.slot] = None
      handle.pending -= 1
      last = handle.pending == 0
      if last:
        self._in_flight.discard(handle.id)
      self._gauges()
    self._emit(handle, ("done", choice.index, reason))
    if last:
      self._emit(handle, ("end",))

  def _fail(self, handle: Handle, choice: Choice) -> None:
    """Ends `choice` with "error" and cancels its siblings (the request has failed)."""
    if choice.finish_reason is None:
      self._finish(handle, choice, "error")
    handle.cancel()

  def _fail_all(self, message: str) -> None:
    with self._cond:
      entries = [e for e in self._slot if e is not None] + list(self._queue)
      self._queue.clear()
    for handle, choice in entries:
      if choice.finish_reason is None:
        self._finish(handle, choice, "error")

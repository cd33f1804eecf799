"""When the engine dispatches its next decode chunk: just before the device ends the one in flight.

The engine keeps one chunk queued behind the one the device runs, so the device never waits for the
host. Dispatched as early as possible, the next chunk is fixed ~a whole chunk before it starts: a
request that arrives meanwhile waits for that chunk too (at 32 rows of gpt_small on an H200, a
16-step chunk is ~10 ms), and in a closed loop each finished request's slot idles for it. The pacer
times each decode program's chunks on the device from the host's own observations and gives the
engine a deadline, the in-flight chunk's estimated end less the host's time to prepare the next
call and a margin: requests that arrive before it join the next chunk.

Timing without a device profiler: a chunk starts on the device when the work queued before it ends
(the previous chunk, then the admissions queued after that one) and not before its dispatch. When
the host waited for that earlier work, the moment the wait returned is its end (within the wait's
own latency); when the work was already done, only the dispatch time is known, a lower bound of the
start. A chunk's duration is sampled only when both its start and its end were waited for, so a
sample never includes time the device sat idle; the estimate is the median of a program's recent
samples. Every error goes towards dispatching early (the engine of before), never towards leaving
the device idle: a start known only as a lower bound gives an earlier deadline, a program without
samples none at all.
"""

from __future__ import annotations

import collections
import statistics

WINDOW = 9  # recent samples per program (the median of them)


class Pacer:
  """Chunk timing of one engine (its decode thread alone calls it). `margin_s`: dispatch this long
  before the estimated end, over the host's measured preparation time."""

  def __init__(self, margin_s: float = 0.001):
    self.margin_s = float(margin_s)
    self._durations: dict[tuple, collections.deque] = {}
    self._prep: collections.deque = collections.deque(maxlen=WINDOW)
    self._queued = None  # (program key, start lower bound, start tight?) of the chunk in flight
    self._running = None  # the same for the chunk before it, until its outputs arrive

  def reset(self) -> None:
    """No chunk in flight (after a failure)."""
    self._queued = self._running = None

  def dispatched(self, key: tuple, now: float, prep_s: float) -> None:
    """A chunk of program `key` is on its way at `now`, `prep_s` after the iteration began."""
    self._prep.append(prep_s)
    self._running, self._queued = self._queued, (key, now, False)

  def ended(self, now: float, waited: bool) -> None:
    """The outputs of the work queued before the chunk in flight arrived at `now`: the previous
    chunk's first, then this iteration's admissions (each call). `waited`: they were not ready when
    the host began to wait, so they ended at `now`."""
    if self._running is not None:  # the previous chunk's outputs: a sample when both ends are known
      key, start, tight = self._running
      self._running = None
      if tight and waited:
        self._durations.setdefault(key, collections.deque(maxlen=WINDOW)).append(now - start)
    if self._queued is not None and waited:
      key, start, _ = self._queued
      self._queued = (key, max(start, now), True)

  def collected(self, now: float, waited: bool) -> None:
    """The outputs of the last chunk arrived and none follows it."""
    self._running, self._queued = self._queued, None
    self.ended(now, waited)

  def estimate(self, key: tuple) -> float | None:
    """The median recent duration of program `key`'s chunks (None: not sampled yet)."""
    d = self._durations.get(key)
    return statistics.median(d) if d else None

  def deadline(self) -> float | None:
    """When to dispatch the next chunk (time.monotonic()), or None: at once (no chunk in flight,
    or its program not timed yet)."""
    if self._queued is None:
      return None
    key, start, _ = self._queued
    d = self.estimate(key)
    if d is None:
      return None
    return start + d - self.margin_s - (statistics.median(self._prep) if self._prep else 0.0)

  def describe(self) -> str:
    """Each timed program's estimate and sample count, for the engine's log."""
    return (
      ", ".join(
        f"{'-'.join(map(str, k))} {1e3 * statistics.median(d):.2f} ms ({len(d)})"
        for k, d in self._durations.items()
      )
      or "none"
    )

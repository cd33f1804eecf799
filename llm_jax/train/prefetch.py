"""A thread that produces items (batches) a few steps ahead of the consumer (the device loop).

One prefetcher for the training loop and the benchmark: `produce()` runs on the thread (load a batch,
read the loader state, place it on the devices, ...); `get()` returns the next item and the seconds
the caller waited for it. An exception raised by `produce` is raised again by the `get` that would
have returned its item.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any


class Prefetcher:
  """Calls `produce()` on a thread, keeping up to `depth` items ready; `get()` takes them in order."""

  def __init__(self, produce: Callable[[], Any], depth: int = 2, name: str = "prefetch"):
    self.produce = produce
    self.queue: queue.Queue = queue.Queue(maxsize=depth)
    self.done = threading.Event()
    self.thread = threading.Thread(target=self._run, name=name, daemon=True)
    self.thread.start()

  def _run(self):
    try:
      while not self.done.is_set():
        item = self.produce()
        while not self.done.is_set():
          try:
            self.queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # handed to the consumer, raised by get()
      self.queue.put(e)

  def get(self) -> tuple[Any, float]:
    """The next item, and the seconds spent waiting for it."""
    t0 = time.perf_counter()
    item = self.queue.get()
    if isinstance(item, BaseException):
      raise item
    return item, time.perf_counter() - t0

  def close(self):
    """Stops the thread (an item being produced is finished first, for at most 5 seconds)."""
    self.done.set()
    self.thread.join(timeout=5)

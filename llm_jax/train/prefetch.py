"""A background thread that reads training batches a few steps ahead of the device."""
from __future__ import annotations

import queue
import threading
import time


class Prefetcher:
  """A thread pulling batches (and the loader state after each) a few steps ahead of the device."""

  def __init__(self, loader, depth: int = 2):
    self.loader = loader
    self.queue: queue.Queue = queue.Queue(maxsize=depth)
    self.done = threading.Event()
    self.thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
    self.thread.start()

  def _run(self):
    try:
      while not self.done.is_set():
        item = (next(self.loader), self.loader.get_state())
        while not self.done.is_set():
          try:
            self.queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
      self.queue.put(e)

  def get(self):
    """(batch, loader state after it), and the seconds spent waiting."""
    t0 = time.perf_counter()
    item = self.queue.get()
    if isinstance(item, BaseException):
      raise item
    return item, time.perf_counter() - t0

  def close(self):
    self.done.set()
    self.thread.join(timeout=5)

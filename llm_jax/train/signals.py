"""Stopping a run cleanly: SIGTERM and the first Ctrl-C ask the loop to save a checkpoint and stop."""

from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class StopFlag:
  """SIGTERM and the first Ctrl-C ask the loop to save and stop; a second Ctrl-C interrupts at once."""

  def __init__(self):
    self.signal_name: str | None = None
    self._old = {}

  def __bool__(self):
    return self.signal_name is not None

  def _handle(self, signum, frame):
    del frame
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name
    log.warning(
      "%s received: saving a checkpoint and stopping (Ctrl-C again to abort at once)", self.signal_name
    )

  def install(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def restore(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}

  def agreed(self) -> bool:
    """True when any process was asked to stop (a collective on more than one process)."""
    if jax.process_count() == 1:
      return bool(self)
    flags = multihost_utils.process_allgather(np.array([1 if self else 0], np.int32))
    return bool(np.max(flags))

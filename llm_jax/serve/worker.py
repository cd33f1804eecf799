"""The engine in a process of its own (`python -m llm_jax.serve`'s default, `--engine_process`).

In one process the HTTP event loop and the engine thread take turns at one interpreter lock: on one
H200 the engine alone kept 80% of the in-process decode rate at 32 clients and the server 56-60%
(docs/serving.md, round five; 59-64% with this module, round six). Here the HTTP process keeps the
routes and an `EngineProcess`, which has the surface the routes use (`ready`, `submit`, `score`,
`programs_built`, `programs_warm`, `pause`, `stop`); the child loads the model (serve.loading), runs
the `Engine` with its decode thread, does each token's host work (detokenizing, stop sequences,
output filters) and sends each engine iteration's events back in one message. The HTTP process never
touches the device.

Messages, pickled over one pipe:

    to the engine    ("submit", key, choices, timeout_s)  ("cancel", key)  ("score", call, ids)
                     ("pause",)  ("resume",)  ("stop",)
    from the engine  ("ready", status)  ("failed", error)  ("events", [(key, event, blocked_by)], status)
                     ("status", status)  ("scored", call, arrays, error)

where a key is the request's id and a number (unique even where a caller reuses an id), status is
(sequences queued, busy slots, programs built, programs planned, programs warm: run once) and events
are those of `sequences.Handle`. The HTTP process applies each event to its copy of the request's choices
(tokens, log-probs, finish reason, the output rule that cut it) and the metrics, then puts it on the
request's queue, as the engine does in one process.

The child is forked when this process has not started a JAX backend (the command line: it starts the
engine before uvicorn, with nothing but the main thread), else spawned (embedding, tests). It ignores
Ctrl-C (the server drains its requests first, then stops it) and exits when the server stops it or
goes away (its pipe closes). Should it die, every request in flight ends with an error, `/health`
reports the exit and `on_exit` runs (the command line then exits).
"""

from __future__ import annotations

import concurrent.futures
import gc
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable

import jax
from jax._src import xla_bridge

from llm_jax.serve import loading
from llm_jax.serve.sequences import EngineBusy, Handle
from llm_jax.serve.settings import ServerSettings

log = logging.getLogger(__name__)
# JAX settings the command line makes before the engine starts; a spawned child applies them again
_JAX_OPTIONS = (
  "jax_enable_compilation_cache",
  "jax_compilation_cache_dir",
  "jax_persistent_cache_min_compile_time_secs",
)


class _RemoteHandle(Handle):
  """A request's handle in the HTTP process: cancelling it tells the engine's process too."""

  def __init__(self, link: EngineProcess, key: str, *args):
    super().__init__(*args)
    self._link, self.key = link, key

  def cancel(self) -> None:
    if not self.cancelled.is_set():
      self.cancelled.set()
      self._link.send(("cancel", self.key))


class EngineProcess:
  """The engine in a child process, seen from the HTTP process."""

  def __init__(self, settings: ServerSettings, metrics=None, on_exit: Callable[[str], None] | None = None):
    self.metrics, self.on_exit = metrics, on_exit
    self.max_concurrent = settings.max_concurrent
    self.ready = False
    self.error: str | None = None
    self._status = (0, 0, 0, 0, 0)
    self._handles: dict[str, _RemoteHandle] = {}
    self._calls: dict[int, concurrent.futures.Future] = {}
    self._ids = itertools.count()
    self._lock = threading.Lock()
    self._answered = threading.Event()  # "ready" or "failed" arrived, or the child died
    self._stopping = False
    context = "spawn" if xla_bridge.backends_are_initialized() else "fork"
    ctx = multiprocessing.get_context(context)
    self._conn, child_conn = ctx.Pipe()
    options = {k: getattr(jax.config, k) for k in _JAX_OPTIONS}
    self.process = ctx.Process(
      target=_child, args=(settings, child_conn, options), name="llm-engine", daemon=True
    )
    self.process.start()
    child_conn.close()  # the child's end lives in the child: its exit closes the pipe here
    log.info("engine process started (pid %d, %s)", self.process.pid, context)
    self._reader = threading.Thread(target=self._read, name="llm-engine-link", daemon=True)
    self._reader.start()

  # ---------------------------------------------------------------- the routes' surface

  def wait_ready(self) -> None:
    """Blocks until the engine's process is serving; RuntimeError with its error if it could not."""
    self._answered.wait()
    if not self.ready:
      raise RuntimeError(self.error or "the engine process did not start")

  @property
  def in_flight(self) -> int:
    return len(self._handles)

  @property
  def busy_slots(self) -> int:
    return self._status[1]

  def programs_built(self) -> tuple[int, int]:
    return self._status[2], self._status[3]

  def programs_warm(self) -> int:
    return self._status[4]

  def pause(self) -> None:
    """Engine.pause in the engine's process (maintenance, tests)."""
    self.send(("pause",))

  def resume(self) -> None:
    self.send(("resume",))

  def submit(self, choices, loop, queue, timeout_s: float, request_id: str | None = None) -> Handle:
    """Queues a request's choices on the engine; EngineBusy when max_concurrent are in flight."""
    n = next(self._ids)
    rid = request_id or f"req-{n}"
    key = f"{rid}/{n}"  # unique even where a caller reuses a request id: the events' address
    handle = _RemoteHandle(self, key, rid, choices, loop, queue, time.monotonic() + timeout_s)
    with self._lock:
      if self.error is not None:
        raise RuntimeError(self.error)
      if len(self._handles) >= self.max_concurrent:
        raise EngineBusy(f"{len(self._handles)} requests in flight (limit {self.max_concurrent})")
      self._handles[key] = handle
    self.send(("submit", key, choices, timeout_s))
    return handle

  def score(self, ids: list[int]):
    """Engine.score in the engine's process (blocks: the routes call it off the event loop)."""
    call, future = next(self._ids), concurrent.futures.Future()
    with self._lock:
      if self.error is not None:
        raise RuntimeError(self.error)
      self._calls[call] = future
    self.send(("score", call, list(ids)))
    return future.result()

  def stop(self) -> None:
    """Stops the engine's process (waits up to 10 s, then kills it)."""
    self._stopping = True
    self.send(("stop",))
    self.process.join(timeout=10)
    if self.process.is_alive():
      self.process.kill()
      self.process.join(timeout=5)
    self._reader.join(timeout=5)

  def send(self, message: tuple) -> None:
    try:
      with self._lock:
        self._conn.send(message)
    except (OSError, ValueError):  # the process is gone: the reader reports it
      pass

  # ---------------------------------------------------------------- the engine's messages

  def _read(self) -> None:
    try:
      while True:
        message = self._conn.recv()
        kind = message[0]
        if kind == "events":
          self._post(message[1])
          self._set_status(message[2])
        elif kind == "status":
          self._set_status(message[1])
        elif kind == "scored":
          _, call, arrays, error = message
          future = self._calls.pop(call)
          if error is None:
            future.set_result(arrays)
          else:
            future.set_exception(RuntimeError(f"prompt scoring failed in the engine: {error}"))
        elif kind == "ready":
          self._set_status(message[1])
          self.ready = True
          self._answered.set()
        elif kind == "failed":
          self.error = message[1]
          self._answered.set()
    except (EOFError, OSError):
      pass
    self.process.join(timeout=5)
    self._died(f"the engine process exited (exit code {self.process.exitcode})")

  def _set_status(self, status) -> None:
    self._status = status
    if self.metrics is not None:
      self.metrics.queue_depth.set(status[0])
      self.metrics.busy_slots.set(status[1])

  def _post(self, items) -> None:
    """Hands a batch of events to the event loops of their requests (one call per loop)."""
    by_loop: dict = {}
    for key, event, extra in items:
      handle = self._handles.get(key)
      if handle is not None:
        by_loop.setdefault(handle.loop, []).append((handle, event, extra))
    for loop, batch in by_loop.items():
      try:
        loop.call_soon_threadsafe(self._deliver, batch)
      except RuntimeError:  # that event loop is closed: nobody is listening any more
        for handle, _, _ in batch:
          handle.cancel()

  def _deliver(self, batch) -> None:
    """On the event loop: each event applied to the request's choices and the metrics, then queued."""
    for handle, event, extra in batch:
      kind = event[0]
      if kind == "delta":
        _, index, _, tokens, logprobs, top = event
        handle.record(handle.choices[index], tokens, logprobs, top, self.metrics)
      elif kind == "done":
        choice = handle.choices[event[1]]
        choice.finish_reason, choice.blocked_by = event[2], extra
        if self.metrics is not None:
          self.metrics.finished.labels(event[2]).inc()
      elif kind == "end":
        self._handles.pop(handle.key, None)
      handle.queue.put_nowait(event)

  def _died(self, reason: str) -> None:
    """The child is gone: each request in flight ends with an error, scoring calls fail."""
    with self._lock:
      if self.error is None:
        self.error = reason
      self.ready = False
      calls, self._calls = list(self._calls.values()), {}
      handles = list(self._handles.values())
    self._answered.set()
    for future in calls:
      future.set_exception(RuntimeError(self.error))
    for handle in handles:
      try:
        handle.loop.call_soon_threadsafe(self._fail, handle)
      except RuntimeError:
        pass
    if not self._stopping:
      log.error("%s", self.error)
      if self.on_exit is not None:
        self.on_exit(self.error)

  def _fail(self, handle: _RemoteHandle) -> None:
    """On the event loop: `handle`'s unfinished choices end with "error", then the request."""
    if self._handles.pop(handle.key, None) is None:
      return  # already ended
    for choice in handle.choices:
      if choice.finish_reason is None:
        self._deliver([(handle, ("done", choice.index, "error"), None)])
    handle.queue.put_nowait(("end",))


# -------------------------------------------------------------------- the engine's process


class _Link:
  """The child's end: stands in for the event loop of every request (`Handle.loop`), so the engine's
  `_flush` sends an iteration's events in one message."""

  def __init__(self, conn):
    self.conn = conn
    self.engine = None
    self.handles: dict[str, Handle] = {}
    self._lock = threading.Lock()
    self._sent_status = None

  def send(self, message: tuple) -> None:
    with self._lock:
      self.conn.send(message)

  def status(self) -> tuple:
    e = self.engine
    return (e.queue_depth, e.busy_slots, *e.programs_built(), e.programs_warm())

  def call_soon_threadsafe(self, _deliver, items) -> None:
    """Called by the engine thread (Outputs._flush) with this iteration's (handle, event) pairs."""
    out = []
    for handle, event in items:
      extra = None
      if event[0] == "done":
        extra = next(c.blocked_by for c in handle.choices if c.index == event[1])
      elif event[0] == "end":
        self.handles.pop(handle.id, None)
      out.append((handle.id, event, extra))
    self._sent_status = self.status()
    self.send(("events", out, self._sent_status))

  def send_status(self) -> None:
    """The status, when it changed since last sent (background builds finishing while idle)."""
    status = self.status()
    if status != self._sent_status:
      self._sent_status = status
      self.send(("status", status))

  def refuse(self, key: str, choices) -> None:
    """A request the engine would not queue ends at once with an error."""
    events = [(key, ("done", c.index, "error"), None) for c in choices]
    self.send(("events", [*events, (key, ("end",), None)], self.status()))


def _child(settings: ServerSettings, conn, jax_options: dict) -> None:
  """The engine's process: start the engine, then serve the HTTP process's messages until told to
  stop or the pipe closes."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops this process once it has drained
  for k, v in jax_options.items():
    jax.config.update(k, v)
  link = _Link(conn)
  try:
    engine, _ = loading.start_engine(settings)
  except Exception as e:
    log.exception("the engine could not start")
    link.send(("failed", f"{type(e).__name__}: {e}"))
    return
  link.engine = engine
  scorer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llm-score")
  link.send(("ready", link.status()))
  log.info("engine process %d serving", os.getpid())
  # After "ready" (on an H200 host this pass took ~0.13 s of the warm start), before the first
  # message is read: what start-up made stays alive, no full collector passes over it while decoding.
  gc.collect()
  gc.freeze()
  try:
    while True:
      if not conn.poll(0.5):
        link.send_status()
        continue
      message = conn.recv()
      kind = message[0]
      if kind == "submit":
        _, key, choices, timeout_s = message
        try:
          link.handles[key] = engine.submit(choices, link, None, timeout_s, request_id=key)
        except Exception:  # EngineBusy too (the HTTP process counts first)
          log.exception("request %s could not be queued", key)
          link.refuse(key, choices)
      elif kind == "cancel":
        handle = link.handles.get(message[1])
        if handle is not None:
          handle.cancel()
      elif kind == "score":  # on a thread of its own: submits and cancels are read meanwhile
        scorer.submit(_score, engine, link, *message[1:])
      elif kind == "pause":
        engine.pause()
      elif kind == "resume":
        engine.resume()
      elif kind == "stop":
        break
  except (EOFError, OSError):  # the server is gone
    pass
  finally:
    engine.stop()
    scorer.shutdown(wait=False, cancel_futures=True)


def _score(engine, link: _Link, call: int, ids: list[int]) -> None:
  try:
    link.send(("scored", call, engine.score(ids), None))
  except Exception as e:
    log.exception("prompt scoring failed")
    link.send(("scored", call, None, f"{type(e).__name__}: {e}"))

"""The batching engine: a fixed set of batch rows fed from a queue, stepped together on one thread.

Continuous batching: each iteration (1) frees the rows of cancelled and timed-out requests, (2) moves
busy rows down where that lets a smaller row bucket cover them (one-row device copies; none while
most slots are busy), (3) admits waiting requests into free rows: at most `prefill_tokens` padded
prompt tokens per iteration (always at least one prompt), the prompts of one width prefilled
together in one call (one prompt alone, two or more padded to the most the budget allows), so the
decode chunk behind it waits for a bounded prefill; the call also draws each prompt's first token,
sent as soon as the call ends (no decode chunk needed); a prompt longer than that budget is written a
piece per iteration instead, in the decode chunk's own call (chunked prefill: serve/pieces.py), and
(4) dispatches one decode chunk of a few steps over the first R rows,
R the smallest row bucket (2, 8, 32, ...: x4, and all rows) that covers the busy rows: one busy
client costs a batch-2 step, not a batch-of-all-slots one (no separate single-user profile is
needed). A chunk sorts the vocabulary (top-k/top-p) only while a live row asks for it: a program of
its own, not a branch on the device. The chunk's outputs come back in one device-to-host copy. Every
program (the all-rows bucket x each cache span, the smaller buckets over the whole cache, each
bucket filtering over the whole cache, each prompt width x 2 counts, the move) is built by
`serve.programs`, which keeps the traced programs across restarts with jax.export: all at start-up,
or (`serve_while_building`) the three that cover every call first and the rest on a background
thread, a call running in the cheapest built program that covers it meanwhile. Nothing compiles on
the engine's path. The parameters are laid out for the decode levers
(`default_levers`); decoding, admission and prompt scoring all read that one tree.

The engine thread does the host work too (detokenization, stop sequences, output filters: bounded
work per token, one decode per slot and chunk) for each chunk while the next one runs on the device
(one chunk in flight), and posts the chunk's events to the clients' event loop in one call: it never
waits on a client. A chunk's outputs belong to the rows' owners at dispatch (a row moved or refilled
since then keeps them apart). A cancelled (disconnected) or timed-out request frees its row at the
next iteration.

Failures stay with the request that caused them: a sequence whose admission (its sampling arrays)
or whose host-side handling (detokenizing, stop sequences, filters) fails finishes at once with
"error" (its sibling choices are cancelled) while the other rows keep decoding; a prefill call that
fails on the device fails the prompts it held. Only a failure of the batched decode step itself,
which every row shares, fails every request in flight.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from llm_jax import generate as G
from llm_jax.model import ModelConfig, default_levers, unstack_layers
from llm_jax.serve.outputs import TOP_LOGPROBS, Outputs
from llm_jax.serve.pieces import Pieces
from llm_jax.serve.prefill import prompt_scores
from llm_jax.serve.programs import Programs
from llm_jax.serve.rows import PREFILL_TOKENS, Rows
from llm_jax.serve.sequences import Choice, EngineBusy, Handle

log = logging.getLogger(__name__)
MIN_PREFILL = 64  # the narrowest prompt bucket


class Engine(Rows, Pieces, Outputs):
  """Slots, queue and the decode thread over one loaded model."""

  def __init__(
    self,
    params,
    cfg: ModelConfig,
    tokenizer,
    *,
    slots: int = 8,
    max_concurrent: int = 32,
    chunk: int = 16,
    hold_chars: int = 0,
    output_check: Callable[[str], tuple[int, Any] | None] | None = None,
    metrics=None,
    prefill_tokens: int = PREFILL_TOKENS,
    export_dir: str | None = None,
    compile_threads: int | None = None,
    levers: str | None = None,
    compiler_options: dict | None = None,
    serve_while_building: bool = False,
  ):
    # Decoding reads each layer's weights as buffers of their own (no per-step slice copies), laid
    # out for the decode levers; every program and prompt scoring read this one tree. `params` may be
    # abstract (jax.ShapeDtypeStruct leaves): the programs are then built from the shapes while the
    # weights load elsewhere, and `attach` brings them.
    if cfg.decode_levers:  # already prepared (model.unstack_layers(levers=...))
      levers = ""
    elif levers is None:
      levers = default_levers(params)
    self.params, self.cfg = unstack_layers(params, cfg, levers=levers)
    self.tokenizer = tokenizer
    self.slots, self.max_concurrent, self.chunk = int(slots), int(max_concurrent), int(chunk)
    self.rows = max(self.slots, G.MIN_ROWS)  # decode rows; those past `slots` stay idle
    self.hold_chars, self.output_check, self.metrics = hold_chars, output_check, metrics
    self.vocab_limit = min(tokenizer.vocab_size, cfg.vocab_size)
    # prompts are padded to 64, 128, 256, ... tokens: a prefill of 64 tokens costs what one of 16
    # does on an accelerator, and start-up compiles two programs fewer
    self.prefill_tokens = int(prefill_tokens)
    self.piece = self.piece_tokens()  # a longer prompt is prefilled in pieces of this many tokens
    self.min_prefill = min(MIN_PREFILL, cfg.max_seq_len, self.piece or MIN_PREFILL)
    self._spanned = {r for r in self.row_buckets() if self.chunk_spans(r) != [0]}  # spans built
    # programs build on 4 threads (XLA compiles without the GIL); 16 on the H200 host made the cold
    # build 89 s instead of ~30 s (concurrent GEMM autotuning on one GPU) and the warm one 4.3 s
    # instead of 1.7 s (docs/serving.md)
    self.export_dir = export_dir
    self.compile_threads = int(compile_threads or 4)
    self.compiler_options = compiler_options  # XLA options for the engine's programs
    # ready once the covering programs are built (Rows.core_keys), the rest built in the background
    self.serve_while_building = bool(serve_while_building)
    self.programs: Programs | None = None
    self._cond = threading.Condition()
    self._queue: collections.deque[tuple[Handle, Choice]] = collections.deque()
    self._in_flight: set[str] = set()
    self._slot: list[tuple[Handle, Choice] | None] = [None] * self.slots
    self._last_pos = [0] * self.slots  # per slot: an upper bound of the next position it writes
    self._steps_left = [0] * self.slots  # per slot: decode steps it may still need (its budget)
    self._in_flight_chunk = None  # (packed outputs, slot owners) of the chunk the device runs
    self._piece = None  # (packed arguments, row, last) of this iteration's piece (Pieces)
    self._row: list | None = None  # the row in pieces' cache, between its pieces (Pieces._row_cache)
    self._admitted: list[tuple] = []  # (packed first tokens, owners) of admission calls not handled yet
    self._held: list[tuple] = []  # the same of last pieces sharing a chunk's call (Pieces._pieced)
    self.eos_id = int(getattr(tokenizer, "eos_id", G.EOS_ID))  # a row that draws it stops
    self._outbox: list[tuple[Handle, tuple]] = []  # events of this iteration, posted together
    self._paused = False
    self._stop = False
    self._thread: threading.Thread | None = None
    self.ready = False
    self.state: list | None = None  # the batch state: the decode state's leaves (Programs.empty_state)
    self.warmup_s: dict[str, float] = {}  # seconds of warmup: the empty state, building programs
    self.steps = 0
    self._ids = itertools.count()

  # ---------------------------------------------------------------- lifecycle

  def attach(self, params, cfg: ModelConfig) -> None:
    """The weights of an engine built from their shapes: already laid out for this engine
    (`unstack_layers(params, cfg, levers=default_levers(params))`), with exactly the shapes and
    dtypes its programs were built for (else ValueError: the caller builds an engine from the
    weights instead)."""
    if cfg != self.cfg or jax.tree.structure(params) != jax.tree.structure(self.params):
      raise ValueError("the loaded weights' layout differs from the one the programs were built for")
    got = [(x.shape, x.dtype) for x in jax.tree.leaves(params)]
    if got != [(x.shape, x.dtype) for x in jax.tree.leaves(self.params)]:
      raise ValueError("the loaded weights' shapes or dtypes differ from those the programs were built for")
    self.params = params
    if self.programs is not None:
      self.programs.param_leaves = jax.tree.leaves(params)

  def programs_built(self) -> tuple[int, int]:
    """(programs built tuned, programs the engine runs): equal once the background builds are done."""
    if self.programs is None:
      return 0, len(self.program_keys())
    return len(self.programs.compiled) - len(self.programs.quick), self.programs.planned

  def programs_warm(self) -> int:
    """Programs built tuned whose build has run once (an idle engine's first runs: Programs.warm): at
    the total, no request meets a program's first run (on a GPU ~0.1 s: it loads the program)."""
    if self.programs is None:
      return 0
    p = self.programs
    return sum(k not in p.quick and p.warmed.get(k) is c for k, c in tuple(p.compiled.items()))

  def warmup(self) -> float:
    """Builds (traces or loads, and compiles) every program the engine runs; returns the seconds.
    Nothing is compiled on the engine's path after this: each call uses a built program. With
    `serve_while_building` only the few that cover every call (Rows.core_keys) are built here, quick
    (Programs.QUICK_OPTIONS: on a GPU without GEMM autotuning), and the rest on a background thread,
    tuned, then those few again tuned, each used as soon as it is built."""
    t0 = time.monotonic()
    self.programs = Programs(
      self.params,
      self.cfg,
      rows=self.rows,
      steps=self.chunk,
      top_n=TOP_LOGPROBS,
      vocab_limit=self.vocab_limit,
      export_dir=self.export_dir,
      compiler_options=self.compiler_options,
      eos_id=self.eos_id,
    )
    self.state = self.programs.empty_state()  # the device's first use (its client starts) may be here
    self.warmup_s = {"state": time.monotonic() - t0}
    keys = self.program_keys()
    self.programs.planned = len(keys)
    if self.serve_while_building:  # the covering few quick, then every program tuned (those again)
      core = self.core_keys()
      self.programs.build(core, threads=self.compile_threads, quick=True)
      self.programs.build_in_background(
        [k for k in keys if k not in core] + core, threads=self.compile_threads
      )
    else:
      self.programs.build(keys, threads=self.compile_threads)
    jax.block_until_ready(self.state)
    self.ready = True
    self.warmup_s["build"] = time.monotonic() - t0 - self.warmup_s["state"]
    return time.monotonic() - t0

  def start(self) -> None:
    """Starts the decode thread (after warmup)."""
    self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
    self._thread.start()

  def stop(self) -> None:
    if self.programs is not None:
      self.programs.cancel()
    with self._cond:
      self._stop = True
      self._cond.notify_all()
    if self._thread is not None:
      self._thread.join(timeout=10)

  def pause(self) -> None:
    """Holds decoding: requests still join free slots (prefill) and cancelled ones still leave, but
    no tokens are produced until `resume` (for maintenance and for tests)."""
    with self._cond:
      self._paused = True

  def resume(self) -> None:
    with self._cond:
      self._paused = False
      self._cond.notify_all()

  # ---------------------------------------------------------------- submission

  @property
  def in_flight(self) -> int:
    return len(self._in_flight)

  @property
  def busy_slots(self) -> int:
    return sum(s is not None for s in self._slot)

  @property
  def queue_depth(self) -> int:
    return len(self._queue)

  def submit(
    self, choices: list[Choice], loop, queue, timeout_s: float, request_id: str | None = None
  ) -> Handle:
    """Queues a request's choices; raises EngineBusy when max_concurrent requests are in flight."""
    handle = Handle(
      request_id or f"req-{next(self._ids)}", choices, loop, queue, time.monotonic() + timeout_s
    )
    for c in choices:
      c.text = G.TextStream(
        self.tokenizer,
        c.sampling.stop,
        hold_chars=self.hold_chars,
        check=self._checker(c),
        context=c.prompt_ids,
        stop_ids=c.sampling.stop_token_ids,
      )
    with self._cond:
      if len(self._in_flight) >= self.max_concurrent:
        raise EngineBusy(f"{len(self._in_flight)} requests in flight (limit {self.max_concurrent})")
      self._in_flight.add(handle.id)
      self._queue.extend((handle, c) for c in choices)
      self._gauges()
      self._cond.notify_all()
    return handle

  def score(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompt scoring (echo with log-probs), one forward pass over `ids` padded to a prompt width:
    [L - 1] log-probs of each token after those before it, [L - 1, TOP_LOGPROBS] the top log-probs
    and their ids (row t scores token t + 1). Any thread; decoding goes on meanwhile."""
    width = G.bucket(len(ids), self.cfg.max_seq_len)
    tokens = np.zeros((1, width), np.int32)
    tokens[0, : len(ids)] = ids
    scores = prompt_scores(
      self.params, tokens, cfg=self.cfg, top_n=TOP_LOGPROBS, vocab_limit=self.vocab_limit
    )
    return tuple(np.asarray(x) for x in scores)

  def _checker(self, choice: Choice):
    if self.output_check is None:
      return None

    def check(text: str):
      hit = self.output_check(text)
      if hit is None:
        return None
      choice.blocked_by = hit[1]
      return hit[0]

    return check

  def _gauges(self) -> None:
    if self.metrics is not None:
      self.metrics.queue_depth.set(len(self._queue))
      self.metrics.busy_slots.set(self.busy_slots)

  # ---------------------------------------------------------------- the decode thread

  def _run(self) -> None:
    while True:
      warm = None
      with self._cond:
        while not self._stop:
          free = self.busy_slots < self.slots
          if (
            (self._queue and free)
            or (self.busy_slots and not self._paused)
            or self._in_flight_chunk is not None
          ):
            break
          if self.busy_slots:  # paused with requests in slots: wake up to free cancelled ones
            self._cond.wait(timeout=0.05)
            break
          warm = None if self._admitted else self.programs.unwarmed()
          if warm is not None:  # idle: a program's first run, so that no request waits for it
            break
          self._cond.wait(timeout=0.5)
        if self._stop:
          return
        paused = self._paused
      if warm is not None:
        self._warm(warm)
        continue
      try:
        self._reap()
        self._compact()
        self._admit_waiting()
        if self.busy_slots and not paused:
          self._decode()
        else:
          self._collect()
      except Exception as e:  # the shared decode step failed: fail every request, keep serving
        log.exception("engine step failed")
        self._in_flight_chunk, self._admitted, self._held, self._piece = None, [], [], None
        self._fail_all(f"engine error: {type(e).__name__}")
        self.state = self.programs.empty_state()
      finally:
        self._flush()

  def _warm(self, key: tuple) -> None:
    """Runs program `key` once while no row is busy (Programs.warm); a failure is logged and the
    state made afresh (no request holds a row)."""
    try:
      self.state = self.programs.warm(key, self.state)
    except Exception:
      log.exception("the first run of program %s failed", key)
      self.programs.warmed[key] = self.programs.compiled.get(key)  # not again
      self.state = self.programs.empty_state()

  def _reap(self) -> None:
    """Frees the slots of cancelled and timed-out requests."""
    now = time.monotonic()
    for entry in list(self._slot):
      if entry is None:
        continue
      handle, choice = entry
      if handle.cancelled.is_set():
        self._finish(handle, choice, "cancelled")
      elif now > handle.deadline:
        self._finish(handle, choice, "timeout")

  def _decode(self) -> None:
    """Dispatches a chunk for the busy slots, then handles the previous chunk's outputs while the
    device runs this one. The outputs belong to the slots' owners at dispatch: a slot freed and
    refilled since then ignores them (its new request's tokens start with the next chunk)."""
    if self._held:  # last pieces' first tokens of the previous iteration: read after this dispatch
      self._admitted, self._held = self._admitted + self._held, []
    alive = np.zeros((self.rows,), bool)
    # Rows whose dispatched steps already cover their whole budget are done on the device: the chunk
    # in flight ends them ("length"), so they get no further chunk.
    alive[: self.slots] = [
      s is not None and left > 0 for s, left in zip(self._slot, self._steps_left, strict=True)
    ]
    if not alive.any():
      had_outputs = self._in_flight_chunk is not None or bool(self._admitted) or bool(self._piece)
      self._collect()
      self._handle_admitted()
      if not had_outputs:  # no outputs can end these slots any more: never spin on them
        for entry in [e for e in self._slot if e is not None and e[1].prefill_at is None]:
          log.error("slot of %s has no steps left but did not finish", entry[0].id)
          self._finish(entry[0], entry[1], "error")
      return
    rows = next(r for r in self.row_buckets() if r > np.flatnonzero(alive).max())
    # the sort of top-k/top-p only when a live row asks for it (generate.sample)
    filtered = G.any_filtered([s[1].sampling for s, a in zip(self._slot, alive, strict=False) if a])
    # Positions this chunk writes: at most `chunk` past each live slot's bound (rows that stopped
    # early stay below it), so the span covers them all. Other row buckets, and chunks that filter,
    # read the whole cache (Rows.chunk_spans, program_keys); a program not built yet is covered by a
    # larger built one.
    span = 0
    if rows in self._spanned and not filtered:
      last = max(self._last_pos[i] for i in range(self.slots) if alive[i]) + self.chunk - 1
      span = G.decode_span(min(last, self.cfg.max_seq_len - 1), self.cfg)
    # top log-probs (a log-softmax and a top-k over the vocabulary every step) only when a live row
    # asks for them: the other programs have no conditional in their step
    top = any(s[1].top_n for s, a in zip(self._slot, alive, strict=False) if a)
    key = self.programs.decode_key(rows, span, filtered, top)
    # the chunk's owners (copied by the slice below); a row whose prompt is in pieces owns none of its
    # outputs, not even after its last piece, which runs after the chunk in the same call
    owners = self._slot
    if self.piece:
      owners = [None if e is None or e[1].prefill_at is not None else e for e in self._slot]
    self.state, packed = self._dispatch(key, alive)
    rows = packed.shape[0]
    for i in range(self.slots):
      if alive[i]:
        self._last_pos[i] += self.chunk
        self._steps_left[i] -= self.chunk
    self.steps += self.chunk
    previous, self._in_flight_chunk = self._in_flight_chunk, (packed, owners[:rows])
    if previous is not None:
      self._handle_outputs(*previous)
    self._handle_admitted()  # first tokens: after the chunk that continues them is on its way

  def _collect(self) -> None:
    """Runs this iteration's piece of a long prompt alone and handles the chunk still in flight, if
    any (no chunk to dispatch)."""
    self._extend_alone()
    previous, self._in_flight_chunk = self._in_flight_chunk, None
    if previous is not None:
      self._handle_outputs(*previous)

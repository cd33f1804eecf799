"""The engine's compiled programs: every shape it runs, built once at start-up (none at run time).

Programs (serve/prefill.py's functions over the engine's parameters and batch state):

    ("decode", R, span, filtered, top)  a decode chunk over the first R rows, attending to `span`
                         cache positions; `filtered` when some row samples with top-k/top-p (a sort
                         over the vocabulary every step; without it no row may set them); `top`
                         when some row wants top log-probs (the top TOP_LOGPROBS of every row,
                         every step; without it only each drawn token's log-prob, no log-softmax
                         over the vocabulary and no conditional in the step)
    ("admit", W, P)      P prompts padded to W tokens prefilled in one call into chosen rows, each
                         one's first token drawn (its arguments one int32 array: pack_admission;
                         outputs packed as a chunk of one step)
    ("extend", W)        one piece of W tokens of a long prompt written from its offset onto its
                         row's cache so far (an argument of its own, returned: `empty_row`),
                         which then replaces the row's in the state; the first token drawn after
                         the last piece (chunked prefill: Pieces in serve/pieces.py)
    ("piece", R, filtered, top, W)  a decode chunk over the first R rows (whole cache), then one
                         piece as "extend": a long prompt's prefill sharing a call with decoding
    ("move",)            one row of the state copied onto another (keeps the busy rows compacted)
    ("state",)           the batch state of idle rows (zeros): the programs' state argument, made
                         by a program too, so that a start whose programs are all loaded traces no
                         model (the state's shapes come with the loaded program)

The batch state is the flat list of the decode state's leaves (generate.DecodeState), as the programs
take and return it; `state_tree` unflattens it (traced from the model on first use).

Each program is a flat function of leaf lists (parameters, state, then arrays), so that it can be
exported: with an `export_dir` (the server puts it next to JAX's compilation cache), a program is
traced once, serialized with `jax.export` under a key of everything that shapes it (the engine's
code, the model config, the leaves' shapes and dtypes, the static arguments, the jax version and the
device kind), and a later start deserializes it instead of tracing the model in Python again; the
compile of the exported module then hits the persistent compilation cache. PRNG key arrays and the
donated state pass through export (donation is the caller's jit's). Without `export_dir` (or without
the `flatbuffers` package that serialization needs) programs are traced every start.

Building runs on a few threads: XLA compiles in parallel (it releases the GIL); tracing does not. A
server may start answering once a covering few are built (`Engine(serve_while_building=True)`) and
build the rest in the background: until a program is built, `decode_key` and `admit_key` name the
cheapest built one that covers the call (more rows, a longer span, filtered sampling, top log-probs,
a wider prompt), so a call never
waits for a compile and never compiles. Those first few may be built `quick` (on a GPU without XLA's
GEMM autotuning, on a CPU with less LLVM optimization: a faster compile, slower code)
and are then built again, tuned, in the background, each replacing its quick version once built.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import importlib.util
import logging
import os
import pathlib
import tempfile
import threading
import time

import jax
import numpy as np

from llm_jax import generate as G
from llm_jax.serve.prefill import (
  ADMIT_COLUMNS,
  admit_rows,
  decode_rows,
  decode_then_extend,
  extend_rows,
  move_row,
  pack_admission,
)

log = logging.getLogger(__name__)
_ROOT = pathlib.Path(__file__).resolve().parents[1]  # the llm_jax package
_CODE = ("model", "generate", "serve/prefill.py", "serve/programs.py")
FORMAT = 4  # bump when the exported functions' signatures change
# A quick build, by platform: on a GPU no GEMM autotuning (one H200, the engine's programs: a cold build
# ~4x faster, decoding about half as fast; docs/serving.md), on a CPU LLVM's optimization level 1 (level
# 0 made XLA's CPU runtime abort now and then: tests/conftest.py). Elsewhere (TPU) nothing is built
# quick: the programs are built once, tuned.
QUICK_OPTIONS = {"gpu": {"xla_gpu_autotune_level": 0}, "cpu": {"xla_backend_optimization_level": 1}}


@functools.cache
def code_digest() -> str:
  """A digest of the source the programs are traced from (model, generate, these modules)."""
  h = hashlib.sha256()
  for name in _CODE:
    p = _ROOT / name
    for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
      h.update(str(f.relative_to(_ROOT)).encode())
      h.update(f.read_bytes())
  return h.hexdigest()


def _can_serialize() -> bool:
  """Whether jax.export can serialize here (it needs the flatbuffers package)."""
  return importlib.util.find_spec("flatbuffers") is not None


def _abstract(leaves):
  return [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]


class Programs:
  """Traced (or loaded), compiled programs keyed by ("decode", R, span, filtered, top),
  ("admit", W, P), ("extend", W), ("piece", R, filtered, top, W), ("move",), over a batch state of
  `rows` rows (`empty_state`)."""

  def __init__(
    self,
    params,
    cfg,
    *,
    rows: int,
    steps: int,
    top_n: int,
    vocab_limit: int | None,
    export_dir: str | None = None,
    compiler_options: dict | None = None,
    eos_id: int = G.EOS_ID,
  ):
    self.cfg, self.steps, self.top_n, self.vocab_limit = cfg, steps, top_n, vocab_limit
    self.eos_id = int(eos_id)  # the tokenizer's end of sequence: a row that draws it stops
    self.compiler_options = dict(compiler_options or {})  # XLA options for every compile
    self.param_leaves, self._param_tree = jax.tree.flatten(params)
    self._param_avals = _abstract(self.param_leaves)
    self.rows = int(rows)
    self._state_avals: list | None = None  # the state's leaves' shapes: known once `empty_state` ran
    self._state_program = None
    if export_dir and not _can_serialize():
      log.warning("the flatbuffers package is missing: programs are traced every start")
      export_dir = None
    self.export_dir = export_dir
    self.compiled: dict[tuple, object] = {}
    self.quick: set[tuple] = set()  # programs built quick (QUICK_OPTIONS), to be built again tuned
    self.quick_options = QUICK_OPTIONS.get(jax.default_backend(), {})
    self.planned = 0  # programs the engine will run (its program_keys), built or not
    self.loaded = self.exported = 0  # programs read from / written to export_dir
    self.calls: collections.Counter[tuple] = collections.Counter()  # runs of each program
    self.warmed: dict[tuple, object] = {}  # the build of each program that has run once (`warm`)
    self.build_s: dict[tuple, float] = {}  # seconds each program took to trace (or load) and compile
    self._cancelled = threading.Event()  # set: builds not started yet are skipped
    self.background: threading.Thread | None = None

  # ---------------------------------------------------------------- choosing a built program

  def decode_key(self, rows: int, span: int, filtered: bool, top: bool = False) -> tuple:
    """The cheapest built decode program over at least `rows` rows whose cache span covers `span`
    (a span of 0, the whole cache, covers any), for a `filtered` chunk one that filters (one that
    filters draws exactly the same tokens for rows that do not, only slower) and for a `top` chunk
    one with top log-probs: ("decode", rows, span, filtered, top) itself once it is built."""
    key = ("decode", rows, span, bool(filtered), bool(top))
    if key in self.compiled:  # every chunk once all are built: no search
      return key
    full = self.cfg.max_seq_len
    fits = [
      k
      for k in tuple(self.compiled)  # a snapshot: background builds add programs
      if k[0] == "decode"
      and k[1] >= rows
      and (k[2] == 0 or (span and k[2] >= span))
      and k[3] >= bool(filtered)
      and k[4] >= bool(top)
    ]
    if not fits:
      raise KeyError(f"no built decode program covers {key[1:]} (rows, span, filtered, top)")
    return min(fits, key=lambda k: (k[1] * (k[2] or full), k[3], k[4], k[1]))

  def admit_key(self, width: int, count: int) -> tuple:
    """The built admission program to prefill `count` prompts of (padded) `width` tokens with:
    ("admit", width, count) itself once it is built, else the cheapest built one as wide or wider
    taking as many prompts, else the one of those taking the most (the caller admits the rest in
    further calls)."""
    if ("admit", width, count) in self.compiled:
      return ("admit", width, count)
    wide = [k for k in tuple(self.compiled) if k[0] == "admit" and k[1] >= width]
    if not wide:
      raise KeyError(f"no built admission program takes prompts of {width} tokens")
    enough = [k for k in wide if k[2] >= count]
    if enough:
      return min(enough, key=lambda k: (k[1] * k[2], k[1]))
    return max(wide, key=lambda k: (k[2], -k[1]))

  def piece_key(self, rows: int, filtered: bool, top: bool) -> tuple | None:
    """The cheapest built ("piece", R, filtered, top, W) program whose chunk covers a decode chunk
    over `rows` rows (as `decode_key`, over the whole cache); None while none is built (the engine
    then runs the piece in a call of its own, ("extend", W), before the chunk)."""
    fits = [
      k
      for k in tuple(self.compiled)
      if k[0] == "piece" and k[1] >= rows and k[2] >= bool(filtered) and k[3] >= bool(top)
    ]
    return min(fits, key=lambda k: (k[1], k[2], k[3]), default=None)

  # ---------------------------------------------------------------- the batch state

  def empty_state(self) -> list:
    """The batch state of `rows` idle rows (the decode state's leaves, zeros) on the device, made by
    the ("state",) program: loaded from `export_dir` it needs no trace of the model (on this repo's
    2-core CPU, gpt_small shapes: ~0.6-1.0 s of interpreter time at each start otherwise)."""
    if self._state_program is None:
      self._state_program, how = self._build(("state",), quick=False)
      self._count(how)
    leaves = self._state_program()
    self._state_avals = _abstract(leaves)
    return leaves

  def empty_row(self) -> list:
    """One row's cache (zeros): the row in pieces' cache, as "extend" and "piece" take it."""
    return [jax.numpy.zeros(a.shape, a.dtype) for a in self._row_avals()]

  def _row_avals(self) -> list:  # the state's cache leaves ([.., B, K, S, H]: generate.row_axis), one row
    rows = [a for a in self._state_avals if a.ndim >= 4]
    return [jax.ShapeDtypeStruct(a.shape[:-4] + (1,) + a.shape[-3:], a.dtype) for a in rows]

  @functools.cached_property
  def state_tree(self):
    """The decode state's tree structure (generate.DecodeState): traced from the model the first
    time a program is traced (or a caller asks); a start whose programs are all loaded never needs it."""
    params = jax.tree.unflatten(self._param_tree, self._param_avals)
    return jax.tree.structure(jax.eval_shape(lambda: G.empty_state(self.cfg, self.rows, params)))

  # ---------------------------------------------------------------- calls

  def run(self, key: tuple, *args, counted: bool = True):
    """Program `key` on `args` (the state, for "extend" and "piece" the row's cache, then arrays:
    `_spec`). Returns the state and the packed outputs [R or P, X] (prefill.pack_outputs) for "decode"
    and "admit", the state, the row's cache and the piece's outputs for "extend" (for "piece" the
    chunk's before the piece's), the state for "move". `counted`: in `calls` (not a warm-up's)."""
    if counted:
      self.calls[key] += 1
    fn = self.compiled[key]
    return fn(*args) if key[0] == "move" else fn(self.param_leaves, *args)

  def unwarmed(self) -> tuple | None:
    """A built program not run yet in its current build (None: every one has run)."""
    for key, compiled in tuple(self.compiled.items()):  # a snapshot: background builds add programs
      if self.warmed.get(key) is not compiled:
        return key
    return None

  def warm(self, key: tuple, state):
    """Runs program `key` once on arguments that change nothing a request owns, and returns the
    state: a first run on a GPU loads the program and grows the memory pool (~0.1 s), which a
    request must not wait for. Meant for an idle engine (no busy rows): a decode chunk with no live
    row (free rows' cache past their length is never read), an admission whose prompts all write
    nowhere (padding rows; a piece too), a row moved onto itself. Not counted in `calls`."""
    compiled = self.compiled[key]  # this build is warm after the call (a newer one gets its own)
    kind = key[0]
    if kind == "move":
      state = self.run(key, state, np.int32(0), np.int32(0), counted=False)
    else:
      alive = [np.zeros((key[1],), bool)] if kind in ("decode", "piece") else []
      row = [self.empty_row()] if kind in ("extend", "piece") else []
      width, count = {"admit": key[1:], "extend": (key[1], 1), "piece": (key[-1], 1)}.get(kind, (0, 0))
      packed = []
      if count:  # prompts whose rows are past the state's: written nowhere
        sampling = G.sampling_arrays([G.SamplingParams()] * count)
        rows, lengths = np.full((count,), self.rows, np.int32), np.ones((count,), np.int32)
        packed = [pack_admission(rows, np.zeros((count, width), np.int32), lengths, sampling)]
      state = self.run(key, state, *row, *alive, *packed, counted=False)[0]
    self.warmed[key] = compiled
    return state

  # ---------------------------------------------------------------- building

  def _spec(self, key: tuple):
    """(flat function, its abstract arguments, donated argument numbers) of program `key`. The
    functions unflatten the state only when traced (`state_tree`)."""
    ptree, cfg, i32 = self._param_tree, self.cfg, jax.numpy.int32
    kind = key[0]
    if kind == "state":
      params = jax.tree.unflatten(ptree, self._param_avals)  # only their shapes are read

      def state():
        return jax.tree.leaves(G.empty_state(cfg, self.rows, params))

      return state, [], ()
    if self._state_avals is None:
      raise RuntimeError("Programs.empty_state() makes the state the programs are built for: call it first")
    if kind == "move":

      def move(sl, src, dst):
        return jax.tree.leaves(move_row(jax.tree.unflatten(self.state_tree, sl), src, dst))

      scalar = jax.ShapeDtypeStruct((), i32)
      return move, [self._state_avals, scalar, scalar], (0,)
    admit = dict(cfg=cfg, top_n=self.top_n, vocab_limit=self.vocab_limit, eos_id=self.eos_id)

    def alive(rows):
      return jax.ShapeDtypeStruct((rows,), bool)

    def packed(count, width):  # pack_admission's array
      return jax.ShapeDtypeStruct((count, len(ADMIT_COLUMNS) + width), i32)

    def decode(filtered, top):  # a `top` program computes the top log-probs every step: no conditional
      return {**admit, "steps": self.steps, "top_n": self.top_n if top else 0, "filtered": filtered}

    if kind == "decode":
      _, rows, span, filtered, top = key
      fn, args = (
        functools.partial(decode_rows, want_top=True, span=span, **decode(filtered, top)),
        [alive(rows)],
      )
    elif kind == "admit":
      fn, args = functools.partial(admit_rows, **admit), [packed(key[2], key[1])]
    elif kind == "extend":
      fn, args = functools.partial(extend_rows, **admit), [self._row_avals(), packed(1, key[1])]
    elif kind == "piece":
      _, rows, filtered, top, width = key
      fn = functools.partial(decode_then_extend, admit=admit, **decode(filtered, top))
      args = [self._row_avals(), alive(rows), packed(1, width)]
    else:
      raise ValueError(f"unknown program {key!r}")
    row = kind in ("extend", "piece")  # the row's cache: the argument after the state, and returned

    def flat(pl, sl, *arrays):
      params, state = jax.tree.unflatten(ptree, pl), jax.tree.unflatten(self.state_tree, sl)
      if row:
        arrays = (jax.tree.unflatten(jax.tree.structure(state.cache), arrays[0]), *arrays[1:])
      state, *outs = fn(params, state, *arrays)
      if row:
        outs[0] = jax.tree.leaves(outs[0])
      return (jax.tree.leaves(state), *outs)

    return flat, [self._param_avals, self._state_avals, *args], (1, 2) if row else (1,)

  def _export_path(self, key: tuple) -> pathlib.Path:
    """The file of program `key`, named by everything that shapes it: the code, jax, the device,
    the model, the engine's settings, the rows and the parameters' shapes (the state's shapes follow
    from those, so a start need not know them to find its programs)."""
    h = hashlib.sha256()
    dev = jax.devices()[0]
    for part in (FORMAT, code_digest(), jax.__version__, dev.platform, dev.device_kind, repr(self.cfg)):
      h.update(repr(part).encode())
    h.update(repr((key, self.rows, self.steps, self.top_n, self.vocab_limit, self.eos_id)).encode())
    h.update(repr([(a.shape, str(a.dtype)) for a in self._param_avals]).encode())
    name = "-".join(str(k) for k in key)
    return pathlib.Path(self.export_dir) / f"{name}-{h.hexdigest()[:24]}.jaxexport"

  def _build_one(self, key: tuple, quick: bool = False):
    if self._cancelled.is_set():
      return None, None
    t0 = time.monotonic()
    try:
      return self._build(key, quick)
    finally:
      self.build_s[key] = time.monotonic() - t0

  def _build(self, key: tuple, quick: bool):
    fn, avals, donate = self._spec(key)
    options = {**self.compiler_options, **self.quick_options} if quick else self.compiler_options
    if self.export_dir is None:
      return self._compile(jax.jit(fn, donate_argnums=donate), avals, options), None
    path = self._export_path(key)
    how = "loaded"
    try:
      exp = jax.export.deserialize(bytearray(path.read_bytes()))
    except (OSError, ValueError) as e:  # absent (or unreadable: traced again and rewritten)
      if path.exists():
        log.warning("exported program %s unreadable (%s): tracing it again", path, e)
      exp = jax.export.export(jax.jit(fn, donate_argnums=donate))(*avals)
      path.parent.mkdir(parents=True, exist_ok=True)
      with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(exp.serialize())
      os.replace(f.name, path)  # atomic: servers sharing the directory never read half a file
      how = "exported"
    return self._compile(jax.jit(exp.call, donate_argnums=donate), avals, options), how

  def _compile(self, jitted, avals, options: dict):
    return jitted.lower(*avals).compile(compiler_options=options or None)

  def build(self, keys: list[tuple], threads: int = 4, quick: bool = False) -> float:
    """Builds every program in `keys` not built yet (or built only quick), each usable as soon as it
    is built; `quick`: with the platform's QUICK_OPTIONS (none: built as usual, once). Returns the
    seconds it took."""
    t0 = time.monotonic()
    quick = quick and bool(self.quick_options)
    todo = [k for k in dict.fromkeys(keys) if k not in self.compiled or (k in self.quick and not quick)]
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
      futures = {pool.submit(self._build_one, k, quick): k for k in todo}
      for done in concurrent.futures.as_completed(futures):
        compiled, how = done.result()
        if compiled is not None:
          key = futures[done]
          self.compiled[key] = compiled  # replaces a quick build: the next call takes the new one
          (self.quick.add if quick else self.quick.discard)(key)
          self._count(how)
    return time.monotonic() - t0

  def _count(self, how: str | None) -> None:
    self.loaded += how == "loaded"
    self.exported += how == "exported"

  def build_in_background(self, keys: list[tuple], threads: int = 4) -> None:
    """Builds `keys` (tuned; programs built quick among them again) on a background thread
    (`self.background`), each used from the moment it is built. A failed build is logged: the built
    programs keep serving its calls."""

    def run():
      t = self.build(keys, threads)
      if not self._cancelled.is_set():
        log.info(
          "all %d programs built (%d in the background, %.1fs): %s",
          len(self.compiled),
          len(keys),
          t,
          self.slowest(),
        )

    def guarded():
      try:
        run()
      except Exception:
        log.exception("building programs in the background failed; the built ones keep serving")

    self.background = threading.Thread(target=guarded, name="llm-programs", daemon=True)
    self.background.start()

  def slowest(self, n: int = 4) -> str:
    """The `n` programs that took longest to build (their last build), for the start-up log."""
    top = sorted(self.build_s.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{'-'.join(map(str, k))} {s:.1f}s" for k, s in top)

  def cancel(self) -> None:
    """Skips the background builds not started yet (the one compiling finishes)."""
    self._cancelled.set()

"""Chunked prefill: a prompt longer than the per-iteration prefill budget is written into its row a
piece per engine iteration, in the same device call as the rows decoding beside it; the row then
decodes exactly what a prompt prefilled whole decodes (greedy and seeded sampling with a repetition
penalty), and a request cancelled between pieces frees its row."""

import asyncio
import dataclasses
import functools

import jax
import numpy as np
import pytest
from tiny_package import SERVER_CFG, recompute, write_tiny_package

from llm_jax import generate as G
from llm_jax.model import default_levers, unstack_layers
from llm_jax.model.params import init_params
from llm_jax.serve.engine import Choice, Engine
from llm_jax.serve.prefill import admit_rows, extend_rows, pack_admission, unpack_chunk

CFG = dataclasses.replace(SERVER_CFG, vocab_size=320)
LONG = [2] + [40 + (7 * i) % 37 for i in range(19)]  # 20 tokens: pieces at 0, 8 and 12 (the last overlaps)
SHORT = [2, 11, 12]

pytestmark = pytest.mark.usefixtures("short_spans")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return write_tiny_package(tmp_path_factory.mktemp("pieces"), CFG)[1]


@pytest.fixture(scope="module")
def params():
  return init_params(CFG)


@pytest.fixture(scope="module")
def engine(params, tok):
  """Two rows, pieces of 8 tokens (the budget), the layout GPUs serve with (the one-array cache)."""
  eng = Engine(params, CFG, tok, slots=2, chunk=2, prefill_tokens=8, levers=default_levers(params, "gpu"))
  eng.warmup()
  eng.start()
  yield eng
  eng.stop()


def _recompute(params, prompt, n):
  """Greedy tokens by full forward passes of the plain model (no cache)."""
  return recompute(params, CFG, prompt, n)


async def _collect(queue):
  """(tokens, finish reason) of a request's events."""
  tokens, reason = [], None
  while True:
    ev = await asyncio.wait_for(queue.get(), timeout=30)
    if ev[0] == "delta":
      tokens += ev[3]
    elif ev[0] == "done":
      reason = ev[2]
    elif ev[0] == "end":
      return tokens, reason


def _run(engine, requests):
  """Submits (prompt, SamplingParams) requests together, under the engine's lock, so that its thread
  sees them in one iteration however busy the machine (submitted one after another's first token, a
  busy machine could finish the first before the next one's pieces ran: seen, two tests); returns
  each one's tokens and finish reason."""

  async def go():
    loop = asyncio.get_running_loop()
    queues = [asyncio.Queue() for _ in requests]
    with engine._cond:
      for (prompt, sp), q in zip(requests, queues, strict=True):
        engine.submit([Choice(0, list(prompt), sp)], loop, q, 30.0)
    return [await _collect(q) for q in queues]

  return asyncio.run(go())


def _greedy(n):
  return G.SamplingParams(temperature=0.0, max_new_tokens=n)


def test_program_set(engine):
  """Prompts of up to a piece are admitted whole (widths up to 8 only); a longer one goes in pieces:
  a piece alone, or after a decode chunk at each row bucket (filtering with top log-probs at all
  rows). With the budget at the cache's length nothing is prefilled in pieces."""
  assert engine.piece == 8 and engine.prefill_buckets() == [8]
  keys = engine.program_keys()
  assert {k for k in keys if k[0] in ("extend", "piece")} == {
    ("extend", 8),
    ("piece", 2, False, False, 8),
    ("piece", 2, True, True, 8),
  }
  assert ("extend", 8) in engine.core_keys()
  whole = Engine.__new__(Engine)
  whole.prefill_tokens, whole.cfg = 32, CFG
  assert whole.piece_tokens() == 0


def test_a_piece_copies_no_batch_cache(engine):
  """The piece program reads and writes one row, not the batch: its compiled code holds no copy of
  the whole batch cache (the one-array layout; with the row read from the donated batch cache XLA
  copied all of it twice per piece)."""
  shapes = {"[" + ",".join(map(str, x.shape)) + "]" for x in engine.state if x.ndim >= 4}
  text = engine.programs.compiled[("extend", 8)].as_text()
  copies = [line for line in text.splitlines() if " copy(" in line and any(s in line for s in shapes)]
  assert shapes and not copies, copies


def test_long_prompt_decodes_as_full_recomputation_beside_a_decoding_row(engine, params):
  """A row decodes while a 20-token prompt is prefilled in three pieces (each in the decode chunk's
  call); both then decode the tokens full recomputation gives."""
  before = engine.programs.calls.copy()
  out = _run(engine, [(SHORT, _greedy(24)), (LONG, _greedy(10))])
  used = engine.programs.calls - before
  assert out == [(_recompute(params, SHORT, 24), "length"), (_recompute(params, LONG, 10), "length")]
  shared = sum(n for k, n in used.items() if k[0] == "piece")
  assert shared + used[("extend", 8)] == 3  # one call per piece
  assert shared >= 2  # the row decoding shared them (the first may precede its first chunk)


def test_a_pieces_first_token_is_read_after_the_next_dispatch(engine, monkeypatch):
  """The last piece's first token is an output of the call that holds the chunk too: it is read
  after the engine's next call is dispatched, as a chunk's outputs are. Read at once it held the
  engine thread until that whole call ended, with nothing queued behind it (seen on an H200 with a
  1B model: the rows decoding beside a prompt in two pieces waited 76 ms for a chunk, against 54 ms
  beside the prompt prefilled whole; docs/serving.md)."""
  log, run, handle = [], engine.programs.run, Engine._handle_outputs

  def logged(key, *a, **k):
    log.append(key[0])
    return run(key, *a, **k)

  def handled(self, packed, owners, steps=None):
    if steps == 1 and any(e is not None and e[1].prompt_ids == LONG for e in owners):
      log.append("first token")
    return handle(self, packed, owners, steps)

  monkeypatch.setattr(engine.programs, "run", logged)
  monkeypatch.setattr(Engine, "_handle_outputs", handled)
  _run(engine, [(SHORT, _greedy(24)), (LONG, _greedy(4))])
  first = log.index("first token")
  last_piece = max(i for i, kind in enumerate(log[:first]) if kind in ("piece", "extend"))
  assert log[last_piece] == "piece"  # shared with the decoding row's chunk
  assert first > last_piece + 1, log[last_piece:first]  # another call dispatched before it is read


def test_sampled_long_prompt_equals_the_prompt_prefilled_whole(engine):
  """Seeded sampling with a repetition penalty after pieces: the tokens generate() draws for the
  prompt prefilled whole (the penalty sees every piece's tokens)."""
  sp = G.SamplingParams(temperature=0.9, repetition_penalty=1.5, max_new_tokens=10, seed=7)
  [(tokens, reason)] = _run(engine, [(LONG, sp)])
  [want] = G.generate(engine.params, engine.cfg, [LONG], sp, vocab_limit=engine.vocab_limit)
  assert (tokens, reason) == (want.tokens, want.finish_reason)


def test_cancel_between_pieces_frees_the_row(engine, params, monkeypatch):
  """A request cancelled after its first piece ends "cancelled" with no more pieces run; its row
  is free and the next long prompt in it decodes as full recomputation."""
  handles = []
  pieced = Engine._pieced

  def cancel_after_first(self, piece, first):
    pieced(self, piece, first)
    if handles and not handles[0].cancelled.is_set():
      handles[0].cancel()

  async def go():
    loop, q = asyncio.get_running_loop(), asyncio.Queue()
    handles.append(engine.submit([Choice(0, list(LONG), _greedy(5))], loop, q, 30.0))
    return await _collect(q)

  before = engine.programs.calls.copy()
  monkeypatch.setattr(Engine, "_pieced", cancel_after_first)
  assert asyncio.run(go()) == ([], "cancelled")
  monkeypatch.undo()
  used = engine.programs.calls - before
  assert sum(n for k, n in used.items() if k[0] in ("extend", "piece")) == 1
  assert engine._slot == [None, None] and engine._in_pieces() is None
  assert _run(engine, [(LONG[::-1], _greedy(6))]) == [(_recompute(params, LONG[::-1], 6), "length")]


@pytest.mark.parametrize("levers", ["", "qkv,norm", "qkv,norm,kv"])
def test_pieces_write_what_one_prefill_writes(params, levers):
  """Three pieces into a row a shorter prompt used before leave what one whole prefill leaves: the
  same cache over the prompt, next logits, position, first token and repetition record (the earlier
  pieces' tokens, not the row's previous prompt's). Each cache layout the engine serves with."""
  p, cfg = unstack_layers(params, CFG, levers=levers)
  admit = jax.jit(functools.partial(admit_rows, cfg=cfg, top_n=5, vocab_limit=300))
  extend = jax.jit(functools.partial(extend_rows, cfg=cfg, top_n=5, vocab_limit=300))
  sp = G.SamplingParams(temperature=0.9, repetition_penalty=1.5, max_new_tokens=5, seed=3)
  arrays, row = G.sampling_arrays([sp]), np.array([1], np.int32)

  def pack(prompt, width, arrays, offset=0):
    tokens = np.zeros((1, width), np.int32)
    tokens[0, : len(prompt)] = prompt
    return pack_admission(row, tokens, np.array([len(prompt)], np.int32), arrays, np.array([offset]))

  state = G.empty_state(cfg, 2, p)
  state, _ = admit(p, state, pack([2, 200, 201, 202, 203], 8, arrays))  # the row's previous prompt
  whole, first_whole = admit(p, state, pack(LONG, 32, arrays))
  none = {**arrays, "max_new_B": np.zeros_like(arrays["max_new_B"])}
  cache = jax.tree.map(
    lambda x: np.take(np.asarray(x), [1], x.ndim - 4), state.cache
  )  # the previous prompt's
  for offset, a in ((0, none), (8, none), (12, arrays)):
    state, cache, first = extend(p, state, cache, pack(LONG[offset : offset + 8], 8, a, offset))
  got, want = unpack_chunk(np.asarray(first), 1), unpack_chunk(np.asarray(first_whole), 1)
  for name in ("token", "emitted", "eos", "active", "top_ids"):
    assert np.array_equal(got[name], want[name]), name
  np.testing.assert_allclose(got["top_logprobs"], want["top_logprobs"], atol=1e-5)
  for name in ("positions_B", "active_B", "remaining_B", "pending_B", "seen_BV", "next_B"):
    assert np.array_equal(getattr(state, name)[1], getattr(whole, name)[1]), name
  np.testing.assert_allclose(state.logits_BV[1], whole.logits_BV[1], atol=1e-4)
  for got, want in zip(jax.tree.leaves(state.cache), jax.tree.leaves(whole.cache), strict=True):
    axis = got.ndim - 4
    got, want = np.take(np.asarray(got), 1, axis), np.take(np.asarray(want), 1, axis)
    np.testing.assert_allclose(got[..., : len(LONG), :], want[..., : len(LONG), :], atol=1e-5)

"""The engine without HTTP: decode calls sized to the busy rows (row buckets, busy rows compacted),
waiting prompts prefilled together, and programs kept across starts with jax.export."""

import asyncio
import time

import jax
import numpy as np
import pytest
from tiny_package import write_tiny_package

from llm_jax import generate as G
from llm_jax.model import Decoder, ModelConfig
from llm_jax.model.params import init_params
from llm_jax.serve.engine import Choice, Engine

CFG = ModelConfig(
  vocab_size=320,
  num_layers=1,
  d_model=32,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  mlp_dim=64,
  max_seq_len=32,
  init_std=0.3,
)
PROMPTS = [[2, 11, 12], [2, 30, 31, 32, 33, 34], [2, 50], [2, 7, 8, 9]]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return write_tiny_package(tmp_path_factory.mktemp("engine"), CFG)[1]


@pytest.fixture(scope="module")
def params():
  return init_params(CFG)


def _engine(params, tok, **kw):
  eng = Engine(params, CFG, tok, slots=8, chunk=2, **kw)
  eng.warmup()
  return eng


@pytest.fixture(scope="module")
def engine(params, tok):
  eng = _engine(params, tok)
  eng.start()
  yield eng
  eng.stop()


def _run(engine, requests, paused=True):
  """Submits (prompt, max_new_tokens) requests (all before decoding starts when `paused`); returns
  each one's tokens and finish reason."""

  async def go():
    loop = asyncio.get_running_loop()
    queues = []
    for prompt, n in requests:
      q = asyncio.Queue()
      sp = G.SamplingParams(temperature=0.0, max_new_tokens=n)
      engine.submit([Choice(0, list(prompt), sp)], loop, q, 30.0)
      queues.append(q)
    engine.resume()
    out = []
    for q in queues:
      tokens, reason = [], None
      while True:
        ev = await asyncio.wait_for(q.get(), timeout=30)
        if ev[0] == "delta":
          tokens += ev[3]
        elif ev[0] == "done":
          reason = ev[2]
        elif ev[0] == "end":
          break
      out.append((tokens, reason))
    return out

  if paused:
    engine.pause()
  try:
    return asyncio.run(go())
  finally:
    engine.resume()


def _recompute(params, prompt, n):
  """Greedy tokens by full forward passes of the plain model (no cache)."""
  fwd = jax.jit(lambda p, t: Decoder(CFG).apply({"params": p}, t))
  seq, new = list(prompt), []
  for _ in range(n):
    padded = np.zeros((1, CFG.max_seq_len), np.int32)
    padded[0, : len(seq)] = seq
    t = int(np.argmax(np.asarray(fwd(params, padded))[0, len(seq) - 1, :300]))
    if t == G.EOS_ID:
      break
    new.append(t)
    seq.append(t)
  return new


def test_program_set(engine):
  assert engine.row_buckets() == [2, 8]
  assert engine.admit_counts(32) == [1, 4, 8]
  assert sorted(engine.programs.compiled, key=str) == sorted(engine.program_keys(), key=str)


def test_one_request_runs_the_two_row_program(engine, params):
  """A lone request decodes in the 2-row program (the cost of a batch of two, not of all slots),
  and its tokens are those of full recomputation."""
  before = engine.programs.calls.copy()
  [(tokens, reason)] = _run(engine, [(PROMPTS[1], 10)], paused=False)
  used = engine.programs.calls - before
  assert {k[1] for k in used if k[0] == "decode"} == {2}
  assert tokens == _recompute(params, PROMPTS[1], 10)
  assert reason == "length" or len(tokens) < 10


def test_busy_rows_compacted_and_prompts_admitted_together(engine, params):
  """Four waiting prompts are prefilled in one call (padded to four); when the short ones end, the
  others move down to the lowest rows and decode in the 2-row program; every request's tokens
  equal its own full recomputation."""
  requests = [(PROMPTS[0], 2), (PROMPTS[1], 14), (PROMPTS[2], 4), (PROMPTS[3], 12)]
  before = engine.programs.calls.copy()
  out = _run(engine, requests)
  used = engine.programs.calls - before
  assert used["admit", 32, 4] == 1 and not any(k[0] == "admit" and k[2] != 4 for k in used)
  assert used["move",] >= 1
  decode_rows = [k[1] for k in used if k[0] == "decode"]
  assert set(decode_rows) == {2, 8}
  for (prompt, n), (tokens, _) in zip(requests, out, strict=True):
    assert tokens == _recompute(params, prompt, n)
  assert engine.busy_slots == 0 and engine.in_flight == 0


def test_exported_programs_are_read_back(params, tok, tmp_path):
  """A second engine on the same export directory reads every program instead of tracing it, and
  decodes the same tokens."""
  first = _engine(params, tok, export_dir=str(tmp_path))
  n = len(first.program_keys())
  assert (first.programs.exported, first.programs.loaded) == (n, 0)
  assert len(list(tmp_path.glob("*.jaxexport"))) == n
  t0 = time.monotonic()
  second = _engine(params, tok, export_dir=str(tmp_path))
  assert (second.programs.exported, second.programs.loaded) == (0, n)
  assert time.monotonic() - t0 < 60
  second.start()
  try:
    [(tokens, _)] = _run(second, [(PROMPTS[0], 8)], paused=False)
  finally:
    second.stop()
  assert tokens == _recompute(params, PROMPTS[0], 8)

"""The engine without HTTP: decode calls sized to the busy rows (row buckets, busy rows compacted),
waiting prompts prefilled together, programs kept across starts with jax.export, and the decode
levers' parameter layout serving decoding, admission and prompt scoring."""

import asyncio
import contextlib
import dataclasses
import re
import time
import types

import jax
import numpy as np
import pytest
from tiny_package import SERVER_CFG, forward, recompute, write_tiny_package

from llm_jax import generate as G
from llm_jax.eval.decode_kernels import _computations, _opcode
from llm_jax.model import Decoder, default_levers, quantize, unstack_layers
from llm_jax.model.params import init_params
from llm_jax.serve import loading
from llm_jax.serve.engine import Choice, Engine
from llm_jax.serve.prefill import ADMIT_COLUMNS, pack_admission, prompt_scores, unpack_admission
from llm_jax.serve.programs import Programs
from llm_jax.serve.settings import ServerSettings

CFG = dataclasses.replace(SERVER_CFG, vocab_size=320)
PROMPTS = [[2, 11, 12], [2, 30, 31, 32, 33, 34], [2, 50], [2, 7, 8, 9]]


pytestmark = pytest.mark.usefixtures("short_spans")  # spans of 8 and 16 of 32 positions (conftest)


@pytest.fixture(scope="module")
def tiny_pkg(tmp_path_factory):
  return write_tiny_package(tmp_path_factory.mktemp("engine"), CFG)


@pytest.fixture(scope="module")
def tok(tiny_pkg):
  return tiny_pkg[1]


@pytest.fixture(scope="module")
def params():
  return init_params(CFG)


def _engine(params, tok, **kw):
  """A built engine in the layout GPUs serve with (default_levers(params, "gpu"): the one-array
  cache of "kv" too); the CPU's own default is what the server tests run."""
  kw.setdefault("levers", default_levers(params, "gpu"))
  kw.setdefault("slots", 8)
  eng = Engine(params, CFG, tok, chunk=2, **kw)
  eng.warmup()
  return eng


@pytest.fixture(scope="module")
def engine(params, tok):
  eng = _engine(params, tok)
  eng.start()
  yield eng
  eng.stop()


def _run(engine, requests, paused=True, logprobs=False):
  """Submits (prompt, max_new_tokens[, SamplingParams[, top log-probs wanted]]) requests (when
  `paused`, all queued before the engine admits any, and decoding held until then); returns each
  one's tokens and finish reason (and with `logprobs` its tokens' log-probs and top log-probs)."""

  async def go():
    loop = asyncio.get_running_loop()
    queues = []
    # A paused engine still admits waiting prompts, as soon as one is queued: holding its lock (the
    # decode thread's) while submitting queues them all before it looks, however busy the machine.
    with engine._cond if paused else contextlib.nullcontext():
      for prompt, n, *more in requests:
        q = asyncio.Queue()
        sp = more[0] if more else G.SamplingParams(temperature=0.0, max_new_tokens=n)
        choice = Choice(0, list(prompt), sp, top_n=more[1] if len(more) > 1 else 0)
        engine.submit([choice], loop, q, 30.0)
        queues.append(q)
    engine.resume()
    out = []
    for q in queues:
      tokens, reason, lps, top = [], None, [], []
      while True:
        ev = await asyncio.wait_for(q.get(), timeout=30)
        if ev[0] == "delta":
          tokens, lps, top = tokens + ev[3], lps + ev[4], top + ev[5]
        elif ev[0] == "done":
          reason = ev[2]
        elif ev[0] == "end":
          break
      out.append((tokens, reason, lps, top) if logprobs else (tokens, reason))
    return out

  if paused:
    engine.pause()
  try:
    return asyncio.run(go())
  finally:
    engine.resume()


def _run_once(engine, requests):
  """Starts a warmed-up engine, runs `requests` (as `_run`, unpaused) and stops it."""
  engine.start()
  try:
    return _run(engine, requests, paused=False)
  finally:
    engine.stop()


def _recompute(params, prompt, n):
  """Greedy tokens by full forward passes of the plain model (no cache)."""
  return recompute(params, CFG, prompt, n)


def test_program_set(engine):
  """Spans for the all-rows and the fewest-rows buckets only; filtering or top log-probs over the
  whole cache only, both at all rows only; two prompt counts per width (1 and the budget's most)."""
  assert engine.row_buckets() == [2, 8]
  assert engine.admit_counts(32) == [1, 8]
  assert engine.admit_counts(512) == [1, 2]
  assert engine.admit_counts(1024) == [1]
  keys = [("decode", 2, s, False, False) for s in (8, 16, 0)]
  keys += [("decode", 8, s, False, False) for s in (8, 16, 0)]
  keys += [("decode", 2, 0, True, False), ("decode", 2, 0, False, True)]
  keys += [("decode", 8, 0, True, False), ("decode", 8, 0, False, True), ("decode", 8, 0, True, True)]
  keys += [("admit", 32, 1), ("admit", 32, 8), ("move",)]
  assert engine.program_keys() == keys
  assert sorted(engine.programs.compiled, key=str) == sorted(keys, key=str)


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
  """Four waiting prompts are prefilled in one call (padded to the budget's most, eight); when the
  short ones end, the others move down to the lowest rows and decode in the 2-row programs (over the
  cache span they reach); every request's tokens equal its own full recomputation."""
  requests = [(PROMPTS[0], 2), (PROMPTS[1], 14), (PROMPTS[2], 4), (PROMPTS[3], 12)]
  before = engine.programs.calls.copy()
  out = _run(engine, requests)
  used = engine.programs.calls - before
  assert used["admit", 32, 8] == 1 and not any(k[0] == "admit" and k[2] != 8 for k in used)
  assert used["move",] >= 1
  decode_keys = {k for k in used if k[0] == "decode"}
  assert {k[1] for k in decode_keys} == {2, 8}
  assert ("decode", 2, 16, False, False) in decode_keys  # the 2-row chunks read the span their rows reach
  assert not any(k[3] or k[4] for k in decode_keys)  # greedy, no log-probs wanted: no sort, no top-k
  # the all-rows program reads the span its rows reach: positions up to 6 + 1 + 2 (prompt, the first
  # token drawn at admission, a chunk of two) are within 16 of the 32 cached positions
  assert ("decode", 8, 16, False, False) in decode_keys
  for (prompt, n), (tokens, _) in zip(requests, out, strict=True):
    assert tokens == _recompute(params, prompt, n)
  assert engine.busy_slots == 0 and engine.in_flight == 0


def test_an_idle_engine_runs_each_program_once(engine, params):
  """While idle the engine runs every built program once (a first run on a GPU loads it: no request
  waits for that), uncounted in `calls`, and requests decode exactly as before."""
  calls = engine.programs.calls.copy()
  deadline = time.monotonic() + 120
  while engine.programs.unwarmed() is not None and time.monotonic() < deadline:
    time.sleep(0.05)
  assert engine.programs.unwarmed() is None and engine.programs.calls == calls
  assert all(engine.programs.warmed[k] is c for k, c in engine.programs.compiled.items())
  assert engine.programs_warm() == engine.programs_built()[1] == len(engine.programs.compiled)
  requests = [(PROMPTS[0], 6), (PROMPTS[2], 9)]
  out = _run(engine, requests)
  for (prompt, n), (tokens, _) in zip(requests, out, strict=True):
    assert tokens == _recompute(params, prompt, n)


def test_the_cpu_decode_step_keeps_the_cache_in_place(params):
  """On a CPU the engine's layout (default_levers) leaves XLA nothing to copy per decode step: with
  the "kv" lever's one-array cache, XLA's CPU compiler copied the whole cache every step (2-layer
  gpt_small shapes, batch 8: 202 against 371 tokens/s). Seen failing before the fix."""
  assert default_levers(params, "gpu") == "qkv,norm,kv" and default_levers(params, "cpu") == "qkv,norm"
  p, cfg = unstack_layers(params, CFG, levers=default_levers(params))
  state = G.empty_state(cfg, 8)
  cache_shapes = {tuple(x.shape) for x in jax.tree.leaves(state.cache)}
  hlo = (
    G.decode_chunk.lower(p, state, np.ones(8, bool), np.bool_(False), cfg=cfg, steps=2, top_n=5)
    .compile()
    .as_text()
  )
  comps = _computations(hlo)
  body = max((comps[b] for b in re.findall(r"\bwhile\(.*?body=%?([\w.\-]+)", hlo)), key=len)
  copies = [line for line in body.splitlines() if _opcode(line) == "copy"]
  shapes = [tuple(int(d) for d in line.split("[", 1)[1].split("]")[0].split(",") if d) for line in copies]
  assert not [s for s in shapes if s in cache_shapes], copies


def test_no_program_waits_for_the_device_to_choose(engine):
  """No engine program has a conditional: XLA runs one by copying its predicate to the host and
  waiting for it, so the call returns only when the work before it is done (on an H200 an admission
  call took 2 ms of host time, the prefill's, before the decode chunk behind it could be dispatched:
  2 of the 5 ms to a lone request's first token). Admission draws with filters and top log-probs for
  every prompt; which decode program filters or computes top log-probs the host chooses. Seen failing
  before the change (the admission programs had two conditionals, the decode chunks one a step)."""
  for key, compiled in engine.programs.compiled.items():
    assert not re.search(r"\bconditional\(", compiled.as_text()), key


def test_top_p_rows_decode_in_a_filtering_program(engine):
  """A chunk sorts the vocabulary (a program that filters) only while a live row sets top-k/top-p,
  and a row without filters draws the same tokens in either kind of program (same seed, alone or
  beside a top-p row): the choice of program never changes a request's output."""
  plain = G.SamplingParams(temperature=0.9, max_new_tokens=12, seed=5)
  nucleus = G.SamplingParams(temperature=0.9, top_p=0.5, max_new_tokens=12, seed=6)
  before = engine.programs.calls.copy()
  [(alone, _)] = _run(engine, [(PROMPTS[1], 12, plain)])
  used = engine.programs.calls - before
  assert {k[3] for k in used if k[0] == "decode"} == {False}
  before = engine.programs.calls.copy()
  [(beside, _), (filtered, _)] = _run(engine, [(PROMPTS[1], 12, plain), (PROMPTS[2], 12, nucleus)])
  used = engine.programs.calls - before
  assert ("decode", 2, 0, True, False) in used
  assert beside == alone and len(alone) > 0 and len(filtered) > 0


def test_top_logprob_rows_decode_in_a_top_program(engine):
  """A chunk computes top log-probs (a program with them) only while a live row asks for them; a row
  that does not draws the same tokens with the same log-probs in either kind of program, and the
  asking row's top log-probs are in order, its greedy token's log-prob the first of them."""
  plain = G.SamplingParams(temperature=0.9, max_new_tokens=12, seed=5)
  greedy = G.SamplingParams(temperature=0.0, max_new_tokens=12)
  before = engine.programs.calls.copy()
  [(alone, _, alone_lps, _)] = _run(engine, [(PROMPTS[1], 12, plain)], logprobs=True)
  used = engine.programs.calls - before
  assert {k[4] for k in used if k[0] == "decode"} == {False}
  before = engine.programs.calls.copy()
  [(beside, _, beside_lps, _), (tokens, _, lps, top)] = _run(
    engine, [(PROMPTS[1], 12, plain), (PROMPTS[2], 12, greedy, 3)], logprobs=True
  )
  used = engine.programs.calls - before
  assert ("decode", 2, 0, False, True) in used
  assert beside == alone and len(alone) > 1
  np.testing.assert_allclose(beside_lps, alone_lps, rtol=0, atol=1e-5)
  assert len(tokens) > 1 and len(top) == len(tokens) == len(lps)
  for t, lp, best in zip(tokens, lps, top, strict=True):
    assert len(best) == 3 and best[0][0] == t and abs(best[0][1] - lp) < 1e-5
    assert best[0][1] >= best[1][1] >= best[2][1]


def test_rows_move_only_when_the_bucket_shrinks(engine, params):
  """Five rows busy (bucket 8): as the first ones end nothing moves while four or three remain (still
  bucket 8; a move would be a device call for nothing); when two remain, the one above row 1 moves
  down, once, and they finish in the 2-row program. Tokens equal full recomputation."""
  requests = [(PROMPTS[0], 14), (PROMPTS[1], 2), (PROMPTS[2], 12), (PROMPTS[3], 10), (PROMPTS[0], 8)]
  lengths = [len(_recompute(params, p, n)) for p, n in requests]
  assert lengths == [14, 2, 12, 10, 8]  # no early EOS: the order rows end in is the one above
  before = engine.programs.calls.copy()
  out = _run(engine, requests)
  used = engine.programs.calls - before
  assert used["move",] == 1
  assert ("decode", 2, 0, False, False) in used
  for (prompt, n), (tokens, _) in zip(requests, out, strict=True):
    assert tokens == _recompute(params, prompt, n)


def test_exported_programs_are_read_back(params, tok, tmp_path, monkeypatch):
  """A second engine on the same export directory reads every program (and the one making its
  empty state) instead of tracing it: its start runs no trace of the model. It decodes the same
  tokens (2 slots: fewer programs to build twice)."""
  first = _engine(params, tok, export_dir=str(tmp_path), slots=2)
  n = len(first.program_keys()) + 1  # and ("state",)
  assert (first.programs.exported, first.programs.loaded) == (n, 0)
  assert len(list(tmp_path.glob("*.jaxexport"))) == n

  def traced(*args, **kwargs):
    raise AssertionError("the model was traced")

  with monkeypatch.context() as m:
    m.setattr(Decoder, "__call__", traced)
    t0 = time.monotonic()
    second = _engine(params, tok, export_dir=str(tmp_path), slots=2)
    assert time.monotonic() - t0 < 60
  assert (second.programs.exported, second.programs.loaded) == (0, n)
  [(tokens, _)] = _run_once(second, [(PROMPTS[0], 8)])
  assert tokens == _recompute(params, PROMPTS[0], 8)


def test_engine_decodes_with_the_levers(engine, params):
  """The engine keeps one parameter tree, laid out for the decode levers "qkv,norm,kv" (one cache
  for every layer's keys and values); its tokens equal the plain model's recomputation (the tests
  above) and its prompt scores (echo, logprobs) those of the plain full-sequence model."""
  assert engine.cfg.decode_levers == "qkv,norm,kv"
  block = engine.params["block_0"]
  assert "qkv_kernel" in block["attn"] and "query" not in block["attn"] and "norm_attn" not in block
  [cache] = jax.tree.leaves(jax.tree.unflatten(engine.programs.state_tree, engine.state).cache)
  assert cache.shape == (1, 2, 8, 2, 32, 8)  # [layers, 2, B, K, S, H]
  prompt = PROMPTS[1] + [40, 41, 42]
  tokens = np.zeros((1, 16), np.int32)
  tokens[0, : len(prompt)] = prompt
  lps, top_lp, top_ids = (
    np.asarray(x) for x in prompt_scores(engine.params, tokens, cfg=engine.cfg, top_n=5, vocab_limit=300)
  )
  logits = np.array(forward(params, tokens, CFG))[0, :-1]
  logits[:, 300:] = -np.inf
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  want = logp[np.arange(15), tokens[0, 1:]]
  np.testing.assert_allclose(lps[: len(prompt) - 1], want[: len(prompt) - 1], atol=2e-5)
  np.testing.assert_allclose(top_lp, np.sort(logp, axis=-1)[:, ::-1][:, :5], atol=2e-5)
  assert (top_ids[:, 0] == np.argmax(logp, axis=-1)).all()


def test_int8_engine_levers(params, tok):
  """int8 weights kept in memory decode with "qkv,kv" ("norm" needs float kernels): the int8 values
  and scales are concatenated, and the tokens equal the dequantized model's recomputation."""
  q = quantize.quantize_params(params)
  assert default_levers(q, "cpu") == "qkv"  # and without "kv" on a CPU (the cache copy, above)
  eng = Engine(q, CFG, tok, slots=2, chunk=2, levers=default_levers(q, "gpu"))
  assert eng.cfg.decode_levers == "qkv,kv"
  assert quantize.is_qtensor(eng.params["block_0"]["attn"]["qkv_kernel"])
  eng.warmup()
  [(tokens, _)] = _run_once(eng, [(PROMPTS[3], 8)])
  assert tokens == _recompute(quantize.dequantize(q), PROMPTS[3], 8)


def test_first_token_comes_from_the_admission_call(engine, params):
  """Admission draws each prompt's first token: a one-token request is answered without any decode
  chunk, and longer ones continue from it with the same tokens as full recomputation."""
  before = engine.programs.calls.copy()
  out = _run(engine, [(PROMPTS[0], 1), (PROMPTS[3], 1)])
  used = engine.programs.calls - before
  assert not any(k[0] == "decode" for k in used)
  assert [tokens for tokens, _ in out] == [_recompute(params, p, 1) for p in (PROMPTS[0], PROMPTS[3])]
  assert [reason for _, reason in out] == ["length", "length"]


def test_admission_values_travel_in_one_array_bit_for_bit():
  """An admission's rows, offsets, lengths, sampling values and tokens go to the device as one int32
  array (one copy) and come back out of it unchanged: seeds past 2**31 and float values bit for bit."""
  sampling = [
    G.SamplingParams(seed=2**32 - 5, temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=9),
    G.SamplingParams(seed=3, temperature=1e-3, repetition_penalty=1.3),
  ]
  arrays = G.sampling_arrays(sampling)
  rows, lengths = np.array([4, 32], np.int32), np.array([3, 1], np.int32)
  tokens = np.array([[2, 11, 12, 0], [2, 0, 0, 0]], np.int32)
  offsets = np.array([0, 24], np.int32)
  packed = pack_admission(rows, tokens, lengths, arrays, offsets)
  assert packed.shape == (2, len(ADMIT_COLUMNS) + 4) and packed.dtype == np.int32
  got = jax.jit(unpack_admission)(packed)
  want = [rows, offsets, lengths, *arrays.values(), tokens]
  assert list(ADMIT_COLUMNS)[3:] == list(arrays)  # the order generate._start takes them in
  for g, w in zip(got, want, strict=True):
    assert g.dtype == w.dtype and np.array_equal(np.asarray(g), w)


class _OtherEos:
  """The test tokenizer with another end-of-sequence id (a Hugging Face tokenizer's, e.g. GPT-2's)."""

  def __init__(self, tok, eos_id):
    self._tok, self.eos_id = tok, eos_id

  def __getattr__(self, name):
    return getattr(self._tok, name)


def test_rows_stop_at_the_tokenizers_eos(params, tok):
  """A row stops at the tokenizer's own EOS id, not at 2 (seen failing before: the engine decoded with
  generate's default EOS 2, so a GPT-2-tokenizer model ran past <|endoftext|>)."""
  greedy = _recompute(params, PROMPTS[1], 10)
  assert len(greedy) == 10
  eos = greedy[3]
  cut = greedy.index(eos)  # its first occurrence
  eng = Engine(params, CFG, _OtherEos(tok, eos), slots=2, chunk=2)
  eng.warmup()
  [(tokens, reason)] = _run_once(eng, [(PROMPTS[1], 10)])
  assert reason == "stop"
  assert tokens == greedy[: cut + 1]  # the EOS is listed (with its log-prob, no text), as vLLM lists it


def test_programs_built_from_the_described_shapes(tiny_pkg, tok):
  """Start-up builds the programs from the shapes the package describes while the weights load: the
  loaded, laid-out weights have exactly those shapes (attach accepts them, and the engine decodes
  with them); weights of other shapes are refused, so the server builds from the weights instead."""
  settings = ServerSettings(package=str(tiny_pkg[0]))
  params, cfg, shape_tok = loading.served_shapes(settings)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
  loaded, _, _ = loading.load_and_lay_out(settings)
  eng = Engine(params, cfg, shape_tok, slots=2, chunk=2)
  eng.warmup()
  eng.attach(loaded.params, loaded.model_config)
  [(tokens, _)] = _run_once(eng, [(PROMPTS[2], 6)])
  assert tokens == _recompute(init_params(CFG), PROMPTS[2], 6)
  other = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), loaded.params)
  with pytest.raises(ValueError, match="shapes or dtypes differ"):
    eng.attach(other, loaded.model_config)


def test_covering_program_choice():
  """While programs build, a call runs in the cheapest built program that covers it: more rows, a
  longer span (0, the whole cache, covers any), a wider prompt; the exact program once built."""
  full = ("decode", 8, 0, True, True)
  built = types.SimpleNamespace(cfg=CFG, compiled=dict.fromkeys([full, ("admit", 32, 1), ("move",)]))
  assert Programs.decode_key(built, 2, 0, False) == full
  assert Programs.decode_key(built, 8, 16, True) == full
  assert Programs.decode_key(built, 2, 16, False, True) == full
  assert Programs.admit_key(built, 16, 4) == ("admit", 32, 1)  # the caller admits one per call
  more = [("decode", 8, 16, False, False), ("decode", 2, 0, False, False), ("decode", 2, 0, False, True)]
  built.compiled.update(dict.fromkeys([*more, ("admit", 16, 4), ("admit", 32, 8)]))
  assert Programs.decode_key(built, 8, 8, False) == ("decode", 8, 16, False, False)
  assert Programs.decode_key(built, 8, 8, True) == full  # only a filtering one
  assert Programs.decode_key(built, 8, 0, False) == full
  assert Programs.decode_key(built, 2, 0, False) == ("decode", 2, 0, False, False)
  assert Programs.decode_key(built, 2, 8, False, True) == ("decode", 2, 0, False, True)  # top: no span
  assert Programs.decode_key(built, 2, 8, True, False) == full
  built.compiled[("decode", 8, 0, False, False)] = None
  assert Programs.decode_key(built, 8, 0, False) == ("decode", 8, 0, False, False)  # the cheaper of two
  assert Programs.admit_key(built, 16, 4) == ("admit", 16, 4)
  assert Programs.admit_key(built, 16, 2) == ("admit", 16, 4)
  assert Programs.admit_key(built, 16, 8) == ("admit", 32, 8)
  with pytest.raises(KeyError, match="prompts of 64 tokens"):
    Programs.admit_key(built, 64, 1)


def test_serves_while_the_programs_build(params, tok, monkeypatch):
  """`serve_while_building`: warmup builds only the programs that cover every call (all rows over the
  whole cache, one prompt of the widest width, the move), quick, and the engine answers with them
  (four waiting prompts in four one-prompt calls, every chunk in the all-rows program) with the tokens
  of full recomputation; once every program is built tuned in the background (those three again),
  calls use the exact programs."""
  held = []
  monkeypatch.setattr(Programs, "build_in_background", lambda self, keys, threads=4: held.append(keys))
  # the module engine's layout: its tuned programs are the ones built here again (the compilation
  # cache's, not a second compile of each)
  eng = _engine(params, tok, serve_while_building=True)
  core = [("decode", 8, 0, True, True), ("admit", 32, 1), ("move",)]
  assert eng.core_keys() == core and set(eng.programs.compiled) == set(core)
  assert eng.programs.quick == set(core)  # built without GEMM autotuning, to be built again tuned
  assert eng.programs_built() == (0, 14) and sorted(held[0], key=str) == sorted(eng.program_keys(), key=str)
  requests = [(PROMPTS[0], 2), (PROMPTS[1], 14), (PROMPTS[2], 4), (PROMPTS[3], 12)]
  eng.start()
  try:
    out = _run(eng, requests)
    assert dict(eng.programs.calls)[("admit", 32, 1)] == 4
    assert {k for k in eng.programs.calls if k[0] == "decode"} == {core[0]}
    for (prompt, n), (tokens, _) in zip(requests, out, strict=True):
      assert tokens == _recompute(params, prompt, n)
    monkeypatch.undo()
    eng.programs.build_in_background(held[0], threads=2)
    eng.programs.background.join(timeout=300)
    assert eng.programs_built() == (14, 14) and not eng.programs.quick
    before = eng.programs.calls.copy()
    out = _run(eng, requests)
    used = eng.programs.calls - before
    assert used["admit", 32, 8] == 1 and ("decode", 2, 0, False, False) in used
    assert ("decode", 8, 16, False, False) in used
    for (prompt, n), (tokens, _) in zip(requests, out, strict=True):
      assert tokens == _recompute(params, prompt, n)
  finally:
    eng.stop()

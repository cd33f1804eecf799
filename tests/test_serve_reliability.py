"""What one bad request cannot break (issue 13, server items): sampling parameters bounded by what the
engine can represent, failures isolated to the request that caused them, every error in OpenAI's
shape with the status the client received in the audit line and the metrics, filters that invisible
or full-width characters do not bypass, and a private, size-rotated audit log.

One server (a tiny random model on a real uvicorn socket) serves the HTTP tests of this module.
"""

import asyncio
import concurrent.futures
import json
import os
import re
import stat
import threading
import time

import httpx
import pytest
from tiny_package import SERVER_CFG, write_tiny_package

from llm_jax import generate as G
from llm_jax.serve import app as app_lib
from llm_jax.serve import audit as audit_lib
from llm_jax.serve import routes, tokenization
from llm_jax.serve.engine import Choice
from llm_jax.serve.filters import Filters, Rule, load_filters

CFG = SERVER_CFG
TOKENIZER_VOCAB = 300
PROMPTS = ["the cat", "def return import class", "a", "sat on a mat"]


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
  d = tmp_path_factory.mktemp("serve_rel")
  write_tiny_package(d, CFG, vocab_size=TOKENIZER_VOCAB)
  return d


@pytest.fixture(scope="module")
def server(pkg):
  s = app_lib.ServerSettings(
    package=str(pkg / "pkg"),
    slots=2,
    max_concurrent=8,
    decode_chunk=2,
    request_timeout_s=10.0,
    audit_log=str(pkg / "audit.jsonl"),
  )
  srv = app_lib.ServerThread(app_lib.create_app(s))
  srv.start()
  yield srv
  srv.stop()


def _post(url, body, **kw):
  return httpx.post(f"{url}/v1/completions", json=body, timeout=60, **kw)


def _metric(url, name):
  m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", httpx.get(f"{url}/metrics").text, re.M)
  return float(m.group(1)) if m else 0.0


def _audit_of(pkg, response) -> dict:
  """The audit line of `response` (by its x-request-id): written just after the response's last
  byte, so it is waited for (up to 20 s), not assumed after a fixed pause (0.3 s: failed when the
  write came later)."""
  rid, deadline = response.headers["x-request-id"], time.time() + 20
  while True:
    text = (pkg / "audit.jsonl").read_text()
    mine = [a for a in map(json.loads, filter(str.strip, text.splitlines())) if a["id"] == rid]
    if mine or time.time() > deadline:
      assert len(mine) == 1, (rid, mine)
      return mine[0]
    time.sleep(0.02)


def _alone(url):
  out = []
  for p in PROMPTS:
    r = _post(url, {"prompt": p, "max_tokens": 10, "temperature": 0})
    assert r.status_code == 200, r.text
    out.append(r.json()["choices"][0]["text"])
  return out


# ------------------------------------------------------------------ 1. bounds and isolation


@pytest.mark.parametrize(
  "body,param",
  [
    ({"prompt": "x", "max_tokens": 2, "top_k": 2**31}, "top_k"),  # overflowed int32 in the engine
    ({"prompt": "x", "max_tokens": 2, "top_k": TOKENIZER_VOCAB + 1}, "top_k"),
    ({"prompt": "x", "max_tokens": 2, "seed": 2**32}, "seed"),
    ({"prompt": "x", "max_tokens": 2**63}, "max_tokens"),
    ({"prompt": [1, 2**63]}, "prompt"),
  ],
)
def test_sampling_parameters_bounded_by_the_engine(server, body, param):
  t0 = time.monotonic()
  r = _post(server.url, body)
  assert r.status_code == 400, r.text
  assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
  assert time.monotonic() - t0 < 5
  assert server.app.state.llm.engine.in_flight == 0


@pytest.mark.parametrize(
  "raw,param",
  [
    ('{"prompt": "x", "temperature": NaN}', "temperature"),
    ('{"prompt": "x", "top_p": NaN}', "top_p"),
    ('{"prompt": "x", "repetition_penalty": Infinity}', "repetition_penalty"),
    ('{"prompt": "x", "logit_bias": {"5": NaN}}', "logit_bias"),
    ('{"prompt": "x", "presence_penalty": -Infinity}', "presence_penalty"),
  ],
)
def test_non_finite_numbers_are_400(server, raw, param):
  r = httpx.post(
    f"{server.url}/v1/completions", content=raw.encode(), headers={"content-type": "application/json"}
  )
  assert r.status_code == 400, r.text
  assert r.json()["error"]["param"] == param


def _http_in_flight(engine) -> int:
  return sum(rid.startswith("cmpl-") for rid in list(engine._in_flight))


async def _four_and_one_bad(url, engine, make_bad):
  """Four normal greedy requests over HTTP and one engine request `make_bad(loop, queue)` submits
  right after the first, all while the engine is paused; returns the four responses and the bad
  request's events with the seconds they took."""
  async with httpx.AsyncClient(timeout=60) as c:
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    tasks, bad_t0 = [], None
    for i, p in enumerate(PROMPTS):
      tasks.append(
        asyncio.create_task(
          c.post(f"{url}/v1/completions", json={"prompt": p, "max_tokens": 10, "temperature": 0})
        )
      )
      deadline = time.time() + 20  # each HTTP request reaches the engine before the next is sent
      while _http_in_flight(engine) < len(tasks) and time.time() < deadline:
        await asyncio.sleep(0.01)
      if i == 0:
        bad_t0 = time.monotonic()
        make_bad(loop, queue)
    engine.resume()
    events = []
    while not events or events[-1][0] != "end":
      events.append(await asyncio.wait_for(queue.get(), timeout=30))
    bad_s = time.monotonic() - bad_t0
    return [r for r in await asyncio.gather(*tasks)], events, bad_s


def test_a_request_failing_at_admission_fails_alone(server):
  """A value the engine cannot hold (top_k beyond int32, sent past the HTTP checks) fails that
  request at once; the four others in flight complete with 200 and their usual text."""
  alone = _alone(server.url)
  engine = server.app.state.llm.engine

  def bad(loop, queue):
    sp = G.SamplingParams(temperature=1.0, top_k=2**31, max_new_tokens=4)
    engine.submit([Choice(0, [1, 5, 6], sp)], loop, queue, 20.0, request_id="bad")

  engine.pause()
  try:
    rs, events, bad_s = asyncio.run(_four_and_one_bad(server.url, engine, bad))
  finally:
    engine.resume()
  assert [r.status_code for r in rs] == [200] * 4, [r.text for r in rs]
  assert [r.json()["choices"][0]["text"] for r in rs] == alone
  assert events == [("done", 0, "error"), ("end",)]
  assert bad_s < 5
  assert engine.in_flight == 0 and engine.busy_slots == 0


def test_a_request_failing_while_decoding_fails_alone(server):
  """A failure in one slot's host-side work (here: its detokenizer raises) ends that request with an
  error; the slots of the others keep decoding."""
  alone = _alone(server.url)
  engine = server.app.state.llm.engine

  def bad(loop, queue):
    sp = G.SamplingParams(temperature=0.0, max_new_tokens=10)
    choice = Choice(0, [1, 5, 6], sp)
    engine.submit([choice], loop, queue, 20.0, request_id="bad-decode")

    def fail(*args):
      raise RuntimeError("injected detokenizer failure")

    choice.text.push = choice.text.extend = fail

  engine.pause()
  try:
    rs, events, bad_s = asyncio.run(_four_and_one_bad(server.url, engine, bad))
  finally:
    engine.resume()
  assert [r.status_code for r in rs] == [200] * 4, [r.text for r in rs]
  assert [r.json()["choices"][0]["text"] for r in rs] == alone
  assert events == [("done", 0, "error"), ("end",)]
  assert bad_s < 10
  assert engine.in_flight == 0 and engine.busy_slots == 0
  assert httpx.get(f"{server.url}/health").status_code == 200


SCORE_ONLY = {"max_tokens": 0, "echo": True, "logprobs": 1}


def test_prompt_scoring_is_admitted_like_any_request(server):
  """With max_concurrent requests in the engine, a scoring request (echo, max_tokens 0) is 429 like
  any other, before any forward pass (it was scored and answered 200: nothing bounded the scoring
  work); once they end it is served."""
  engine = server.app.state.llm.engine
  limit = server.app.state.llm.settings.max_concurrent

  async def run():
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    sp = G.SamplingParams(temperature=0.0, max_new_tokens=2)
    for i in range(limit):
      engine.submit([Choice(0, [1, 5, 6], sp)], loop, queue, 20.0, request_id=f"fill-{i}")
    async with httpx.AsyncClient(timeout=60) as c:
      r = await c.post(f"{server.url}/v1/completions", json={"prompt": "the cat", **SCORE_ONLY})
    engine.resume()
    ended = 0
    while ended < limit:
      ended += await asyncio.wait_for(queue.get(), timeout=30) == ("end",)
    return r

  engine.pause()
  try:
    busy = asyncio.run(run())
  finally:
    engine.resume()
  assert busy.status_code == 429, busy.text
  assert _error_shape(busy)["code"] == "rate_limited"
  r = _post(server.url, {"prompt": "the cat", **SCORE_ONLY})
  assert r.status_code == 200, r.text
  assert server.app.state.llm.scoring == 0


def test_prompt_scoring_within_the_request_timeout(server, monkeypatch):
  """Scoring a batch of prompts that outlasts the request timeout is 504 at the timeout, and the
  prompts after it are not scored (it ran to the end and answered 200); the place it held is given
  back once the pass under way ends."""
  st = server.app.state.llm
  real, calls = routes.score, []

  def slow(st_, p):
    calls.append(p)
    time.sleep(0.6)
    real(st_, p)

  monkeypatch.setattr(routes, "score", slow)
  monkeypatch.setattr(st.settings, "request_timeout_s", 1.0)
  t0 = time.monotonic()
  r = _post(server.url, {"prompt": PROMPTS, **SCORE_ONLY})
  took = time.monotonic() - t0
  assert r.status_code == 504, r.text
  assert _error_shape(r)["code"] == "timeout"
  assert len(calls) == 2 and took < 2.0, (len(calls), took)
  deadline = time.monotonic() + 10
  while st.scoring and time.monotonic() < deadline:
    time.sleep(0.05)
  assert st.scoring == 0


@pytest.mark.parametrize("route", ["/tokenize", "/v1/completions"])
def test_slow_tokenizing_does_not_hold_other_requests(server, monkeypatch, route):
  """Tokenizing a request's text (up to the 1 MB body: ~0.4 s for /tokenize, more with token strings)
  runs off the event loop: meanwhile /health answers at once (it waited for the tokenizer, and every
  stream stalled as long)."""
  started = threading.Event()

  def slowly(fn):
    def run(*args, **kw):
      started.set()
      time.sleep(3.0)
      return fn(*args, **kw)

    return run

  if route == "/tokenize":
    monkeypatch.setattr(tokenization, "tokenize", slowly(tokenization.tokenize))
    body = {"prompt": "the cat"}
  else:
    monkeypatch.setattr(routes, "make_prompts", slowly(routes.make_prompts))
    body = {"prompt": "the cat", "max_tokens": 2, "temperature": 0}
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    slow = pool.submit(httpx.post, f"{server.url}{route}", json=body, timeout=60)
    assert started.wait(30)
    t0 = time.monotonic()
    health = httpx.get(f"{server.url}/health", timeout=60)
    took = time.monotonic() - t0
    assert slow.result().status_code == 200
  assert health.status_code == 200 and took < 1.5, took


# ------------------------------------------------------------------ 2. error shape and status


def _error_shape(r):
  err = r.json()["error"]
  assert set(err) == {"message", "type", "param", "code"} and err["message"]
  return err


def test_lone_surrogate_is_400_and_recorded_as_such(server, pkg):
  name = 'llm_requests_total{route="/v1/completions",status="%s"}'
  before = {s: _metric(server.url, name % s) for s in ("400", "499", "500")}
  raw = b'{"prompt": "\\ud800abc", "max_tokens": 2}'
  r = httpx.post(f"{server.url}/v1/completions", content=raw, headers={"content-type": "application/json"})
  assert r.status_code == 400, r.text
  err = _error_shape(r)
  assert err["param"] == "prompt" and "surrogate" in err["message"]
  line = _audit_of(pkg, r)
  assert line["path"] == "/v1/completions" and line["status"] == 400
  after = {s: _metric(server.url, name % s) for s in before}
  assert after == {"400": before["400"] + 1, "499": before["499"], "500": before["500"]}


def test_unknown_routes_and_methods_in_the_error_shape(server, pkg):
  r = httpx.get(f"{server.url}/v1/nothing-here")
  assert r.status_code == 404 and _error_shape(r)["code"] == "not_found"
  line = _audit_of(pkg, r)
  assert line["path"] == "/v1/nothing-here" and line["status"] == 404
  r = httpx.get(f"{server.url}/v1/completions")
  assert r.status_code == 405 and _error_shape(r)["code"] == "method_not_allowed"


def test_unexpected_failure_is_500_in_the_error_shape_and_audited_as_500(server, pkg):
  class Boom:
    def search(self, text):
      raise RuntimeError("injected filter failure")

  st = server.app.state.llm
  name = 'llm_requests_total{route="/v1/completions",status="500"}'
  before = _metric(server.url, name)
  saved = st.settings.filters
  st.settings.filters = Filters(input=(Rule("boom", Boom(), "test"),))
  try:
    r = _post(server.url, {"prompt": "x", "max_tokens": 2})
  finally:
    st.settings.filters = saved
  assert r.status_code == 500
  assert _error_shape(r)["type"] == "server_error"
  line = _audit_of(pkg, r)
  assert line["path"] == "/v1/completions" and line["status"] == 500
  assert _metric(server.url, name) == before + 1


# ------------------------------------------------------------------ 3. filters and invisible text


@pytest.mark.parametrize(
  "text",
  [
    "my api\u200bkey is",  # zero-width space
    "my api\u200dkey is",  # zero-width joiner
    "my api\u00adkey is",  # soft hyphen
    "my \uff41\uff50\uff49\uff4b\uff45\uff59 is",  # full-width letters
    "my A\u2060P\ufeffI\u200ckey",  # word joiner, BOM, zero-width non-joiner
  ],
)
def test_filters_see_through_invisible_and_full_width_characters(tmp_path, text):
  path = tmp_path / "f.json"
  path.write_text(
    json.dumps(
      {
        "input": [{"name": "secrets", "pattern": "(?i)apikey"}],
        "output": [{"name": "secrets", "pattern": "(?i)apikey"}],
      }
    )
  )
  filters = load_filters(str(path))
  assert filters.check_input(text) is not None
  cut, rule = filters.check_output(text)
  assert rule.name == "secrets"
  assert text.index("my ") + 3 == cut  # the cut is at the match's start in the original text
  assert filters.check_input("my api key is") is None  # a real space still separates


def test_output_cut_index_after_expanding_characters(tmp_path):
  path = tmp_path / "f.json"
  path.write_text(json.dumps({"output": [{"name": "email", "pattern": "[a-z]+@[a-z]+"}]}))
  filters = load_filters(str(path))
  text = "\ufb01\u00bd x\u200b\u200by mail\uff20host"  # ligature fi and 1/2 expand under NFKC
  cut, _ = filters.check_output(text)
  assert text[cut:] == "mail\uff20host"


def test_filter_patterns_that_normalization_changes_are_refused(tmp_path):
  path = tmp_path / "f.json"
  path.write_text(json.dumps({"input": [{"pattern": "api\u200bkey"}]}))
  with pytest.raises(ValueError, match=r"input\[0\]\.pattern"):
    load_filters(str(path))


# ------------------------------------------------------------------ 4. the audit log


def test_audit_log_is_private_and_rotates_by_size(tmp_path):
  path = tmp_path / "audit.jsonl"
  old = os.umask(0o022)
  try:
    auditor = audit_lib.Auditor(str(path), max_bytes=400, backups=2)
    for i in range(40):
      auditor.write({"event": "request", "id": f"r{i}", "status": 200})
    auditor.close()
  finally:
    os.umask(old)
  files = sorted(p.name for p in tmp_path.iterdir())
  assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
  ids = []
  for name in reversed(files):
    p = tmp_path / name
    assert stat.S_IMODE(p.stat().st_mode) == 0o600, name
    assert p.stat().st_size <= 400
    ids += [json.loads(x)["id"] for x in p.read_text().splitlines()]
  assert ids == [f"r{i}" for i in range(40 - len(ids), 40)]  # the newest lines, in order


def test_audit_log_tightens_an_existing_file(tmp_path):
  path = tmp_path / "audit.jsonl"
  path.write_text("")
  path.chmod(0o644)
  auditor = audit_lib.Auditor(str(path))
  auditor.write({"event": "request"})
  auditor.close()
  assert stat.S_IMODE(path.stat().st_mode) == 0o600
  assert json.loads(path.read_text())["event"] == "request"


def test_server_audit_log_is_private(server, pkg):
  assert stat.S_IMODE((pkg / "audit.jsonl").stat().st_mode) == 0o600

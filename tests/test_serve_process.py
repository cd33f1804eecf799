"""The engine in a process of its own (serve.worker): the same answers as the engine in the server's
process, cancels and prompt scoring across the pipe, and a dead engine process failing only what was
in flight. (The command line's default, forked, runs in test_serve_cli.py; here it is spawned, since
this process has started JAX.)"""

import asyncio
import json
import os
import signal
import time

import httpx
import pytest
from tiny_package import SERVER_CFG, write_tiny_package

from llm_jax import generate as G
from llm_jax.serve import app as app_lib
from llm_jax.serve.sequences import Choice
from llm_jax.serve.worker import EngineProcess

CFG = SERVER_CFG
# greedy with log-probs and echo (prompt scoring), seeded sampling with n=2, a stop sequence
REQUESTS = [
  {"prompt": "the cat", "max_tokens": 12, "temperature": 0, "logprobs": 2, "echo": True},
  {"prompt": "def return", "max_tokens": 10, "temperature": 0.9, "top_p": 0.8, "n": 2, "seed": 7},
  {"prompt": "a", "max_tokens": 16, "temperature": 0, "stop": ["e"]},
]


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
  d = tmp_path_factory.mktemp("process")
  write_tiny_package(d, CFG)
  return d


def _server(pkg, failures=None, **kw):
  settings = app_lib.ServerSettings(
    package=str(pkg / "pkg"), slots=2, max_concurrent=4, decode_chunk=2, request_timeout_s=30.0, **kw
  )
  on_failure = None if failures is None else (lambda: failures.append(time.monotonic()))
  return app_lib.ServerThread(app_lib.create_app(settings, on_failure=on_failure)).start()


@pytest.fixture(scope="module")
def servers(pkg):
  """(the engine in a thread of the server, the engine in its own process)."""
  here = _server(pkg)
  failures = []
  apart = _server(pkg, failures, engine_process=True)
  apart.failures = failures
  apart.first_health = httpx.get(f"{apart.url}/health", timeout=10).json()  # as soon as ready
  yield here, apart
  here.stop()
  apart.stop()


def _answer(url, body):
  r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
  assert r.status_code == 200, r.text
  out = r.json()
  return out["choices"], out["usage"]


def _streamed(url, body):
  text, reasons = {}, {}
  with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
    assert r.status_code == 200
    for line in r.iter_lines():
      if line.startswith("data: {"):
        for c in json.loads(line[6:])["choices"]:
          text[c["index"]] = text.get(c["index"], "") + c["text"]
          reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
  return text, reasons


def _metric(url, name):
  for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
    if line.startswith(name + " "):
      return float(line.split()[-1])
  return 0.0


def test_same_answers_as_the_engine_in_process(servers):
  here, apart = servers
  engine = apart.app.state.llm.engine
  assert isinstance(engine, EngineProcess) and engine.process.pid != os.getpid()
  assert engine.process.is_alive()
  tokens0 = _metric(apart.url, "llm_generated_tokens_total")
  for body in REQUESTS:
    assert _answer(apart.url, body) == _answer(here.url, body)
    assert _streamed(apart.url, body) == _streamed(here.url, body)
  # the tokens counted in this process from the engine's events: 2 x (the answer + the stream)
  total = 2 * sum(_answer(here.url, b)[1]["completion_tokens"] for b in REQUESTS)
  assert _metric(apart.url, "llm_generated_tokens_total") - tokens0 == total
  # the program counts come with "ready": a client waiting for every program never sees 0 of 0
  total = here.app.state.llm.engine.programs_built()[1]
  assert apart.first_health["status"] == "ok" and apart.first_health["programs_total"] == total > 0
  health = httpx.get(f"{apart.url}/health", timeout=10).json()
  assert health["programs_total"] == total
  deadline = time.time() + 120  # the idle engine runs each program once: reported across the pipe
  while health["programs_warm"] < total and time.time() < deadline:
    time.sleep(0.2)
    health = httpx.get(f"{apart.url}/health", timeout=10).json()
  assert health["programs_warm"] == total


def test_disconnect_frees_the_slot_in_the_engine_process(servers):
  _, apart = servers
  engine = apart.app.state.llm.engine
  cancelled0 = _metric(apart.url, 'llm_sequences_finished_total{reason="cancelled"}')
  engine.pause()  # requests still take slots, but no tokens come until resume
  try:
    body = {"prompt": "the cat", "max_tokens": 20, "stream": True, "echo": True}
    with httpx.stream("POST", f"{apart.url}/v1/completions", timeout=30, json=body) as r:
      lines = r.iter_lines()  # keep the iterator: a discarded one closes the stream (a disconnect)
      assert next(lines).startswith("data: ")
      deadline = time.time() + 10
      while engine.busy_slots == 0 and time.time() < deadline:
        time.sleep(0.01)
      assert engine.busy_slots == 1  # the engine's process reports its slots (status messages)
    deadline = time.time() + 10  # the client closed the connection: the cancel crosses the pipe
    while (engine.busy_slots or engine.in_flight) and time.time() < deadline:
      time.sleep(0.02)
    assert engine.busy_slots == 0 and engine.in_flight == 0
  finally:
    engine.resume()
  assert _metric(apart.url, 'llm_sequences_finished_total{reason="cancelled"}') == cancelled0 + 1
  assert _answer(apart.url, REQUESTS[0])[1]["completion_tokens"] == 12  # still serving


def test_requests_sharing_an_id_stay_apart(servers):
  """An embedding caller may reuse a request id: each request still gets its own events (they are
  addressed by the id and a number)."""
  _, apart = servers
  engine = apart.app.state.llm.engine

  async def both():
    loop, queues = asyncio.get_running_loop(), [asyncio.Queue(), asyncio.Queue()]
    prompts = [[1, 5, 6, 7], [1, 9]]
    for prompt, queue in zip(prompts, queues, strict=True):
      choice = Choice(0, prompt, G.SamplingParams(temperature=0, max_new_tokens=3 + len(prompt)))
      engine.submit([choice], loop, queue, 30.0, request_id="same")
    got = []
    for queue in queues:
      events = [await asyncio.wait_for(queue.get(), 30)]
      while events[-1][0] != "end":
        events.append(await asyncio.wait_for(queue.get(), 30))
      got.append(sum(len(e[3]) for e in events if e[0] == "delta"))
    return got

  assert asyncio.run(both()) == [7, 5]
  assert engine.in_flight == 0


def test_a_dead_engine_process_fails_what_was_in_flight(servers):
  """Killed while a request holds a slot: that request ends with an error, the next is refused with
  503 (not a hang), /health names the exit, and the server's failure callback runs."""
  here, apart = servers
  engine = apart.app.state.llm.engine
  engine.pause()
  with httpx.stream(
    "POST", f"{apart.url}/v1/completions", timeout=30, json={**REQUESTS[0], "stream": True}
  ) as r:
    lines = r.iter_lines()
    assert next(lines).startswith("data: ")  # the echo
    deadline = time.time() + 10
    while engine.busy_slots == 0 and time.time() < deadline:
      time.sleep(0.01)
    os.kill(engine.process.pid, signal.SIGKILL)
    rest = list(lines)
  events = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
  assert events and "error" in events[-1], rest  # the stream ends with an error event
  assert rest[-1] == "data: [DONE]" or "error" in events[-1]
  health = httpx.get(f"{apart.url}/health", timeout=10)
  assert health.status_code == 503 and "exit code -9" in health.text, health.text
  r = httpx.post(f"{apart.url}/v1/completions", json=REQUESTS[2], timeout=10)
  assert r.status_code == 503, r.text
  assert apart.failures  # the command line exits on this
  assert _answer(here.url, REQUESTS[2])  # the other server never noticed

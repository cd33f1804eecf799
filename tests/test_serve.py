"""The HTTP server on real uvicorn sockets over a real package of a tiny random model.

Two servers share one process (and so the compiled decode functions): `plain` (no key, no filters)
and `guarded` (API key, input/output filters, prompts in the audit log).
"""

import asyncio
import json
import re
import time

import httpx
import pytest
from tiny_package import SERVER_CFG, write_tiny_package

from llm_jax.artifacts import open_model, package
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.serve import app as app_lib
from llm_jax.serve.filters import FilterConfigError, load_filters

CFG = SERVER_CFG
KEY = "k" * 24
PROMPT = "the cat"


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
  d = tmp_path_factory.mktemp("serve")
  write_tiny_package(d, CFG)
  return d


def _settings(pkg, **kw):
  base = dict(
    package=str(pkg / "pkg"),
    slots=2,
    max_concurrent=4,
    decode_chunk=2,
    max_body_bytes=4096,
    request_timeout_s=30.0,
    max_n=3,
  )
  base.update(kw)
  return app_lib.ServerSettings(**base)


pytestmark = pytest.mark.usefixtures("short_spans")  # spans of 8 and 16 of 32 positions (conftest)


@pytest.fixture(scope="module")
def plain(pkg):
  srv = app_lib.ServerThread(app_lib.create_app(_settings(pkg, audit_log=str(pkg / "plain.jsonl"))))
  srv.start()
  yield srv
  srv.stop()


def _post(url, body, **kw):
  return httpx.post(f"{url}/v1/completions", json=body, timeout=60, **kw)


def _greedy(url, prompt=PROMPT, max_tokens=16, headers=None, **kw):
  r = _post(url, {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw}, headers=headers)
  assert r.status_code == 200, r.text
  return r.json()


@pytest.fixture(scope="module")
def greedy_text(plain):
  text = _greedy(plain.url)["choices"][0]["text"]
  assert len(text) >= 8, text
  return text


@pytest.fixture(scope="module")
def guarded(pkg, greedy_text):
  blocked = greedy_text[4:7]
  rules = {
    "input": [{"name": "no-secrets", "pattern": "(?i)forbidden", "reason": "no secrets"}],
    "output": [{"name": "snippet", "pattern": re.escape(blocked), "reason": "test rule"}],
    "hold_chars": 8,
  }
  (pkg / "filters.json").write_text(json.dumps(rules))
  s = _settings(
    pkg,
    api_key=KEY,
    filters=load_filters(str(pkg / "filters.json")),
    log_prompts=True,
    audit_log=str(pkg / "guarded.jsonl"),
  )
  srv = app_lib.ServerThread(app_lib.create_app(s))
  srv.start()
  yield srv, blocked
  srv.stop()


def _metric(url, name, headers=None):
  text = httpx.get(f"{url}/metrics", headers=headers).text
  m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
  return float(m.group(1)) if m else 0.0


def _audit(pkg, name, *ids):
  """The audit file's lines, once it holds the lines of requests `ids` (their x-request-id or
  completion id): a request's line is written just after its response's last byte, so it is waited
  for (up to 20 s), not assumed after a fixed pause (0.3 s: failed when the write came later)."""
  deadline = time.time() + 20
  while True:
    lines = [json.loads(line) for line in (pkg / name).read_text().splitlines() if line.strip()]
    if set(ids) <= {a["id"] for a in lines} or time.time() > deadline:
      return lines
    time.sleep(0.02)


# ------------------------------------------------------------------ endpoints


def test_health_models_metrics(plain):
  h = httpx.get(f"{plain.url}/health")
  assert h.status_code == 200 and h.json()["status"] == "ok"
  models = httpx.get(f"{plain.url}/v1/models").json()
  assert models["data"][0]["id"] == "pkg" and models["data"][0]["max_seq_len"] == 32
  m = httpx.get(f"{plain.url}/metrics")
  assert m.status_code == 200 and "llm_batch_slots 2.0" in m.text
  assert httpx.get(f"{plain.url}/docs").status_code == 404  # no UI that loads code from elsewhere
  assert httpx.get(f"{plain.url}/openapi.json").status_code == 404


def test_health_is_503_until_loaded(pkg):
  srv = app_lib.ServerThread(app_lib.create_app(_settings(pkg), load=False)).start(wait_model=False)
  try:
    h = httpx.get(f"{srv.url}/health")
    assert h.status_code == 503 and h.json()["status"] == "loading"
    r = _post(srv.url, {"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
  finally:
    srv.stop()


def test_completion_shapes_and_determinism(plain, pkg, greedy_text):
  a = _greedy(plain.url)
  assert a["object"] == "text_completion" and a["model"] == "pkg"
  c = a["choices"][0]
  assert c["text"] == greedy_text and c["finish_reason"] == "length"
  assert a["usage"] == {
    "prompt_tokens": a["usage"]["prompt_tokens"],
    "completion_tokens": 16,
    "total_tokens": a["usage"]["prompt_tokens"] + 16,
  }
  # The same prompt as token ids ([EOS, the document separator] + encode) gives the same completion.
  tok = Tokenizer.load(str(pkg / "pkg" / "tokenizer.model"))
  ids = [tok.eos_id] + tok.encode(PROMPT)
  assert _greedy(plain.url, prompt=ids)["choices"][0]["text"] == greedy_text
  # Seeded sampling is reproducible; n choices use consecutive seeds.
  body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 5, "n": 2}
  r1, r2 = _post(plain.url, body).json(), _post(plain.url, body).json()
  assert [c["text"] for c in r1["choices"]] == [c["text"] for c in r2["choices"]]
  assert [c["index"] for c in r1["choices"]] == [0, 1]
  assert r1["choices"][0]["text"] != r1["choices"][1]["text"]
  assert r1["usage"]["completion_tokens"] == 24


def test_greedy_matches_full_recompute(plain, pkg, greedy_text):
  """The engine (slots, spans 8/16/32, per-layer weights) decodes what the plain model computes."""
  import jax
  import numpy as np

  from llm_jax.model import Decoder

  loaded = open_model(str(pkg / "pkg"), dtype="auto")
  assert plain.app.state.llm.engine.spans() == [8, 16, 0]
  seq = loaded.prompt_prefix + loaded.tokenizer.encode(PROMPT)
  fwd = jax.jit(lambda p, t: Decoder(loaded.model_config).apply({"params": p}, t))
  new = []
  for _ in range(16):
    padded = np.zeros((1, CFG.max_seq_len), np.int32)
    padded[0, : len(seq)] = seq
    t = int(np.argmax(np.asarray(fwd(loaded.params, padded))[0, len(seq) - 1, :300]))
    if t == loaded.tokenizer.eos_id:
      break
    new.append(t)
    seq.append(t)
  assert loaded.tokenizer.decode(new) == greedy_text


def test_concurrent_requests_share_steps_and_match_sequential(plain):
  prompts = ["the cat", "def return import class", "a"]
  alone = [_greedy(plain.url, p, max_tokens=10)["choices"][0]["text"] for p in prompts]
  engine = plain.app.state.llm.engine
  steps0 = engine.steps

  async def together():
    async with httpx.AsyncClient(timeout=60) as c:
      tasks = [
        asyncio.create_task(
          c.post(f"{plain.url}/v1/completions", json={"prompt": p, "max_tokens": 10, "temperature": 0})
        )
        for p in prompts
      ]
      deadline = time.time() + 20
      while engine.in_flight < 3 and time.time() < deadline:
        await asyncio.sleep(0.01)
      engine.resume()
      return await asyncio.gather(*tasks)

  engine.pause()  # all three arrive before decoding starts: two share slots, one waits and joins
  try:
    rs = asyncio.run(together())
  finally:
    engine.resume()
  assert [r.json()["choices"][0]["text"] for r in rs] == alone
  # 3 requests x 10 tokens on 2 slots: 20 decode steps instead of 30 one at a time.
  assert engine.steps - steps0 == 20


def test_slot_refilled_while_a_chunk_is_in_flight(plain, greedy_text):
  """A request that a stop sequence ends early frees its slot one chunk late (the host sees the
  stop while the device already runs the next chunk for it); the request that takes the slot gets
  only its own tokens."""
  k = next(k for k in range(3, len(greedy_text) - 3) if greedy_text.find(greedy_text[k : k + 3]) == k)
  stop = greedy_text[k : k + 3]
  bodies = [
    {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stop": stop},
    {"prompt": "def return import class", "max_tokens": 10, "temperature": 0},
    {"prompt": "a", "max_tokens": 10, "temperature": 0},
  ]
  alone = [_post(plain.url, b).json()["choices"][0]["text"] for b in bodies]
  assert alone[0] == greedy_text[:k]
  engine = plain.app.state.llm.engine

  async def together():
    async with httpx.AsyncClient(timeout=60) as c:
      tasks = []
      for b in bodies:  # in this order: the stopping request and the long one take the two slots
        tasks.append(asyncio.create_task(c.post(f"{plain.url}/v1/completions", json=b)))
        deadline = time.time() + 20
        while engine.in_flight < len(tasks) and time.time() < deadline:
          await asyncio.sleep(0.01)
      engine.resume()
      return await asyncio.gather(*tasks)

  engine.pause()
  try:
    rs = asyncio.run(together())
  finally:
    engine.resume()
  assert [r.json()["choices"][0]["text"] for r in rs] == alone


def test_stop_sequences_trimmed(plain, greedy_text):
  stop = greedy_text[5:7]
  r = _greedy(plain.url, stop=[stop, "zzzz"])
  c = r["choices"][0]
  assert c["text"] == greedy_text[: greedy_text.find(stop)] and c["finish_reason"] == "stop"


def test_the_token_completing_a_stop_is_listed_and_counted(plain):
  """A stop sequence that starts inside a token: the text keeps that token's characters before the
  stop, so the token is listed and counted in usage (as EOS is, and as vLLM does); it was dropped."""
  for prompt in ["sat on", "the cat", "def return", "import class self"]:
    whole = _greedy(plain.url, prompt, logprobs=0)["choices"][0]
    lp = whole["logprobs"]
    m = next(
      (
        k
        for k, t in enumerate(lp["tokens"])
        if len(t) > 1
        and not t.startswith(("bytes:", "<"))
        and t[1:] not in whole["text"][: lp["text_offset"][k] + 1]
      ),
      None,
    )
    if m is not None:
      break
  assert m is not None, "no prompt drew a token of several characters"
  at = lp["text_offset"][m]
  r = _greedy(plain.url, prompt, logprobs=0, stop=[lp["tokens"][m][1:]])
  c = r["choices"][0]
  assert c["text"] == whole["text"][: at + 1] and c["finish_reason"] == "stop"
  assert c["logprobs"]["tokens"] == lp["tokens"][: m + 1]
  assert r["usage"]["completion_tokens"] == m + 1


def test_stop_token_ids_end_the_text_at_the_id(plain, pkg):
  """vLLM's `stop_token_ids`: the text ends before the id (which adds none of its text), the id is
  listed and counted, and the finish reason is "stop"; streamed the same."""
  from llm_jax.serve.prompts import token_str

  tok = Tokenizer.load(str(pkg / "tok.model"))
  by_str: dict[str, list[int]] = {}
  for i in range(tok.vocab_size):
    by_str.setdefault(token_str(tok, i), []).append(i)
  body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "logprobs": 0}
  whole = _post(plain.url, body).json()["choices"][0]
  tokens, offsets = whole["logprobs"]["tokens"], whole["logprobs"]["text_offset"]
  m = next(k for k in range(2, len(tokens)) if tokens[k] not in tokens[:k] and len(by_str[tokens[k]]) == 1)
  stop = {**body, "stop_token_ids": [by_str[tokens[m]][0]]}
  r = _post(plain.url, stop).json()
  c = r["choices"][0]
  assert c["text"] == whole["text"][: offsets[m]] and c["finish_reason"] == "stop"
  assert c["logprobs"]["tokens"] == tokens[: m + 1] and r["usage"]["completion_tokens"] == m + 1
  chunks = [ch for e in _sse(plain.url, {**stop, "stream": True}) for ch in e["choices"]]
  assert "".join(ch["text"] for ch in chunks) == c["text"] and chunks[-1]["finish_reason"] == "stop"


def test_the_model_s_stop_ids_end_every_completion(plain, pkg, monkeypatch):
  """The served model's stop ids (an imported instruct model's end-of-turn ids, `OpenedModel.stop_ids`)
  end a completion as a request's stop_token_ids do, without the request naming them."""
  from llm_jax.artifacts import OpenedModel
  from llm_jax.serve.prompts import token_str

  tok = Tokenizer.load(str(pkg / "tok.model"))
  body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "logprobs": 0}
  whole = _post(plain.url, body).json()["choices"][0]
  tokens = whole["logprobs"]["tokens"]
  by_str: dict[str, list[int]] = {}
  for i in range(tok.vocab_size):
    by_str.setdefault(token_str(tok, i), []).append(i)
  m = next(k for k in range(2, len(tokens)) if tokens[k] not in tokens[:k] and len(by_str[tokens[k]]) == 1)
  monkeypatch.setattr(OpenedModel, "stop_ids", property(lambda self: by_str[tokens[m]]))
  c = _post(plain.url, body).json()["choices"][0]
  assert c["finish_reason"] == "stop" and c["logprobs"]["tokens"] == tokens[: m + 1]


def test_sixteen_stop_sequences(plain, greedy_text):
  """lm-evaluation-harness sends more than 4 stop strings (its `until`): up to 16 are honoured."""
  stop = greedy_text[5:7]
  others = [f"\x00{k}" for k in range(15)]
  c = _greedy(plain.url, stop=[*others[:8], stop, *others[8:]])["choices"][0]
  assert c["text"] == greedy_text[: greedy_text.find(stop)] and c["finish_reason"] == "stop"


def test_logprobs_and_echo(plain):
  r = _greedy(plain.url, max_tokens=5, logprobs=2, echo=True)
  c = r["choices"][0]
  # usage counts the hidden prompt prefix (EOS); echo lists the prompt's own tokens only
  n_prompt = r["usage"]["prompt_tokens"] - 1
  assert c["text"].startswith(PROMPT)
  lp = c["logprobs"]
  assert len(lp["tokens"]) == len(lp["token_logprobs"]) == n_prompt + 5
  assert "".join(lp["tokens"][:n_prompt]) == PROMPT
  assert lp["token_logprobs"][0] is None and all(x <= 0 for x in lp["token_logprobs"][1:])
  assert lp["top_logprobs"][0] is None and all(isinstance(t, dict) for t in lp["top_logprobs"][1:])
  top = lp["top_logprobs"][n_prompt:]
  assert all(len(t) <= 3 for t in top)  # the 2 best and the chosen one
  # Greedy: the chosen token's log-prob is the best of the top ones.
  assert all(
    abs(max(t.values()) - x) < 1e-5 for t, x in zip(top, lp["token_logprobs"][n_prompt:], strict=True)
  )


@pytest.mark.parametrize("stream", [False, True])
def test_echo_offsets_of_special_pieces(plain, stream):
  """A text prompt with special pieces written in it (read as their ids, which decode to no text):
  with echo and logprobs, each token's text_offset is where its piece starts in the returned text."""
  parts = ["<s>", "the", "</s>", " cat", "<unk>"]
  prompt = "".join(parts)
  starts = [sum(len(p) for p in parts[:k]) for k in range(len(parts) + 1)]
  body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "logprobs": 1, "echo": True}
  if stream:
    chunks = [c for e in _sse(plain.url, body) for c in e["choices"]]
    text = "".join(c["text"] for c in chunks)
    lp = {
      k: [x for c in chunks if c["logprobs"] for x in c["logprobs"][k]] for k in ("tokens", "text_offset")
    }
  else:
    c = _greedy(plain.url, **body)["choices"][0]
    text, lp = c["text"], c["logprobs"]
  assert text.startswith(prompt)
  assert lp["tokens"][: len(parts)] == ["<s>", "the", "</s>", " cat", " \u2047 "]
  assert lp["text_offset"][: len(parts) + 1] == starts


def test_empty_prompt_named_with_echo_and_logprobs(plain):
  r = _post(plain.url, {"prompt": ["a", ""], "echo": True, "logprobs": 1})
  assert r.status_code == 400 and r.json()["error"]["message"] == "prompt[1]: empty", r.text


def test_logprobs_zero_lists_the_chosen_token(plain):
  """logprobs: 0 gives each chosen token's log-prob, and top_logprobs entries holding only the chosen
  token (as vLLM; they were null)."""
  for echo in (False, True):
    lp = _greedy(plain.url, max_tokens=4, logprobs=0, echo=echo)["choices"][0]["logprobs"]
    first = 1 if echo else 0
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
    assert lp["top_logprobs"][:first] == [None] * first
    assert all(x <= 0 for x in lp["token_logprobs"][first:])
    assert lp["top_logprobs"][first:] == [
      {t: x} for t, x in zip(lp["tokens"][first:], lp["token_logprobs"][first:], strict=True)
    ]


def _sse(url, body, headers=None):
  events, done = [], False
  with httpx.stream(
    "POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60, headers=headers
  ) as r:
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    for line in r.iter_lines():
      if not line:
        continue
      assert line.startswith("data: ")
      if line == "data: [DONE]":
        done = True
        continue
      assert not done, "data after [DONE]"
      events.append(json.loads(line[6:]))
  assert done
  return events


def test_sse_stream_parsed_to_the_end(plain, greedy_text):
  events = _sse(
    plain.url,
    {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stream_options": {"include_usage": True}},
  )
  text = "".join(c["text"] for e in events for c in e["choices"])
  assert text == greedy_text
  finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
  assert finishes == ["length"]
  assert events[-1]["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_equal_the_whole_response(plain, echo):
  """A stream's listings, joined, equal the whole response's: text_offset counts characters of the
  whole text (prompt included with echo), across chunks, also while a chunk's text is held back (a
  part of a character) or comes out with a later chunk's."""
  body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "logprobs": 2, "echo": echo}
  whole = _post(plain.url, body).json()["choices"][0]
  events = _sse(plain.url, body)
  chunks = [c for e in events for c in e["choices"] if c["logprobs"] is not None]
  assert len(chunks) > 2
  assert "".join(c["text"] for e in events for c in e["choices"]) == whole["text"]
  for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
    assert [x for c in chunks for x in c["logprobs"][key]] == whole["logprobs"][key], key


def test_streamed_logprobs_equal_the_whole_response_at_a_stop(plain, greedy_text):
  """Cut by a stop sequence anywhere in the text, a stream's listings still equal the whole
  response's (a token kept before the one completing the stop gets an offset within the cut text)."""
  for k in range(len(greedy_text) - 1):
    body = {
      "prompt": PROMPT,
      "max_tokens": 16,
      "temperature": 0,
      "logprobs": 1,
      "stop": [greedy_text[k : k + 2]],
    }
    whole = _post(plain.url, body).json()["choices"][0]
    chunks = [c for e in _sse(plain.url, body) for c in e["choices"]]
    assert "".join(c["text"] for c in chunks) == whole["text"] and whole["finish_reason"] == "stop"
    for key in ("tokens", "text_offset"):
      got = [x for c in chunks if c["logprobs"] for x in c["logprobs"][key]]
      assert got == whole["logprobs"][key], (k, key)


@pytest.mark.parametrize(
  "body,param",
  [
    ({"prompt": "x", "temperature": 5}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_k": -2}, "top_k"),  # -1 is off, as in vLLM
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "x", "n": 9}, "n"),
    ({"prompt": "x", "logprobs": 9}, "logprobs"),
    ({"prompt": "x", "stop": [f"s{k}" for k in range(17)]}, "stop"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "stream": 1}, "stream"),
    ({"prompt": "x", "presence_penalty": 1.0}, "presence_penalty"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options"),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": True, "x": 1}}, "stream_options"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": ["a", ""]}, "prompt"),
    ({"prompt": [[5, 6], []]}, "prompt"),
    ({"prompt": [[5, 6]] * 40}, "prompt"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": "the " * 40}, "prompt"),
    ({"prompt": "x", "max_tokens": 31}, "max_tokens"),
    ({"prompt": "x", "stop_token_ids": [300]}, "stop_token_ids"),
    ({"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"prompt": "x", "stop_token_ids": "5"}, "stop_token_ids"),
  ],
)
def test_400_names_the_field(plain, body, param):
  r = _post(plain.url, body)
  assert r.status_code == 400, r.text
  err = r.json()["error"]
  assert err["param"] == param and err["message"]


def test_bad_json_body_and_size_limits(plain):
  r = httpx.post(
    f"{plain.url}/v1/completions", content=b"{nope", headers={"content-type": "application/json"}
  )
  assert r.status_code == 400 and r.json()["error"]["param"] == "body"
  r = _post(plain.url, {"prompt": "a" * 5000})
  assert r.status_code == 413
  r = _post(plain.url, {"prompt": "x", "model": "other"})
  assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_flood_gets_429_and_no_crash(plain):
  engine = plain.app.state.llm.engine
  engine.pause()

  async def flood():
    async with httpx.AsyncClient(timeout=60) as c:
      tasks = [
        asyncio.create_task(
          c.post(f"{plain.url}/v1/completions", json={"prompt": "the", "max_tokens": 4, "temperature": 0})
        )
        for _ in range(12)
      ]
      pending, deadline = set(tasks), time.time() + 20
      while len(pending) > 4 and time.time() < deadline:
        _, pending = await asyncio.wait(pending, timeout=1, return_when=asyncio.FIRST_COMPLETED)
      early = [t.result().status_code for t in tasks if t not in pending]
      engine.resume()
      late = [r.status_code for r in await asyncio.gather(*pending)]
      return early, late

  try:
    early, late = asyncio.run(flood())
  finally:
    engine.resume()
  assert sorted(early) == [429] * 8 and late == [200] * 4
  r = _greedy(plain.url, max_tokens=4)
  assert r["choices"][0]["finish_reason"] == "length"
  assert httpx.get(f"{plain.url}/health").status_code == 200


def test_disconnect_frees_the_slot(plain, pkg):
  engine = plain.app.state.llm.engine
  cancelled0 = _metric(plain.url, 'llm_sequences_finished_total{reason="cancelled"}')
  engine.pause()  # requests still take slots, but no tokens come until resume
  try:
    with httpx.stream(
      "POST",
      f"{plain.url}/v1/completions",
      timeout=30,
      json={"prompt": PROMPT, "max_tokens": 20, "stream": True, "echo": True},
    ) as r:
      rid = r.headers["x-request-id"]
      lines = r.iter_lines()  # keep the iterator: a discarded one closes the stream (a disconnect)
      first = next(lines)
      assert first.startswith("data: ") and PROMPT in first
      deadline = time.time() + 10
      while engine.busy_slots == 0 and time.time() < deadline:
        time.sleep(0.01)
      assert engine.busy_slots == 1
    deadline = time.time() + 10  # the client closed the connection: the slot must free up
    while engine.busy_slots and time.time() < deadline:
      time.sleep(0.02)
    assert engine.busy_slots == 0 and engine.in_flight == 0
  finally:
    engine.resume()
  assert _metric(plain.url, 'llm_sequences_finished_total{reason="cancelled"}') == cancelled0 + 1
  [last] = [a for a in _audit(pkg, "plain.jsonl", rid) if a["id"] == rid]
  assert last.get("stream") and last["disconnected"] is True and last["completion_tokens"] == 0


def test_non_streaming_disconnect_frees_the_slot(plain):
  engine = plain.app.state.llm.engine
  engine.pause()
  try:
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
      httpx.post(
        f"{plain.url}/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 20},
        timeout=httpx.Timeout(30, read=1.0),
      )
    deadline = time.time() + 10
    while (engine.busy_slots or engine.in_flight) and time.time() < deadline:
      time.sleep(0.02)
    assert engine.busy_slots == 0 and engine.in_flight == 0
  finally:
    engine.resume()


def test_request_timeout(plain):
  st = plain.app.state.llm
  st.settings.request_timeout_s = 0.3
  st.engine.pause()
  try:
    r = _post(plain.url, {"prompt": "x", "max_tokens": 3})
  finally:
    st.engine.resume()
    st.settings.request_timeout_s = 30.0
  assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


def test_metrics_counters_move(plain):
  name = 'llm_requests_total{route="/v1/completions",status="200"}'
  before = {
    k: _metric(plain.url, k)
    for k in (
      name,
      "llm_generated_tokens_total",
      "llm_time_to_first_token_seconds_count",
      "llm_request_latency_seconds_count",
    )
  }
  _greedy(plain.url, max_tokens=7)
  after = {k: _metric(plain.url, k) for k in before}
  assert after[name] == before[name] + 1
  assert after["llm_generated_tokens_total"] == before["llm_generated_tokens_total"] + 7
  assert after["llm_time_to_first_token_seconds_count"] == before["llm_time_to_first_token_seconds_count"] + 1
  assert after["llm_request_latency_seconds_count"] > before["llm_request_latency_seconds_count"]
  assert _metric(plain.url, "llm_busy_slots") == 0 and _metric(plain.url, "llm_queue_depth") == 0
  assert _metric(plain.url, 'llm_requests_total{route="/v1/completions",status="400"}') >= 1


def test_audit_lines(plain, pkg):
  rid = _greedy(plain.url, max_tokens=3)["id"]
  bad = _post(plain.url, {"prompt": PROMPT, "max_tokens": -1})
  assert bad.status_code == 400
  bad_id = bad.headers["x-request-id"]
  lines = _audit(pkg, "plain.jsonl", rid, bad_id)
  [last] = [a for a in lines if a["id"] == rid]
  assert last["path"] == "/v1/completions" and last["status"] == 200
  meta = package.read_model_json(str(pkg / "pkg"))
  assert last["build_id"] == meta["build_id"]
  assert last["tokenizer_sha256"] == meta["provenance"]["tokenizer_sha256"]
  assert last["manifest_sha256"] == "unknown"
  for key in ("id", "start", "end", "latency_s", "ttft_s", "prompt_tokens", "completion_tokens"):
    assert key in last, key
  assert last["completion_tokens"] == 3
  assert all("prompt" not in a and "completion" not in a for a in lines)  # no --log_prompts
  [refused] = [a for a in lines if a["id"] == bad_id]
  assert refused["status"] == 400 and "max_tokens" in refused["error"]


def test_openai_client(plain, greedy_text):
  openai = pytest.importorskip("openai")
  client = openai.OpenAI(base_url=f"{plain.url}/v1", api_key="unused", max_retries=0)
  r = client.completions.create(model="pkg", prompt=PROMPT, max_tokens=16, temperature=0)
  assert r.choices[0].text == greedy_text and r.usage.completion_tokens == 16
  parts = [
    c.choices[0].text
    for c in client.completions.create(model="pkg", prompt=PROMPT, max_tokens=16, temperature=0, stream=True)
    if c.choices
  ]
  assert "".join(parts) == greedy_text
  assert [m.id for m in client.models.list()] == ["pkg"]
  assert client.models.retrieve("pkg").id == "pkg"  # GET /v1/models/pkg (was 404: no such route)
  with pytest.raises(openai.NotFoundError):
    client.models.retrieve("other")


def test_seeded_prompt_samples_the_same_at_any_batch_position(plain):
  """A seeded, sampled prompt gives the same text alone and at index 1 of a batch (choice j of every
  prompt uses seed + j, as vLLM gives each prompt the request's seed); the n choices of one prompt
  still differ. Before: index 1 of the batch drew with seed + 1 and matched the prompt sent with
  seed 6, not its own seed 5."""
  body = {"seed": 5, "temperature": 1.0, "max_tokens": 8}
  alone = _post(plain.url, {**body, "prompt": PROMPT, "n": 2}).json()["choices"]
  batch = _post(plain.url, {**body, "prompt": ["import os", PROMPT], "n": 2}).json()["choices"]
  assert [c["text"] for c in batch[2:]] == [c["text"] for c in alone]
  assert alone[0]["text"] != alone[1]["text"]


def test_values_openai_and_vllm_clients_send(plain, greedy_text):
  """`max_tokens: null` (the openai client's None) is the default 16; `top_k: -1` (vLLM's off) is off
  (both were 422)."""
  openai = pytest.importorskip("openai")
  client = openai.OpenAI(base_url=f"{plain.url}/v1", api_key="unused", max_retries=0)
  r = client.completions.create(model="pkg", prompt=PROMPT, max_tokens=None, temperature=0)
  assert r.choices[0].text == greedy_text and r.usage.completion_tokens == 16
  body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 3}
  off = _post(plain.url, {**body, "top_k": -1})
  assert off.status_code == 200, off.text
  assert off.json()["choices"] == _post(plain.url, {**body, "top_k": 0}).json()["choices"]
  assert _post(plain.url, {**body, "top_k": -2}).status_code == 400


# ------------------------------------------------------------------ key, filters, prompt logging


def test_api_key_required_except_health(guarded):
  srv, _ = guarded
  auth = {"Authorization": f"Bearer {KEY}"}
  assert httpx.get(f"{srv.url}/health").status_code == 200
  for path in ("/v1/models", "/metrics"):
    assert httpx.get(f"{srv.url}{path}").status_code == 401
    assert httpx.get(f"{srv.url}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{srv.url}{path}", headers=auth).status_code == 200
  r = _post(srv.url, {"prompt": "x", "max_tokens": 2})
  assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
  assert _post(srv.url, {"prompt": "x", "max_tokens": 2}, headers=auth).status_code == 200


def test_filters_block_input_and_cut_output(guarded, greedy_text, pkg):
  srv, blocked = guarded
  auth = {"Authorization": f"Bearer {KEY}"}
  r = _post(srv.url, {"prompt": "tell me the FORBIDDEN thing"}, headers=auth)
  assert r.status_code == 400
  assert r.json()["error"]["code"] == "input_blocked" and "no secrets" in r.json()["error"]["message"]
  want = greedy_text[: greedy_text.find(blocked)]
  cut = _greedy(srv.url, headers=auth)
  c = cut["choices"][0]
  assert c["text"] == want and c["finish_reason"] == "content_filter"
  assert c["content_filter"]["name"] == "snippet"
  events = _sse(srv.url, {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}, headers=auth)
  assert "".join(c["text"] for e in events for c in e["choices"]) == want
  assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == [
    "content_filter"
  ]
  ids = (r.headers["x-request-id"], cut["id"], events[0]["id"])
  lines = {a["id"]: a for a in _audit(pkg, "guarded.jsonl", *ids)}
  assert lines[ids[0]].get("blocked_by") == "no-secrets" and lines[ids[0]]["status"] == 400
  for rid in ids[1:]:  # the non-streaming and the streamed response, each cut by the output filter
    assert lines[rid]["output_blocked_by"] == ["snippet"]
    assert lines[rid]["prompt"] == PROMPT and lines[rid]["completion"] == [want]


def test_filter_file_errors(tmp_path):
  bad = tmp_path / "f.json"
  bad.write_text('{"input": [{"pattern": "("}]}')
  with pytest.raises(FilterConfigError, match=r"input\[0\]\.pattern"):
    load_filters(str(bad))
  bad.write_text('{"inputs": []}')
  with pytest.raises(FilterConfigError, match="unknown keys"):
    load_filters(str(bad))

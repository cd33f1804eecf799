"""The FastAPI app: /v1/completions, /v1/models, /health, /metrics, plus the gate in front of them.

The gate (a plain ASGI middleware) gives each request an id, enforces the API key (every route but
/health) and the body-size limit, counts requests by status, and writes the audit line when the
response (streamed or not) has ended. No route reads files or runs code named by a request.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import re
import secrets
import socket
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from llm_jax import generate as G
from llm_jax.serve import audit as audit_lib
from llm_jax.serve.engine import Choice, Engine, EngineBusy
from llm_jax.serve.filters import Filters
from llm_jax.serve.metrics import Metrics
from llm_jax.serve.schema import ApiError, CompletionRequest, error_body

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServerSettings:
  """Everything `python -m llm_jax.serve` takes (see its --help)."""
  package: str
  host: str = "127.0.0.1"
  port: int = 8000
  api_key: str | None = None
  filters: Filters = dataclasses.field(default_factory=Filters)
  log_prompts: bool = False
  audit_log: str = ""
  slots: int = 8
  max_concurrent: int = 32
  decode_chunk: int = 4
  max_prompt_tokens: int = 0  # 0: max_seq_len - 1
  max_total_tokens: int = 0  # prompt + new tokens; 0: max_seq_len
  max_body_bytes: int = 1 << 20
  request_timeout_s: float = 60.0
  max_n: int = 4
  compute_dtype: str | None = None
  int8_in_memory: bool = False
  model_name: str = ""


class ServerState:
  """What the routes share: settings, metrics, auditor, and the engine once it is ready."""

  def __init__(self, settings: ServerSettings):
    self.settings = settings
    self.metrics = Metrics(settings.slots)
    self.auditor = audit_lib.Auditor(audit_lib.make_logger(settings.audit_log), settings.log_prompts)
    self.loaded = None
    self.engine: Engine | None = None
    self.error: str | None = None
    self.started = time.monotonic()
    self.name = settings.model_name

  def load(self) -> None:
    """Loads the package, compiles the decode functions, starts the engine (the warm start)."""
    from llm_jax import package as package_lib
    from llm_jax.model import unstack_layers
    s = self.settings
    try:
      t0 = time.monotonic()
      loaded = package_lib.load_package(s.package, compute_dtype=s.compute_dtype,
                                        int8_in_memory=s.int8_in_memory)
      # one buffer per layer for decoding (replaces the stacked copy rather than doubling it)
      loaded.params, loaded.model_config = unstack_layers(loaded.params, loaded.model_config)
      t_load = time.monotonic() - t0
      self.loaded = loaded
      self.name = s.model_name or loaded.name
      self.auditor.identity = {"build_id": loaded.build_id,
                               "tokenizer_sha256": loaded.tokenizer_sha256,
                               "manifest_sha256": loaded.manifest_sha256}
      engine = Engine(loaded.params, loaded.model_config, loaded.tokenizer, slots=s.slots,
                      max_concurrent=s.max_concurrent, chunk=s.decode_chunk,
                      hold_chars=s.filters.hold_chars if s.filters.output else 0,
                      output_check=s.filters.check_output if s.filters.output else None,
                      metrics=self.metrics)
      t_compile = engine.warmup()
      engine.start()
      self.engine = engine
      log.info("ready: %s; loaded in %.1fs, compiled in %.1fs, start-up %.1fs", loaded.describe(),
               t_load, t_compile, time.monotonic() - self.started)
    except Exception as e:  # noqa: BLE001 - reported by /health and the log
      self.error = f"{type(e).__name__}: {e}"
      log.error("could not load %s: %s", s.package, self.error)
      raise

  def limits(self) -> tuple[int, int]:
    s, cfg = self.settings, self.loaded.model_config
    max_prompt = min(s.max_prompt_tokens or cfg.max_seq_len - 1, cfg.max_seq_len - 1)
    max_total = min(s.max_total_tokens or cfg.max_seq_len, cfg.max_seq_len)
    return max_prompt, max_total


# ------------------------------------------------------------------ the gate (ASGI middleware)


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
  raw = json.dumps(body).encode()
  hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
  hdrs += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
  await send({"type": "http.response.start", "status": status, "headers": hdrs})
  await send({"type": "http.response.body", "body": raw})


class Gate:
  """Request id, API key, body limit, request metrics and the audit line, around every route."""

  def __init__(self, app, st: ServerState):
    self.app, self.st = app, st

  def _authorized(self, scope) -> bool:
    key = self.st.settings.api_key
    if not key:
      return True
    for name, value in scope.get("headers", []):
      if name == b"authorization":
        scheme, _, token = value.decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
    return False

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    st, t0 = self.st, time.time()
    path, method = scope["path"], scope["method"]
    rid = f"cmpl-{uuid.uuid4().hex[:24]}"
    record: dict[str, Any] = {"event": "request", "id": rid, "method": method, "path": path,
                              "client": (scope.get("client") or ("", 0))[0]}
    scope.setdefault("state", {})
    scope["state"]["audit"], scope["state"]["request_id"] = record, rid
    status: dict[str, int | None] = {"code": None}

    async def send_wrapper(message):
      if message["type"] == "http.response.start":
        status["code"] = message["status"]
        message = {**message, "headers": list(message.get("headers", [])) +
                   [(b"x-request-id", rid.encode())]}
      await send(message)

    try:
      if path != "/health" and not self._authorized(scope):
        await _send_json(send_wrapper, 401, error_body(
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            type_="authentication_error", code="invalid_api_key"),
            {"www-authenticate": "Bearer"})
        return
      if method in ("POST", "PUT", "PATCH"):
        body = await self._read_body(scope, receive)
        if body is None:
          await _send_json(send_wrapper, 413, error_body(
              f"request body exceeds {st.settings.max_body_bytes} bytes", code="body_too_large"))
          return
        receive = _replay(body, receive)
      await self.app(scope, receive, send_wrapper)
    finally:
      code = status["code"] or record.get("status") or 499
      route = st.metrics.route(path)
      st.metrics.requests.labels(route, str(code)).inc()
      t1 = time.time()
      if route == "/v1/completions":
        st.metrics.latency.observe(t1 - t0)
      if not (route in ("/health", "/metrics") and code < 400):
        record.update(status=code, start=audit_lib.iso(t0), end=audit_lib.iso(t1),
                      latency_s=round(t1 - t0, 6))
        st.auditor.write(record)

  async def _read_body(self, scope, receive) -> bytes | None:
    limit = self.st.settings.max_body_bytes
    for name, value in scope.get("headers", []):
      if name == b"content-length" and value.isdigit() and int(value) > limit:
        return None
    chunks, size = [], 0
    while True:
      message = await receive()
      if message["type"] == "http.disconnect":
        break
      chunk = message.get("body", b"")
      size += len(chunk)
      if size > limit:
        return None
      chunks.append(chunk)
      if not message.get("more_body"):
        break
    return b"".join(chunks)


def _replay(body: bytes, receive):
  sent = False

  async def replay():
    nonlocal sent
    if not sent:
      sent = True
      return {"type": "http.request", "body": body, "more_body": False}
    return await receive()
  return replay


# ------------------------------------------------------------------ the app


def create_app(settings: ServerSettings, *, load: bool = True, on_load_failure=None) -> FastAPI:
  """The app; with `load`, a background thread loads and compiles the model at start-up."""
  st = ServerState(settings)

  def lifespan_load():
    try:
      st.load()
    except Exception:  # noqa: BLE001 - st.error and the log say why
      if on_load_failure is not None:
        on_load_failure()

  from contextlib import asynccontextmanager

  @asynccontextmanager
  async def lifespan(app):
    if load:
      threading.Thread(target=lifespan_load, name="llm-load", daemon=True).start()
    yield
    if st.engine is not None:
      st.engine.stop()

  app = FastAPI(title="llm_jax", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
  app.state.llm = st
  app.add_middleware(Gate, st=st)

  @app.exception_handler(ApiError)
  async def _api_error(request: Request, e: ApiError):
    request.state.audit["error"] = e.message
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

  @app.exception_handler(RequestValidationError)
  async def _invalid(request: Request, e: RequestValidationError):
    errors = e.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
      loc = []  # the location is a character offset, not a field
    param = loc[0] if loc else "body"
    message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}"
    request.state.audit["error"] = message
    body = error_body(message, param=param, code="invalid_value")
    body["detail"] = [{"loc": list(map(str, x.get("loc", ()))), "msg": x.get("msg", "")}
                      for x in errors]
    return JSONResponse(body, status_code=422)

  @app.get("/health")
  async def health():
    if st.engine is not None and st.engine.ready:
      return {"status": "ok", "model": st.name, "build_id": st.loaded.build_id,
              "uptime_s": round(time.monotonic() - st.started, 3)}
    return JSONResponse({"status": "failed" if st.error else "loading", "error": st.error},
                        status_code=503)

  @app.get("/metrics")
  async def metrics():
    return Response(st.metrics.render(), media_type=CONTENT_TYPE_LATEST)

  @app.get("/v1/models")
  async def models():
    _require_ready(st)
    cfg = st.loaded.model_config
    return {"object": "list", "data": [{
        "id": st.name, "object": "model", "created": int(time.time()), "owned_by": "llm_jax",
        "build_id": st.loaded.build_id, "max_seq_len": cfg.max_seq_len,
        "parameter_count": st.loaded.meta.get("parameter_count"),
        "precision": st.loaded.meta.get("precision", {}).get("weights")}]}

  @app.post("/v1/completions")
  async def completions(req: CompletionRequest, request: Request):
    return await _completions(st, req, request)

  return app


def _require_ready(st: ServerState) -> None:
  if st.engine is None or not st.engine.ready:
    raise ApiError(503, "the model is still loading; poll /health" if not st.error else
                   f"the model failed to load: {st.error}", type_="server_error", code="not_ready")


def _prepare(st: ServerState, req: CompletionRequest, record: dict) -> tuple[list[int], str]:
  """Prompt ids and text after the model, n, filter and length checks."""
  if req.model and req.model != st.name:
    raise ApiError(404, f"model {req.model!r} is not served here; GET /v1/models lists {st.name!r}",
                   param="model", code="model_not_found")
  if req.n > st.settings.max_n:
    raise ApiError(422, f"n: at most {st.settings.max_n} choices per request", param="n",
                   code="invalid_value")
  tok = st.loaded.tokenizer
  if isinstance(req.prompt, str):
    text = req.prompt
    ids = st.loaded.prompt_prefix + tok.encode(text)
  else:
    bad = [i for i in req.prompt if not 0 <= i < tok.vocab_size]
    if bad:
      raise ApiError(422, f"prompt: token ids {bad[:5]} are outside [0, {tok.vocab_size})",
                     param="prompt", code="invalid_value")
    ids = list(req.prompt)
    text = tok.decode(ids)
  if not ids:
    raise ApiError(422, "prompt: empty", param="prompt", code="invalid_value")
  record.update(prompt_tokens=len(ids), prompt=text)
  rule = st.settings.filters.check_input(text)
  if rule is not None:
    record["blocked_by"] = rule.name
    raise ApiError(400, f"prompt blocked by input filter {rule.name!r}: {rule.reason}",
                   param="prompt", code="input_blocked")
  max_prompt, max_total = st.limits()
  if len(ids) > max_prompt:
    raise ApiError(422, f"prompt: {len(ids)} tokens, the limit is {max_prompt}", param="prompt",
                   code="context_length_exceeded")
  if len(ids) + req.max_tokens > max_total:
    raise ApiError(422, f"max_tokens: prompt ({len(ids)}) + max_tokens ({req.max_tokens}) exceeds "
                   f"{max_total} tokens; lower max_tokens to {max_total - len(ids)}",
                   param="max_tokens", code="context_length_exceeded")
  return ids, text


async def _watch_disconnect(request: Request, handle) -> None:
  """Cancels the request when the client goes away (its receive channel reports a disconnect)."""
  while True:
    message = await request.receive()
    if message["type"] == "http.disconnect":
      handle.cancel()
      return


async def _completions(st: ServerState, req: CompletionRequest, request: Request):
  record = request.state.audit
  _require_ready(st)
  ids, text = _prepare(st, req, record)
  seed = req.seed if req.seed is not None else secrets.randbits(32)
  try:
    sampling = [G.SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                                 repetition_penalty=req.repetition_penalty,
                                 max_new_tokens=req.max_tokens, stop=tuple(req.stop or ()),
                                 seed=(seed + i) % 2**32) for i in range(req.n)]
  except ValueError as e:
    raise ApiError(422, str(e), code="invalid_value") from e
  choices = [Choice(i, ids, sampling[i], top_n=req.logprobs or 0) for i in range(req.n)]
  loop, queue = asyncio.get_running_loop(), asyncio.Queue()
  rid = request.state.request_id
  try:
    handle = st.engine.submit(choices, loop, queue, st.settings.request_timeout_s, request_id=rid)
  except EngineBusy as e:
    raise ApiError(429, f"server busy: {e}; retry later", type_="rate_limit_error",
                   code="rate_limited", headers={"Retry-After": "1"}) from e
  st.metrics.prompt_tokens.inc(len(ids))
  record.update(n=req.n, stream=req.stream, max_tokens=req.max_tokens)
  prompt_lps = None
  if req.echo and req.logprobs is not None:
    prompt_lps = await asyncio.to_thread(_prompt_logprobs, st, ids)
  ctx = _Response(st, req, handle, ids, text, prompt_lps, record)
  if req.stream:
    return StreamingResponse(ctx.sse(request), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
  return await ctx.collect(request)


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_str(tok, i: int) -> str:
  """A token as text for log-prob listings: its text, 'bytes:\\xNN' for a byte piece, or the piece
  name of a special id (so that distinct ids get distinct strings)."""
  piece = tok.id_to_piece(i)
  m = _BYTE_PIECE.match(piece)
  if m:
    return f"bytes:\\x{m.group(1).lower()}"
  text = tok.decode([i])
  return text if text else piece


def _prompt_logprobs(st: ServerState, ids: list[int]) -> list[float | None]:
  import numpy as np
  from llm_jax.serve.engine import _prompt_logprobs as fn
  cfg = st.loaded.model_config
  width = G.bucket(len(ids), cfg.max_seq_len)
  tokens = np.zeros((1, width), np.int32)
  tokens[0, :len(ids)] = ids
  lps = np.asarray(fn(st.engine.params, tokens, cfg=cfg))[:len(ids) - 1]
  return [None] + [float(x) for x in lps]


class _Response:
  """Turns engine events into an OpenAI completion (one JSON body or an SSE stream)."""

  def __init__(self, st, req, handle, ids, text, prompt_lps, record):
    self.st, self.req, self.handle, self.ids, self.text = st, req, handle, ids, text
    self.prompt_lps, self.record = prompt_lps, record
    self.created = int(time.time())
    self.texts = [""] * req.n
    self.reasons: list[str | None] = [None] * req.n
    self.ttft_observed = False

  def _observe(self, event) -> None:
    if event[0] == "delta" and not self.ttft_observed:
      self.ttft_observed = True
      ttft = time.monotonic() - self.handle.submitted
      self.st.metrics.ttft.observe(ttft)
      self.record["ttft_s"] = round(ttft, 6)
    if event[0] == "delta":
      self.texts[event[1]] += event[2]
    elif event[0] == "done":
      self.reasons[event[1]] = event[2]

  def _finalize_record(self) -> None:
    choices = self.handle.choices
    self.record.update(completion_tokens=sum(len(c.tokens) for c in choices),
                       finish_reasons=self.reasons, completion=self.texts)
    blocked = [c.blocked_by.name for c in choices if c.blocked_by is not None]
    if blocked:
      self.record["output_blocked_by"] = blocked

  def _logprobs(self, c: Choice, echo: bool) -> dict | None:
    if self.req.logprobs is None:
      return None
    tok = self.st.loaded.tokenizer
    ids = (self.ids if echo else []) + c.tokens
    lps = ((self.prompt_lps or [None] * len(self.ids)) if echo else []) + c.logprobs
    strs = [token_str(tok, t) for t in ids]
    offsets, pos = [], 0
    for s in strs:
      offsets.append(pos)
      pos += len(s)
    top = None
    if self.req.logprobs:
      top = ([None] * len(self.ids) if echo else []) + [
          {token_str(tok, i): v for i, v in row} for row in c.top]
    return {"tokens": strs, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}

  def _choice(self, c: Choice) -> dict:
    text = (self.text if self.req.echo else "") + self.texts[c.index]
    out = {"text": text, "index": c.index, "logprobs": self._logprobs(c, self.req.echo),
           "finish_reason": self.reasons[c.index]}
    if c.blocked_by is not None:
      out["content_filter"] = {"name": c.blocked_by.name, "reason": c.blocked_by.reason}
    return out

  def _usage(self) -> dict:
    done = sum(len(c.tokens) for c in self.handle.choices)
    return {"prompt_tokens": len(self.ids), "completion_tokens": done,
            "total_tokens": len(self.ids) + done}

  async def _next(self):
    remaining = self.handle.deadline - time.monotonic() + 5.0
    try:
      return await asyncio.wait_for(self.handle.queue.get(), timeout=max(0.1, remaining))
    except asyncio.TimeoutError:
      self.handle.cancel()
      return ("timeout",)

  async def collect(self, request: Request):
    watcher = asyncio.create_task(_watch_disconnect(request, self.handle))
    try:
      while True:
        event = await self._next()
        if event[0] == "timeout":
          self.reasons = ["timeout"] * self.req.n
          break
        self._observe(event)
        if event[0] == "end":
          break
    finally:
      watcher.cancel()
      self._finalize_record()
    if "cancelled" in self.reasons:
      self.record["status"] = 499
      return Response(status_code=499)
    if "timeout" in self.reasons:
      raise ApiError(504, f"request timed out after {self.st.settings.request_timeout_s:g}s",
                     type_="server_error", code="timeout")
    if "error" in self.reasons:
      raise ApiError(500, "the engine failed while decoding; see the server log",
                     type_="server_error", code="engine_error")
    return {"id": self.handle.id, "object": "text_completion", "created": self.created,
            "model": self.st.name, "choices": [self._choice(c) for c in self.handle.choices],
            "usage": self._usage()}

  def _chunk(self, index: int, text: str, finish: str | None = None, logprobs=None,
             extra: dict | None = None) -> str:
    choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}
    if extra:
      choice.update(extra)
    body = {"id": self.handle.id, "object": "text_completion", "created": self.created,
            "model": self.st.name, "choices": [choice]}
    return f"data: {json.dumps(body)}\n\n"

  async def sse(self, request: Request):
    watcher = asyncio.create_task(_watch_disconnect(request, self.handle))
    tok = self.st.loaded.tokenizer
    try:
      if self.req.echo:
        for c in self.handle.choices:
          yield self._chunk(c.index, self.text)
      while True:
        event = await self._next()
        if event[0] == "timeout":
          yield f"data: {json.dumps(error_body('request timed out', type_='server_error', code='timeout'))}\n\n"
          break
        self._observe(event)
        if event[0] == "delta":
          _, index, text, tokens, lps, top = event
          logprobs = None
          if self.req.logprobs is not None:
            logprobs = {"tokens": [token_str(tok, t) for t in tokens], "token_logprobs": lps,
                        "top_logprobs": ([{token_str(tok, i): v for i, v in row} for row in top]
                                         if self.req.logprobs else None)}
          yield self._chunk(index, text, logprobs=logprobs)
        elif event[0] == "done":
          _, index, reason = event
          if reason in ("timeout", "error"):
            code = "timeout" if reason == "timeout" else "engine_error"
            yield f"data: {json.dumps(error_body(f'generation ended: {reason}', type_='server_error', code=code))}\n\n"
            continue
          c = self.handle.choices[index]
          extra = ({"content_filter": {"name": c.blocked_by.name, "reason": c.blocked_by.reason}}
                   if c.blocked_by is not None else None)
          yield self._chunk(index, "", finish=reason, extra=extra)
        elif event[0] == "end":
          break
      if (self.req.stream_options or {}).get("include_usage"):
        body = {"id": self.handle.id, "object": "text_completion", "created": self.created,
                "model": self.st.name, "choices": [], "usage": self._usage()}
        yield f"data: {json.dumps(body)}\n\n"
      yield "data: [DONE]\n\n"
    finally:
      watcher.cancel()
      if any(r is None for r in self.reasons):
        self.handle.cancel()
        self.record["disconnected"] = True
      self._finalize_record()


# ------------------------------------------------------------------ running


def bind_socket(host: str, port: int) -> socket.socket:
  """A listening TCP socket (port 0: a free one, read back with getsockname)."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((host, port))
  sock.listen(128)
  sock.set_inheritable(True)
  return sock


class ServerThread:
  """uvicorn serving an app on a real socket from a background thread (embedding, tests)."""

  def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    import uvicorn
    self.app = app
    self.sock = bind_socket(host, port)
    self.port = self.sock.getsockname()[1]
    self.url = f"http://{host}:{self.port}"
    self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                timeout_graceful_shutdown=2))
    self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                   daemon=True)

  def start(self, wait_ready_s: float = 120.0, wait_model: bool = True) -> "ServerThread":
    """Starts serving and waits until /health would say 200 (model loaded and compiled)."""
    self.thread.start()
    st = self.app.state.llm
    if not wait_model:
      while not self.server.started:
        time.sleep(0.02)
      return self
    deadline = time.monotonic() + wait_ready_s
    while time.monotonic() < deadline:
      if st.error:
        raise RuntimeError(f"server failed to load: {st.error}")
      if st.engine is not None and st.engine.ready and self.server.started:
        return self
      time.sleep(0.05)
    raise TimeoutError(f"server not ready after {wait_ready_s}s")

  def stop(self) -> None:
    self.server.should_exit = True
    self.thread.join(timeout=10)

"""The gate in front of every route, and the error responses.

`Gate` (a plain ASGI middleware) gives each request an id, enforces the API key (every route but
/health) and the body-size limit, turns any failure a route did not handle into a 500 in OpenAI's
error shape, counts requests by the status the client received, and writes the audit line when the
response (streamed or not) has ended. `add_error_handlers` puts validation errors, `ApiError`s and
unknown routes or methods into the same shape.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from llm_jax.serve import audit as audit_lib
from llm_jax.serve.schema import ApiError, error_body

log = logging.getLogger(__name__)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


class ErrorResponse(JSONResponse):
  """A JSON response written as ASCII, so that text quoted from a bad request (a lone surrogate, say)
  can never make the error itself fail to encode."""

  def render(self, content: Any) -> bytes:
    return json.dumps(content).encode("ascii")


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
  raw = json.dumps(body).encode("ascii")
  hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
  hdrs += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
  await send({"type": "http.response.start", "status": status, "headers": hdrs})
  await send({"type": "http.response.body", "body": raw})


class Gate:
  """Request id, API key, body limit, last-resort 500, request metrics and the audit line."""

  def __init__(self, app, st):
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
    record: dict[str, Any] = {
      "event": "request",
      "id": rid,
      "method": method,
      "path": path,
      "client": (scope.get("client") or ("", 0))[0],
    }
    scope.setdefault("state", {})
    scope["state"]["audit"], scope["state"]["request_id"] = record, rid
    status: dict[str, int | None] = {"code": None}

    async def send_wrapper(message):
      if message["type"] == "http.response.start":
        status["code"] = message["status"]
        message = {**message, "headers": list(message.get("headers", [])) + [(b"x-request-id", rid.encode())]}
      await send(message)

    try:
      if path != "/health" and not self._authorized(scope):
        await _send_json(
          send_wrapper,
          401,
          error_body(
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            type_="authentication_error",
            code="invalid_api_key",
          ),
          {"www-authenticate": "Bearer"},
        )
        return
      if method in ("POST", "PUT", "PATCH"):
        body = await self._read_body(scope, receive)
        if body is None:
          await _send_json(
            send_wrapper,
            413,
            error_body(f"request body exceeds {st.settings.max_body_bytes} bytes", code="body_too_large"),
          )
          return
        receive = _replay(body, receive)
      await self.app(scope, receive, send_wrapper)
    except Exception as e:  # a failure no route handled: the client still gets an answer
      log.exception("request %s (%s %s) failed", rid, method, path)
      record["error"] = f"internal error: {type(e).__name__}"
      if status["code"] is None:
        await _send_json(
          send_wrapper,
          500,
          error_body(
            f"internal server error (request {rid}); see the server log",
            type_="server_error",
            code="internal_error",
          ),
        )
    finally:
      # 499 (nginx's 'client closed request'): the client left before any response started
      code = status["code"] or 499
      route = st.metrics.route(path)
      st.metrics.requests.labels(route, str(code)).inc()
      t1 = time.time()
      if route in ("/v1/completions", "/v1/chat/completions"):
        st.metrics.latency.observe(t1 - t0)
      if not (route in ("/health", "/metrics") and code < 400):
        record.update(
          status=code, start=audit_lib.iso(t0), end=audit_lib.iso(t1), latency_s=round(t1 - t0, 6)
        )
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


def add_error_handlers(app: FastAPI) -> None:
  """ApiError, invalid requests (400 naming the field) and unknown routes/methods in OpenAI's shape."""

  @app.exception_handler(ApiError)
  async def _api_error(request: Request, e: ApiError):
    request.state.audit["error"] = e.message
    return ErrorResponse(e.body(), status_code=e.status, headers=e.headers)

  @app.exception_handler(HTTPException)
  async def _http_error(request: Request, e: HTTPException):
    code = _HTTP_CODES.get(e.status_code, "http_error")
    message = (
      f"no route {request.url.path}"
      if e.status_code == 404
      else f"{request.method} is not allowed on {request.url.path}"
      if e.status_code == 405
      else str(e.detail)
    )
    request.state.audit["error"] = message
    return ErrorResponse(
      error_body(message, code=code), status_code=e.status_code, headers=getattr(e, "headers", None)
    )

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
    body["detail"] = [{"loc": list(map(str, x.get("loc", ()))), "msg": x.get("msg", "")} for x in errors]
    return ErrorResponse(body, status_code=400)

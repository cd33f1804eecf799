"""A reply from the engine's events: one JSON body, or a server-sent event stream.

`Responder` consumes a request's events and maps how it ended to HTTP: 200 with its choices; 500
`engine_error` when decoding failed for it (its own failure: other requests are not affected); 504 on
its timeout; 499 when the client went away. Subclasses (completions, chat) shape the bodies and chunks.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import Request
from fastapi.responses import Response

from llm_jax.serve.schema import ApiError, error_body
from llm_jax.serve.sequences import Choice, Handle


async def _watch_disconnect(request: Request, handle, record: dict) -> None:
  """Cancels the request when the client goes away (its receive channel reports a disconnect)."""
  while True:
    message = await request.receive()
    if message["type"] == "http.disconnect":
      record["disconnected"] = True
      handle.cancel()
      return


class EventStreamResponse(Response):
  """Server-sent events from an async iterator of strings: one send per item, no task group.

  Starlette's StreamingResponse (under uvicorn's ASGI 2.3) runs each stream in an anyio task group
  with a second task listening for the disconnect: two tasks, cancel scopes and events per request on
  the event loop that also feeds the engine. The responder already watches for the disconnect (it
  cancels the request, whose stream then ends), so the stream needs only to be sent."""

  media_type = "text/event-stream"

  def __init__(self, chunks, headers: dict[str, str] | None = None):
    self.chunks = chunks
    self.status_code = 200
    self.background = None
    self.init_headers(headers)

  async def __call__(self, scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
    async for chunk in self.chunks:
      await send({"type": "http.response.body", "body": chunk.encode("utf-8"), "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def sse_error(message: str, code: str) -> str:
  """A server-sent event carrying an OpenAI error body."""
  return f"data: {json.dumps(error_body(message, type_='server_error', code=code))}\n\n"


class Responder:
  """Turns engine events into a reply; subclasses define `body`, `preamble`, `delta`, `finish`."""

  chunk_object = ""

  def __init__(
    self,
    st,
    req,
    handle: Handle | None,
    choices: list[Choice],
    prompt_tokens: int,
    record: dict,
    request_id: str,
  ):
    self.st, self.req, self.handle, self.choices, self.record = st, req, handle, choices, record
    self.prompt_tokens, self.id = prompt_tokens, request_id
    self.created = int(time.time())
    self.texts = [""] * len(choices)
    # without a handle (max_tokens 0) nothing is generated: every choice has ended by length
    self.reasons: list[str | None] = [None if handle else "length"] * len(choices)
    self.ttft_observed = False

  # ------------------------------------------------------------ for subclasses

  def body(self) -> dict:
    raise NotImplementedError

  def preamble(self) -> list[dict]:
    """Chunks sent before any generated text (echo, the assistant role)."""
    return []

  def delta(self, index: int, text: str, tokens: list[int], lps: list[float], top) -> dict | None:
    raise NotImplementedError

  def finish(self, c: Choice, reason: str) -> list[dict]:
    raise NotImplementedError

  # ------------------------------------------------------------ shared

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
    self.record.update(
      completion_tokens=sum(len(c.tokens) for c in self.choices),
      finish_reasons=self.reasons,
      completion=self.texts,
    )
    blocked = [c.blocked_by.name for c in self.choices if c.blocked_by is not None]
    if blocked:
      self.record["output_blocked_by"] = blocked

  def usage(self) -> dict:
    done = sum(len(c.tokens) for c in self.choices)
    return {
      "prompt_tokens": self.prompt_tokens,
      "completion_tokens": done,
      "total_tokens": self.prompt_tokens + done,
    }

  def envelope(self, choices: list[dict], object_name: str | None = None) -> dict:
    return {
      "id": self.id,
      "object": object_name or self.chunk_object,
      "created": self.created,
      "model": self.st.name,
      "choices": choices,
    }

  async def _next(self):
    remaining = self.handle.deadline - time.monotonic() + 5.0
    try:
      return await asyncio.wait_for(self.handle.queue.get(), timeout=max(0.1, remaining))
    except asyncio.TimeoutError:
      self.handle.cancel()
      return ("timeout",)

  async def collect(self, request: Request):
    """The whole reply as one JSON body (or the error status of how the request ended)."""
    if self.handle is None:
      self._finalize_record()
      return self.body()
    watcher = asyncio.create_task(_watch_disconnect(request, self.handle, self.record))
    try:
      while True:
        event = await self._next()
        if event[0] == "timeout":
          self.reasons = ["timeout"] * len(self.choices)
          break
        self._observe(event)
        if event[0] == "end":
          break
    finally:
      watcher.cancel()
      self._finalize_record()
    if "error" in self.reasons:  # before "cancelled": a failed choice cancels its siblings
      raise ApiError(
        500,
        f"decoding failed for this request ({self.handle.id}); see the server log",
        type_="server_error",
        code="engine_error",
      )
    if "cancelled" in self.reasons:
      return Response(status_code=499)
    if "timeout" in self.reasons:
      raise ApiError(
        504,
        f"request timed out after {self.st.settings.request_timeout_s:g}s",
        type_="server_error",
        code="timeout",
      )
    return self.body()

  @staticmethod
  def _data(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"

  async def sse(self, request: Request):
    """The reply as server-sent events, ending with `data: [DONE]`."""
    watcher = (
      asyncio.create_task(_watch_disconnect(request, self.handle, self.record))
      if self.handle is not None
      else None
    )
    try:
      for chunk in self.preamble():
        yield self._data(chunk)
      if self.handle is None:
        for c in self.choices:
          for chunk in self.finish(c, "length"):
            yield self._data(chunk)
      ended = self.handle is None
      while not ended:
        # every event already queued goes out in one write (the engine posts a chunk's at once)
        events, out = [await self._next()], []
        while events[-1][0] not in ("timeout", "end") and not self.handle.queue.empty():
          events.append(self.handle.queue.get_nowait())
        for event in events:
          if event[0] == "timeout":
            out.append(sse_error("request timed out", "timeout"))
            ended = True
            break
          self._observe(event)
          if event[0] == "delta":
            _, index, text, tokens, lps, top = event
            chunk = self.delta(index, text, tokens, lps, top)
            if chunk is not None:
              out.append(self._data(chunk))
          elif event[0] == "done":
            _, index, reason = event
            if reason in ("timeout", "error"):
              code = "timeout" if reason == "timeout" else "engine_error"
              out.append(sse_error(f"generation ended: {reason}", code))
              continue
            out.extend(self._data(chunk) for chunk in self.finish(self.choices[index], reason))
          elif event[0] == "end":
            ended = True
        if out:
          yield "".join(out)
      if self.req.stream_options is not None and self.req.stream_options.include_usage:
        yield self._data({**self.envelope([]), "usage": self.usage()})
      yield "data: [DONE]\n\n"
    finally:
      if watcher is not None:
        watcher.cancel()
        if any(r is None for r in self.reasons):
          self.handle.cancel()
          self.record["disconnected"] = True
      self._finalize_record()

"""An OpenAI completion from the engine's events: one JSON body, or a server-sent event stream.

A request ends with 200 and its choices; 500 `engine_error` when decoding failed for it (its own
failure: other requests are not affected); 504 on its timeout; 499 when the client went away.
"""
from __future__ import annotations

import asyncio
import json
import re
import time

from fastapi import Request
from fastapi.responses import Response

from llm_jax.serve.sequences import Choice, Handle
from llm_jax.serve.schema import ApiError, CompletionRequest, error_body


async def _watch_disconnect(request: Request, handle) -> None:
  """Cancels the request when the client goes away (its receive channel reports a disconnect)."""
  while True:
    message = await request.receive()
    if message["type"] == "http.disconnect":
      handle.cancel()
      return


def _sse_error(message: str, code: str) -> str:
  return f"data: {json.dumps(error_body(message, type_='server_error', code=code))}\n\n"


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


class CompletionResponse:
  """Turns engine events into an OpenAI completion (one JSON body or an SSE stream)."""

  def __init__(self, st, req: CompletionRequest, handle: Handle, ids: list[int], text: str,
               prompt_lps: list[float | None] | None, record: dict):
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
    if "error" in self.reasons:  # before "cancelled": a failed choice cancels its siblings
      raise ApiError(500, f"decoding failed for this request ({self.handle.id}); see the server log",
                     type_="server_error", code="engine_error")
    if "cancelled" in self.reasons:
      return Response(status_code=499)
    if "timeout" in self.reasons:
      raise ApiError(504, f"request timed out after {self.st.settings.request_timeout_s:g}s",
                     type_="server_error", code="timeout")
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
          yield _sse_error("request timed out", "timeout")
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
            yield _sse_error(f"generation ended: {reason}", code)
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

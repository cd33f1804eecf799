"""The endpoints: /health, /metrics, /v1/models and /v1/completions (checks, then the engine).

A completion request is checked here against what the model and the engine can represent (model
name, n, prompt ids and length, top_k within the vocabulary, input filters) before anything reaches
the engine; `completion.CompletionResponse` turns the engine's events into the reply.
"""
from __future__ import annotations

import asyncio
import secrets
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from llm_jax import generate as G
from llm_jax.serve.completion import CompletionResponse
from llm_jax.serve.engine import EngineBusy
from llm_jax.serve.prefill import prompt_logprobs
from llm_jax.serve.sequences import Choice
from llm_jax.serve.schema import ApiError, CompletionRequest


def add_routes(app: FastAPI, st) -> None:
  """Registers the four routes over the shared `ServerState`."""

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


def _require_ready(st) -> None:
  if st.engine is None or not st.engine.ready:
    raise ApiError(503, "the model is still loading; poll /health" if not st.error else
                   f"the model failed to load: {st.error}", type_="server_error", code="not_ready")


def _prepare(st, req: CompletionRequest, record: dict) -> tuple[list[int], str]:
  """Prompt ids and text after the model, n, top_k, filter and length checks."""
  if req.model and req.model != st.name:
    raise ApiError(404, f"model {req.model!r} is not served here; GET /v1/models lists {st.name!r}",
                   param="model", code="model_not_found")
  if req.n > st.settings.max_n:
    raise ApiError(422, f"n: at most {st.settings.max_n} choices per request", param="n",
                   code="invalid_value")
  tok = st.loaded.tokenizer
  if req.top_k > tok.vocab_size:
    raise ApiError(422, f"top_k: at most {tok.vocab_size} (the vocabulary size; 0 turns it off)",
                   param="top_k", code="invalid_value")
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


async def _completions(st, req: CompletionRequest, request: Request):
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
  ctx = CompletionResponse(st, req, handle, ids, text, prompt_lps, record)
  if req.stream:
    return StreamingResponse(ctx.sse(request), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
  return await ctx.collect(request)


def _prompt_logprobs(st, ids: list[int]) -> list[float | None]:
  cfg = st.loaded.model_config
  width = G.bucket(len(ids), cfg.max_seq_len)
  tokens = np.zeros((1, width), np.int32)
  tokens[0, :len(ids)] = ids
  lps = np.asarray(prompt_logprobs(st.engine.params, tokens, cfg=cfg))[:len(ids) - 1]
  return [None] + [float(x) for x in lps]

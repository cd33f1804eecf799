"""The endpoints: /health, /metrics, /v1/models, /v1/completions, /v1/chat/completions, and the
tokenizer's /tokenize, /detokenize and /tokenizer_info (serve.tokenization).

A completion request is checked here against what the model and the engine can represent (model
name, n, prompt ids and length, top_k within the vocabulary, input filters) before anything reaches
the engine; `completion.CompletionResponse` turns the engine's events into the reply.
"""

from __future__ import annotations

import asyncio
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from llm_jax import generate as G
from llm_jax.serve import chat, tokenization
from llm_jax.serve.chat import ChatRequest
from llm_jax.serve.completion import CompletionResponse
from llm_jax.serve.engine import EngineBusy
from llm_jax.serve.prompts import Prompt, check_lengths, make_prompts, score
from llm_jax.serve.responder import EventStreamResponse
from llm_jax.serve.schema import ApiError, CompletionRequest
from llm_jax.serve.sequences import Choice
from llm_jax.serve.tokenization import DetokenizeRequest, TokenizeRequest


def add_routes(app: FastAPI, st) -> None:
  """Registers the routes over the shared `ServerState`."""

  @app.get("/health")
  async def health():
    if st.engine is not None and st.engine.ready:
      built, total = st.engine.programs_built()
      return {
        "status": "ok",
        "model": st.name,
        "build_id": st.loaded.build_id,
        "uptime_s": round(time.monotonic() - st.started, 3),
        # below the total: the rest of the programs are still building (requests are served meanwhile)
        "programs_built": built,
        "programs_total": total,
        # below the total: some programs have not run yet (an idle engine runs each once)
        "programs_warm": st.engine.programs_warm(),
      }
    return JSONResponse({"status": "failed" if st.error else "loading", "error": st.error}, status_code=503)

  @app.get("/metrics")
  async def metrics():
    return Response(st.metrics.render(), media_type=CONTENT_TYPE_LATEST)

  @app.get("/v1/models")
  async def models():
    _require_ready(st)
    return {"object": "list", "data": [_model_card(st)]}

  @app.get("/v1/models/{model:path}")
  async def model(model: str):  # the openai client's models.retrieve
    _require_ready(st)
    _check_model(st, model)
    return _model_card(st)

  @app.post("/v1/completions")
  async def completions(req: CompletionRequest, request: Request):
    return await _completions(st, req, request)

  @app.post("/v1/chat/completions")
  async def chat_completions(req: ChatRequest, request: Request):
    return await _chat(st, req, request)

  @app.post("/tokenize")
  async def tokenize_(req: TokenizeRequest):
    _require_ready(st)
    _check_model(st, req.model)
    return await asyncio.to_thread(tokenization.tokenize, st, req)  # a long text is not the loop's work

  @app.post("/detokenize")
  async def detokenize_(req: DetokenizeRequest):
    _require_ready(st)
    _check_model(st, req.model)
    return await asyncio.to_thread(tokenization.detokenize, st, req)

  @app.get("/tokenizer_info")
  async def tokenizer_info_():
    _require_ready(st)
    return tokenization.tokenizer_info(st)


def _model_card(st) -> dict:
  return {
    "id": st.name,
    "object": "model",
    "created": int(time.time()),
    "owned_by": "llm_jax",
    "build_id": st.loaded.build_id,
    "max_seq_len": st.loaded.model_config.max_seq_len,
    "parameter_count": st.loaded.meta.get("parameter_count"),
    "precision": st.loaded.meta.get("precision", {}).get("weights"),
  }


def _require_ready(st) -> None:
  if st.engine is None or not st.engine.ready:
    raise ApiError(
      503,
      "the model is still loading; poll /health" if not st.error else f"the model is not served: {st.error}",
      type_="server_error",
      code="not_ready",
    )


def _check_model(st, model: str | None) -> None:
  if model and model != st.name:
    raise ApiError(
      404,
      f"model {model!r} is not served here; GET /v1/models lists {st.name!r}",
      param="model",
      code="model_not_found",
    )


def check_common(st, req) -> None:
  """The model name, n and top_k checks of completions and chat."""
  _check_model(st, req.model)
  if req.n > st.settings.max_n:
    raise ApiError(
      400, f"n: at most {st.settings.max_n} choices per request", param="n", code="invalid_value"
    )
  vocab = st.loaded.tokenizer.vocab_size
  bad = [i for i in req.stop_token_ids or () if i >= vocab]
  if bad:
    raise ApiError(
      400,
      f"stop_token_ids: ids {bad[:5]} are outside [0, {vocab})",
      param="stop_token_ids",
      code="invalid_value",
    )
  if req.top_k > vocab:
    raise ApiError(
      400,
      f"top_k: at most {vocab} (the vocabulary size; 0 turns it off)",
      param="top_k",
      code="invalid_value",
    )


def submit(
  st,
  req,
  request: Request,
  prompts: list[Prompt],
  *,
  max_tokens: int,
  top_n: int,
  stop: tuple[str, ...] = (),
  stop_ids: tuple[int, ...] = (),
):
  """The choices of `prompts` (n each) queued on the engine; (handle, choices). 429 when busy."""
  seed = req.seed if req.seed is not None else secrets.randbits(32)
  stop_ids = tuple(req.stop_token_ids or ()) + stop_ids + tuple(st.loaded.stop_ids)
  try:
    sampling = [
      G.SamplingParams(
        temperature=req.temperature,
        top_k=req.top_k,
        top_p=req.top_p,
        repetition_penalty=req.repetition_penalty,
        max_new_tokens=max(1, max_tokens),
        stop=tuple(req.stop or ()) + stop,
        stop_token_ids=stop_ids,
        seed=(seed + i % req.n) % 2**32,  # choice j of every prompt: seed + j (as if sent alone)
      )
      for i in range(req.n * len(prompts))
    ]
  except ValueError as e:
    raise ApiError(400, str(e), code="invalid_value") from e
  choices = [Choice(i, prompts[i // req.n].ids, sampling[i], top_n=top_n) for i in range(len(sampling))]
  if max_tokens == 0:
    return None, choices
  loop, queue = asyncio.get_running_loop(), asyncio.Queue()
  _admit(st)
  try:
    handle = st.engine.submit(
      choices, loop, queue, st.settings.request_timeout_s, request_id=request.state.request_id
    )
  except EngineBusy as e:
    raise _busy(str(e)) from e
  st.metrics.prompt_tokens.inc(sum(len(p.ids) for p in prompts))
  return handle, choices


def _busy(why: str) -> ApiError:
  return ApiError(
    429,
    f"server busy: {why}; retry later",
    type_="rate_limit_error",
    code="rate_limited",
    headers={"Retry-After": "1"},
  )


def _admit(st) -> None:
  """429 when `max_concurrent` requests are in flight: those the engine holds and those scoring."""
  held = st.engine.in_flight + st.scoring
  if held >= st.settings.max_concurrent:
    raise _busy(f"{held} requests in flight (limit {st.settings.max_concurrent})")


async def score_prompts(st, prompts: list[Prompt]) -> None:
  """Echo's prompt scores (`prompts.score`, off the event loop), admitted as any request is (429)
  and within the request timeout (504). A request's place is held until its last forward pass has
  ended, also one left running by a timeout, so the engine never holds more than the limit."""
  _admit(st)
  deadline = time.monotonic() + st.settings.request_timeout_s
  st.scoring += 1
  held = True
  try:
    for p in prompts:
      task = asyncio.ensure_future(asyncio.to_thread(score, st, p))
      try:
        await asyncio.wait_for(asyncio.shield(task), max(deadline - time.monotonic(), 0.0))
      except asyncio.TimeoutError:  # TimeoutError's alias from 3.11, a class of its own in 3.10
        held = False  # released when the pass ends

        def release(_):
          st.scoring -= 1

        task.add_done_callback(release)
        raise ApiError(
          504,
          f"request timed out after {st.settings.request_timeout_s:g}s (scoring the prompt)",
          type_="server_error",
          code="timeout",
        ) from None
  finally:
    if held:
      st.scoring -= 1


async def respond(ctx, req, request: Request):
  """The responder's SSE stream or its JSON body."""
  if req.stream:
    return EventStreamResponse(ctx.sse(request), headers={"Cache-Control": "no-cache"})
  return await ctx.collect(request)


async def _completions(st, req: CompletionRequest, request: Request):
  record = request.state.audit
  _require_ready(st)
  check_common(st, req)
  if req.max_tokens == 0 and not req.echo:
    raise ApiError(
      400,
      "max_tokens: 0 is allowed only with echo (scoring the prompt alone)",
      param="max_tokens",
      code="invalid_value",
    )
  prompts = await asyncio.to_thread(  # tokenizing a long text is not the event loop's work
    make_prompts, st, req.prompt, record, offsets=req.echo and req.logprobs is not None
  )
  check_lengths(st, prompts, req.max_tokens)
  if req.echo and req.logprobs is not None:
    await score_prompts(st, prompts)
  handle, choices = submit(st, req, request, prompts, max_tokens=req.max_tokens, top_n=req.logprobs or 0)
  record.update(n=req.n, stream=req.stream, max_tokens=req.max_tokens, prompts=len(prompts))
  ctx = CompletionResponse(st, req, handle, choices, prompts, record, request.state.request_id)
  return await respond(ctx, req, request)


async def _chat(st, req: ChatRequest, request: Request):
  record = request.state.audit
  _require_ready(st)
  check_common(st, req)
  prompt, max_tokens = await asyncio.to_thread(chat.prepare, st, req, record)
  top_n = (req.top_logprobs or 0) if req.logprobs else 0
  handle, choices = submit(
    st,
    req,
    request,
    [prompt],
    max_tokens=max_tokens,
    top_n=top_n,
    stop=chat.stops_of(st.templates),
    stop_ids=chat.stop_ids_of(st.loaded.tokenizer, st.templates),
  )
  record.update(n=req.n, stream=req.stream, max_tokens=max_tokens)
  ctx = chat.ChatResponse(st, req, handle, choices, prompt, record, request.state.request_id)
  return await respond(ctx, req, request)

"""A bounded load test against a local server (loopback addresses only).

    python -m llm_jax.serve.loadtest --url=http://127.0.0.1:8000 --concurrency=32 --requests=500

Each request streams (SSE, with usage) so that time to first token (TTFT) and time per output token
(TPOT: (last - first token time) / (tokens - 1)) are measured per request. The client opens its
connections (GET /health on each) before the clock starts. Prints throughput,
p50/p90/p99 of latency, TTFT and TPOT, and errors by HTTP status. Exit 1 when any request failed,
2 for a refused target or a bad flag.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
import urllib.parse

import httpx

MAX_REQUESTS, MAX_CONCURRENCY = 100_000, 1024


class LoadTestError(ValueError):
  """A refused target or a bad setting."""


def check_loopback(url: str) -> str:
  """The URL if its host is a loopback address (or 'localhost'); raises otherwise."""
  parsed = urllib.parse.urlparse(url)
  if parsed.scheme not in ("http", "https") or not parsed.hostname:
    raise LoadTestError(f"--url {url!r} must look like http://127.0.0.1:PORT")
  host = parsed.hostname
  ok = host == "localhost"
  if not ok:
    try:
      ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
      ok = False
  if not ok:
    raise LoadTestError(
      f"refusing to load-test {host!r}: only loopback addresses (127.0.0.0/8, ::1, localhost) are allowed"
    )
  return url.rstrip("/")


def percentiles(values: list[float], qs=(50, 90, 99)) -> dict[str, float | None]:
  """Nearest-rank percentiles ({'p50': ...}); None when there are no values."""
  if not values:
    return {f"p{q}": None for q in qs}
  s = sorted(values)
  return {f"p{q}": s[min(len(s) - 1, max(0, int(round(q / 100 * len(s))) - 1))] for q in qs}


async def _one(client, url: str, body: dict, headers: dict) -> dict:
  t0 = time.perf_counter()
  first = last = None
  tokens = 0
  try:
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
      if r.status_code != 200:
        await r.aread()
        return {"status": r.status_code}
      done = False
      async for line in r.aiter_lines():
        if not line.startswith("data: "):
          continue
        data = line[6:]
        if data == "[DONE]":
          done = True
          break
        event = json.loads(data)
        if "error" in event:
          return {"status": f"stream-error:{event['error'].get('code')}"}
        if event.get("usage"):
          tokens = event["usage"]["completion_tokens"]
        elif any(c.get("text") for c in event.get("choices", [])):
          now = time.perf_counter()
          first = first or now
          last = now
      if not done:
        return {"status": "truncated-stream"}
  except Exception as e:  # counted by type
    return {"status": type(e).__name__}
  t1 = time.perf_counter()
  out = {"status": 200, "latency": t1 - t0, "tokens": tokens}
  if first is not None:
    out["ttft"] = first - t0
    if tokens > 1:
      out["tpot"] = (last - first) / (tokens - 1)
  return out


async def run_load(
  url: str,
  *,
  concurrency: int = 32,
  requests: int = 500,
  max_tokens: int = 64,
  prompt: str = "def ",
  temperature: float = 0.8,
  api_key: str = "",
  timeout_s: float = 120.0,
) -> dict:
  """Sends `requests` streaming completions with `concurrency` in flight; returns the summary."""
  url = check_loopback(url)
  if not 1 <= requests <= MAX_REQUESTS or not 1 <= concurrency <= MAX_CONCURRENCY:
    raise LoadTestError(
      f"--requests must be in [1, {MAX_REQUESTS}] and --concurrency in [1, {MAX_CONCURRENCY}]"
    )
  headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
  results: list[dict] = []
  counter = iter(range(requests))

  async def worker(client):
    for i in counter:
      body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
      }
      results.append({**await _one(client, url, body, headers), "index": i})

  limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
  workers = min(concurrency, requests)
  async with httpx.AsyncClient(timeout=timeout_s, limits=limits, trust_env=False) as client:
    # The client's connections open before the clock starts (one GET /health each, not counted): a
    # first request through a new httpx client took 30-45 ms of the client's own setup (docs/serving.md)
    await asyncio.gather(*(client.get(f"{url}/health") for _ in range(workers)), return_exceptions=True)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(client) for _ in range(workers)))
    wall = time.perf_counter() - t0
  ok = [r for r in results if r["status"] == 200]
  errors: dict[str, int] = {}
  for r in results:
    if r["status"] != 200:
      errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
  tokens = sum(r["tokens"] for r in ok)
  return {
    "url": url,
    "requests": requests,
    "concurrency": concurrency,
    "max_tokens": max_tokens,
    "wall_s": wall,
    "ok": len(ok),
    "errors": errors,
    "requests_per_s": len(ok) / wall if wall else 0.0,
    "output_tokens": tokens,
    "output_tokens_per_s": tokens / wall if wall else 0.0,
    "latency_s": percentiles([r["latency"] for r in ok]),
    "ttft_s": percentiles([r["ttft"] for r in ok if "ttft" in r]),
    "tpot_s": percentiles([r["tpot"] for r in ok if "tpot" in r]),
    # [request number in sending order, seconds]: are the slow first tokens the first requests?
    "slowest_ttft": sorted(([r["index"], r["ttft"]] for r in ok if "ttft" in r), key=lambda x: -x[1])[:3],
  }


def format_summary(s: dict) -> str:
  """The summary of `run_load` as a few lines of text."""

  def row(name, d):
    cells = "  ".join(f"{k} {v * 1000:8.1f} ms" if v is not None else f"{k}      n/a" for k, v in d.items())
    return f"{name:<8}{cells}"

  errors = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items())) or "none"
  return "\n".join(
    [
      f"{s['url']}: {s['requests']} requests, concurrency {s['concurrency']}, "
      f"max_tokens {s['max_tokens']}, {s['wall_s']:.2f} s",
      f"ok {s['ok']}  errors by status: {errors}",
      f"throughput: {s['requests_per_s']:.2f} requests/s, {s['output_tokens_per_s']:.1f} output "
      f"tokens/s ({s['output_tokens']} tokens)",
      row("latency", s["latency_s"]),
      row("TTFT", s["ttft_s"]),
      row("TPOT", s["tpot_s"]),
      "slowest TTFT: "
      + (", ".join(f"request {i} {t * 1000:.1f} ms" for i, t in s.get("slowest_ttft", [])) or "n/a"),
    ]
  )

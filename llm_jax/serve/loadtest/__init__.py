"""A bounded load test against a local server (loopback addresses only).

    python -m llm_jax.serve.loadtest --url=http://127.0.0.1:8000 --concurrency=32 --requests=500

Each request streams (SSE, with usage) so that time to first token (TTFT) and time per output token
(TPOT: (last - first token time) / (tokens - 1)) are measured per request. The clients run in one
process per 8 of them (at most half the cores; `--processes`), each process opening its connections
(GET /health on each) before the common clock starts. Prints throughput,
p50/p90/p99 of latency, TTFT and TPOT, and errors by HTTP status. Exit 1 when any request failed,
2 for a refused target or a bad flag.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import multiprocessing
import os
import queue
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
  # the first and last chunks with text; the first chunk of the choice at all (its text may be
  # empty: a token whose text awaits the next, e.g. the first byte of a character)
  first = last = chunk = None
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
        elif event.get("choices"):
          now = time.perf_counter()
          chunk = chunk or now
          if any(c.get("text") for c in event["choices"]):
            first = first or now
            last = now
      if not done:
        return {"status": "truncated-stream"}
  except Exception as e:  # counted by type
    return {"status": type(e).__name__}
  t1 = time.perf_counter()
  out = {"status": 200, "latency": t1 - t0, "tokens": tokens}
  if chunk is not None:
    out["first_chunk"] = chunk - t0
  if first is not None:
    out["ttft"] = first - t0
    if tokens > 1:
      out["tpot"] = (last - first) / (tokens - 1)
  return out


SHARE_CLIENTS = 8  # clients per process of the load generator by default (`run_load`'s processes=0)


def auto_processes(workers: int) -> int:
  """Processes of the load generator for `workers` clients by default: one per SHARE_CLIENTS clients,
  at most half of this machine's cores (one Python thread parsing 32 streams used 78-96% of a core
  on the H200 host and limited the figures: docs/serving.md)."""
  return max(1, min(-(-workers // SHARE_CLIENTS), (os.cpu_count() or 1) // 2))


async def _share(
  url: str, indices, workers: int, template: dict, headers: dict, timeout_s: float, start=None
):
  """One process's part of the load: `workers` clients taking request numbers from `indices`. Its
  connections open before the clock starts (and before `start`, a barrier shared with the other
  processes, lets every process go). Returns its results, start and end times and CPU seconds."""
  results: list[dict] = []
  counter = iter(indices)

  async def worker(client):
    for i in counter:
      body = {**template, "seed": i}
      results.append({**await _one(client, url, body, headers), "index": i})

  limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
  async with httpx.AsyncClient(timeout=timeout_s, limits=limits, trust_env=False) as client:
    # one GET /health per connection first: a first request through a new httpx client took 30-45 ms
    # of the client's own setup (docs/serving.md)
    await asyncio.gather(*(client.get(f"{url}/health") for _ in range(workers)), return_exceptions=True)
    if start is not None:
      await asyncio.to_thread(start.wait, 120)
    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(client) for _ in range(workers)))
    return {"results": results, "t0": t0, "t1": time.perf_counter(), "cpu": time.process_time() - cpu0}


def _share_process(args: tuple, start, out) -> None:
  """A load generator process: its share's outcome, or the error that ended it, on `out`."""
  try:
    out.put(asyncio.run(_share(*args, start=start)))
  except BaseException as e:  # reported by the parent
    out.put({"error": f"{type(e).__name__}: {e}"})


def _in_processes(url: str, requests: int, workers: int, processes: int, template, headers, timeout_s):
  """The load split over `processes` spawned processes started together: request numbers dealt
  round-robin, clients as evenly as possible. Their shares' outcomes."""
  ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads (JAX)
  start, out = ctx.Barrier(processes), ctx.Queue()
  procs = [
    ctx.Process(
      target=_share_process,
      args=(
        (
          url,
          range(p, requests, processes),
          workers // processes + (p < workers % processes),
          template,
          headers,
          timeout_s,
        ),
        start,
        out,
      ),
      daemon=True,
    )
    for p in range(processes)
  ]
  for proc in procs:
    proc.start()
  shares: list[dict] = []
  try:
    while len(shares) < len(procs):  # each request is bounded by timeout_s; a process may die
      try:
        shares.append(out.get(timeout=1.0))
        if "error" in shares[-1]:
          start.abort()  # the others stop waiting for it at the barrier
      except queue.Empty:
        dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
        if dead:
          raise RuntimeError(
            f"a load generator process exited (code {dead[0]}) without its results"
          ) from None
  finally:
    for proc in procs:
      proc.join(timeout=10)
      if proc.is_alive():
        proc.kill()
  errors = [s["error"] for s in shares if "error" in s]
  if errors:
    raise RuntimeError(f"a load generator process failed: {errors[0]}")
  return shares


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
  processes: int = 0,
) -> dict:
  """Sends `requests` streaming completions with `concurrency` in flight; returns the summary.
  `processes`: the client processes sharing the load (0: `auto_processes`); their clocks start
  together once every connection is open."""
  url = check_loopback(url)
  if not 1 <= requests <= MAX_REQUESTS or not 1 <= concurrency <= MAX_CONCURRENCY:
    raise LoadTestError(
      f"--requests must be in [1, {MAX_REQUESTS}] and --concurrency in [1, {MAX_CONCURRENCY}]"
    )
  if processes < 0:
    raise LoadTestError(f"--processes must be 0 (automatic) or more, not {processes}")
  headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
  template = {
    "prompt": prompt,
    "max_tokens": max_tokens,
    "temperature": temperature,
    "stream": True,
    "stream_options": {"include_usage": True},
  }
  workers = min(concurrency, requests)
  processes = min(processes or auto_processes(workers), workers)
  if processes == 1:
    shares = [await _share(url, range(requests), workers, template, headers, timeout_s)]
  else:
    shares = await asyncio.to_thread(
      _in_processes, url, requests, workers, processes, template, headers, timeout_s
    )
  results = [r for s in shares for r in s["results"]]
  wall = max(s["t1"] for s in shares) - min(s["t0"] for s in shares)
  cpu = sum(s["cpu"] for s in shares)
  ok = [r for r in results if r["status"] == 200]
  errors: dict[str, int] = {}
  for r in results:
    if r["status"] != 200:
      errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
  tokens = sum(r["tokens"] for r in ok)
  slowest = sorted((r for r in ok if "ttft" in r), key=lambda r: -r["ttft"])[:5]
  return {
    "url": url,
    "requests": requests,
    "concurrency": concurrency,
    "max_tokens": max_tokens,
    "wall_s": wall,
    # the client processes' CPU seconds over the load: near wall_s x processes, the client (one Python
    # thread each) is what limits the figures, not the server
    "client_processes": len(shares),
    "client_cpu_s": cpu,
    "ok": len(ok),
    "errors": errors,
    "requests_per_s": len(ok) / wall if wall else 0.0,
    "output_tokens": tokens,
    "output_tokens_per_s": tokens / wall if wall else 0.0,
    "latency_s": percentiles([r["latency"] for r in ok]),
    "ttft_s": percentiles([r["ttft"] for r in ok if "ttft" in r]),
    "tpot_s": percentiles([r["tpot"] for r in ok if "tpot" in r]),
    # [request number in sending order, seconds]: are the slow first tokens the first requests?
    "slowest_ttft": [[r["index"], r["ttft"]] for r in slowest[:3]],
    # the time to the first chunk of the choice, text or not: a TTFT far above it is a first token
    # without text of its own (its text came with a later one), not a request that waited
    "first_chunk_s": percentiles([r["first_chunk"] for r in ok if "first_chunk" in r]),
    "slowest": [
      {k: r.get(k) for k in ("index", "ttft", "first_chunk", "latency", "tokens")} for r in slowest
    ],
  }


def format_summary(s: dict) -> str:
  """The summary of `run_load` as a few lines of text."""

  def row(name, d):
    cells = "  ".join(f"{k} {v * 1000:8.1f} ms" if v is not None else f"{k}      n/a" for k, v in d.items())
    return f"{name:<8}{cells}"

  errors = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items())) or "none"
  slow = ", ".join(
    f"request {r['index']} {r['ttft'] * 1000:.1f} ms (its first chunk {r['first_chunk'] * 1000:.1f} ms)"
    for r in s["slowest"][:3]
  )
  return "\n".join(
    [
      f"{s['url']}: {s['requests']} requests, concurrency {s['concurrency']}, "
      f"max_tokens {s['max_tokens']}, {s['wall_s']:.2f} s ({s['client_processes']} client processes, "
      f"{s['client_cpu_s']:.2f} CPU s)",
      f"ok {s['ok']}  errors by status: {errors}",
      f"throughput: {s['requests_per_s']:.2f} requests/s, {s['output_tokens_per_s']:.1f} output "
      f"tokens/s ({s['output_tokens']} tokens)",
      row("latency", s["latency_s"]),
      row("TTFT", s["ttft_s"]),
      row("chunk 1", s["first_chunk_s"]),
      row("TPOT", s["tpot_s"]),
      "slowest TTFT: " + (slow or "n/a"),
    ]
  )

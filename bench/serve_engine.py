"""The server's engine under load without HTTP: where a request's time goes (issue 19).

Drives `serve.engine.Engine` in process from asyncio clients exactly as the routes do (submit, then
read the request's event queue), at each concurrency in `--clients`, and prints per load: output
tokens/s against the in-process decode loop (`eval.precision.decode_speed`, greedy), TTFT and
per-token percentiles, and the engine thread's time per iteration split by method. With
`--profile_dir` one short window per load is traced with `jax.profiler` and summarised: how much of
the window the GPU was busy, kernels and busy time per decode chunk.

    python bench/serve_engine.py --package /tmp/gpu_serve/pkg [--clients 1,32] [--requests 16,320] \
        [--max_tokens 128] [--temperature 0.8] [--chunk 16] [--profile_dir /tmp/prof] [--timeline]

Not a test: GPU figures go to docs/serving.md with the command and the run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import glob
import gzip
import json
import os
import statistics
import time

import jax

from llm_jax import generate as G
from llm_jax.artifacts import open_model
from llm_jax.eval import precision
from llm_jax.serve import engine as engine_lib
from llm_jax.serve import outputs as outputs_lib
from llm_jax.serve.engine import Engine
from llm_jax.serve.sequences import Choice

_TIMED = ("_reap", "_compact", "_admit_waiting", "_dispatch", "_handle_outputs", "_flush", "_handle_admitted")
# the first token's path, in order (--timeline): each method's first call after a request's submit
_FIRST_TOKEN = ("_admit_waiting", "_dispatch", "_handle_admitted", "_flush")


def instrument(engine: Engine, events: list | None = None) -> dict:
  """Wraps the engine thread's methods with timers: {name: [seconds, calls]}; with `events`, each
  call's (name, start, end) is appended to it too."""
  acc = collections.defaultdict(lambda: [0.0, 0])
  for name in _TIMED:
    fn = getattr(engine, name)

    def timed(*a, _fn=fn, _name=name, **k):
      t0 = time.perf_counter()
      try:
        return _fn(*a, **k)
      finally:
        t1 = time.perf_counter()
        acc[_name][0] += t1 - t0
        acc[_name][1] += 1
        if events is not None:
          events.append((_name, t0, t1))

    setattr(engine, name, timed)
  return acc


def timeline(results: list, events: list) -> str:
  """One client's first token, step by step: for each method of _FIRST_TOKEN its first call after
  the request's submit (and after the step before it), its start and end in ms after the submit
  (medians over the requests), then the client's first token, and the gap from a request's end to
  the next one's submit."""
  spans = collections.defaultdict(list)
  for r in results:
    t = r["t_submit"]
    for name in _FIRST_TOKEN:
      e = next((e for e in events if e[0] == name and e[1] >= t), None)
      if e is None:
        break
      spans[name].append((1e3 * (e[1] - r["t_submit"]), 1e3 * (e[2] - r["t_submit"])))
      t = e[2]
  ends = sorted((r["t_submit"], r["t_end"]) for r in results)
  gaps = [1e3 * (b[0] - a[1]) for a, b in zip(ends, ends[1:], strict=False)]
  parts = [
    f"{n} {statistics.median(s for s, _ in v):.2f}-{statistics.median(e for _, e in v):.2f}"
    for n, v in spans.items()
  ]
  first = statistics.median(1e3 * (r["t_first"] - r["t_submit"]) for r in results if r["t_first"])
  return (
    f"ms after submit (median): {', '.join(parts)}; client's first token {first:.2f}; "
    f"next submit {statistics.median(gaps) if gaps else float('nan'):.2f} ms after an end"
  )


def pct(xs, q):
  xs = sorted(xs)
  return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def client(engine, prompt_ids, args, seed, results):
  loop = asyncio.get_running_loop()
  sp = G.SamplingParams(temperature=args.temp, max_new_tokens=args.max_tokens, seed=seed)
  queue = asyncio.Queue()
  t0 = time.perf_counter()
  handle = engine.submit([Choice(0, list(prompt_ids), sp)], loop, queue, 600.0)
  first, times, n = None, [], 0
  while True:
    ev = await queue.get()
    if ev[0] == "delta":
      now = time.perf_counter()
      if first is None and ev[3]:
        first = now
      n += len(ev[3])
      times.append(now)
    elif ev[0] == "end":
      break
  end = time.perf_counter()
  del handle
  results.append(
    {
      "ttft": (first or end) - t0,
      "latency": end - t0,
      "tokens": n,
      "tpot": (end - first) / max(1, n - 1) if first else float("nan"),
      "t_submit": t0,
      "t_first": first,
      "t_end": end,
    }
  )


async def load(engine, prompt_ids, args, clients: int, requests: int):
  results = []
  counter = iter(range(requests))

  async def worker():
    for i in counter:
      await client(engine, prompt_ids, args, i, results)

  t0 = time.perf_counter()
  await asyncio.gather(*(worker() for _ in range(clients)))
  return results, time.perf_counter() - t0


def call_times(engine: Engine, which=None, reps: int = 10) -> str:
  """Each built program (`which(key)` true) run alone on the idle engine (Programs.warm's arguments),
  synchronously: the device time of one call plus its dispatch, without the engine loop or HTTP."""
  out = []
  for key in sorted(filter(which, engine.programs.compiled), key=str):
    times = []
    for i in range(reps + 1):
      t0 = time.perf_counter()
      engine.state = engine.programs.warm(key, engine.state)
      jax.block_until_ready(engine.state)
      if i:  # the first run loads the program
        times.append(time.perf_counter() - t0)
    out.append(f"{'-'.join(map(str, key))} {1e3 * statistics.median(times):.2f}")
  return ", ".join(out)


def summarise_trace(path: str, chunks: int) -> str:
  files = sorted(glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True))
  if not files:
    return "no trace written"
  with gzip.open(files[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  procs = {
    e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
  }
  gpu = {p for p, n in procs.items() if "gpu" in n.lower() and "host" not in n.lower()}
  ks = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e]
  if not ks:
    return f"no GPU events in {files[-1]} (processes: {sorted(set(procs.values()))[:8]})"
  ks.sort(key=lambda e: e["ts"])
  t0, t1 = ks[0]["ts"], max(e["ts"] + e["dur"] for e in ks)
  busy, end = 0.0, t0
  for e in ks:  # union of kernel intervals (streams overlap)
    s, t = max(e["ts"], end), e["ts"] + e["dur"]
    if t > s:
      busy += t - s
      end = t
  by = collections.Counter()
  for e in ks:
    by[e["name"][:60]] += e["dur"]
  top = "; ".join(f"{n} {d / 1e3:.1f} ms" for n, d in by.most_common(6))
  per = f", {len(ks) / chunks:.0f} kernels and {busy / chunks / 1e3:.2f} ms busy per chunk" if chunks else ""
  return (
    f"GPU window {(t1 - t0) / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms ({100 * busy / (t1 - t0):.0f}%), "
    f"{len(ks)} kernels{per}; top: {top}"
  )


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--package", required=True)
  p.add_argument("--clients", default="1,32")
  p.add_argument("--requests", default="16,320")
  p.add_argument("--max_tokens", type=int, default=128)
  p.add_argument("--temperature", default="0.8", help="one load per temperature, e.g. 0.8,0")
  p.add_argument("--slots", type=int, default=32)
  p.add_argument("--chunk", type=int, default=16)
  p.add_argument("--prompt", default="def ")
  p.add_argument("--reference_tokens", type=int, default=256)
  p.add_argument("--profile_dir", default="")
  p.add_argument("--timeline", action="store_true", help="one client's first token, step by step")
  p.add_argument("--json", default="")
  p.add_argument(
    "--top_n", type=int, default=None, help="top log-probs the programs compute (the server's: 5); 0: none"
  )
  p.add_argument("--xla_option", action="append", default=[], help="KEY=VALUE for the engine's compiles")
  args = p.parse_args()

  if args.top_n is not None:  # what the engine builds and unpacks (the server's constant)
    engine_lib.TOP_LOGPROBS = outputs_lib.TOP_LOGPROBS = args.top_n
  loaded = open_model(args.package, dtype="bfloat16")
  cfg = loaded.model_config
  ref = {b: precision.decode_speed(loaded.params, cfg, b, args.reference_tokens) for b in (1, 32)}
  print(
    f"{jax.devices()[0].device_kind}: in-process decode (greedy, {args.reference_tokens} new tokens): "
    f"batch 1 {ref[1]:,.0f} tokens/s, batch 32 {ref[32]:,.0f}",
    flush=True,
  )
  t0 = time.perf_counter()
  options = {}
  for kv in args.xla_option:
    if "=" not in kv:
      p.error(f"--xla_option {kv!r}: expected KEY=VALUE, e.g. xla_gpu_autotune_level=0")
    k, v = kv.split("=", 1)
    options[k] = {"true": True, "false": False}.get(v.lower(), int(v) if v.lstrip("-").isdigit() else v)
  engine = Engine(
    loaded.params,
    cfg,
    loaded.tokenizer,
    slots=args.slots,
    max_concurrent=64,
    chunk=args.chunk,
    compiler_options=options,
  )
  print(
    f"engine built in {engine.warmup():.1f} s ({len(engine.programs.compiled)} programs; "
    f"{time.perf_counter() - t0:.1f} s with the layout)",
    flush=True,
  )
  slow = sorted(engine.programs.build_s.items(), key=lambda kv: -kv[1])
  print(
    "build seconds per program (threads overlap): " + ", ".join(f"{k} {v:.1f}" for k, v in slow), flush=True
  )
  print("program call times (ms, dispatch to ready, idle engine, median of 10): " + call_times(engine))
  events = [] if args.timeline else None
  acc = instrument(engine, events)
  engine.start()
  prompt_ids = list(loaded.prompt_prefix) + loaded.tokenizer.encode(args.prompt)
  out = {"reference": ref, "loads": []}
  loads = zip(
    [int(c) for c in args.clients.split(",")], [int(r) for r in args.requests.split(",")], strict=True
  )
  temps = [float(t) for t in args.temperature.split(",")]
  for (clients, requests), temp in [(cr, t) for cr in loads for t in temps]:
    args.temp = temp
    asyncio.run(load(engine, prompt_ids, args, clients, min(requests, 2 * clients)))  # settle
    acc.clear()
    if events is not None:
      events.clear()
    steps0, calls0 = engine.steps, sum(v for k, v in engine.programs.calls.items() if k[0] == "decode")
    res, wall = asyncio.run(load(engine, prompt_ids, args, clients, requests))
    chunks = sum(v for k, v in engine.programs.calls.items() if k[0] == "decode") - calls0
    toks = sum(r["tokens"] for r in res)
    ref_b = ref[1] if clients == 1 else ref[32]
    row = {
      "clients": clients,
      "requests": requests,
      "temperature": temp,
      "tokens_per_s": toks / wall,
      "share_of_reference": toks / wall / ref_b,
      "ttft_ms": [1e3 * pct([r["ttft"] for r in res], q) for q in (0.5, 0.9, 0.99)],
      "tpot_ms": [1e3 * pct([r["tpot"] for r in res], q) for q in (0.5, 0.9, 0.99)],
      "latency_ms": 1e3 * statistics.median(r["latency"] for r in res),
      "chunks": chunks,
      "wall_per_chunk_ms": 1e3 * wall / max(1, chunks),
      "engine_ms_per_chunk": {k: 1e3 * v[0] / max(1, chunks) for k, v in acc.items()},
      "steps": engine.steps - steps0,
    }
    print(
      f"{clients} clients x {requests} at temperature {temp}: {row['tokens_per_s']:,.0f} tokens/s "
      f"({100 * row['share_of_reference']:.0f}% of in-process), TTFT p50/p90/p99 "
      + " / ".join(f"{x:.1f}" for x in row["ttft_ms"])
      + " ms, TPOT "
      + " / ".join(f"{x:.2f}" for x in row["tpot_ms"])
      + f" ms, latency p50 {row['latency_ms']:.1f} ms, "
      f"{chunks} chunks ({row['wall_per_chunk_ms']:.2f} ms each)",
      flush=True,
    )
    print(
      "  engine thread per chunk: "
      + ", ".join(
        f"{k} {v:.3f} ms" for k, v in sorted(row["engine_ms_per_chunk"].items(), key=lambda kv: -kv[1])
      )
    )
    if events is not None and clients == 1:
      row["timeline"] = timeline(res, events)
      print("  first token: " + row["timeline"], flush=True)
    if args.profile_dir:
      d = os.path.join(args.profile_dir, f"c{clients}_t{temp}")
      calls0 = sum(v for k, v in engine.programs.calls.items() if k[0] == "decode")
      jax.profiler.start_trace(d)
      asyncio.run(load(engine, prompt_ids, args, clients, max(2, min(requests, clients * 2))))
      jax.profiler.stop_trace()
      chunks = sum(v for k, v in engine.programs.calls.items() if k[0] == "decode") - calls0
      row["trace"] = summarise_trace(d, chunks)
      print("  trace: " + row["trace"], flush=True)
    out["loads"].append(row)
  engine.stop()
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()

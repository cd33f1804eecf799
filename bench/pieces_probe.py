"""Long prompts beside decoding rows, prefilled whole or in pieces (issue 19's chunked prefill).

Clients decoding short prompts (streaming, temperature 0.8, each its own number of new tokens: half
to 1.5x --max_tokens, so that they do not finish together) while one client sends long prompts one
after another; for each `--prefill_tokens` value (an engine each, built in turn): the short clients'
output tokens/s and the gaps between their streamed chunks (p50, p99, max: what a long prompt's
prefill adds to a decoding row's wait), and the long prompts' time to first token.

    python bench/pieces_probe.py --package /tmp/pkg [--prefill_tokens 2048,256] [--long_tokens 1900]

Not a test: GPU figures go to docs/serving.md with the command and the run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import jax
from serve_engine import call_times  # bench/serve_engine.py

from llm_jax import generate as G
from llm_jax.artifacts import open_model
from llm_jax.serve.engine import Engine
from llm_jax.serve.sequences import Choice


async def _stream(engine: Engine, ids: list[int], sp: G.SamplingParams):
  """(submit time, each delta event's arrival time, tokens) of one request."""
  loop, q = asyncio.get_running_loop(), asyncio.Queue()
  t0 = time.perf_counter()
  engine.submit([Choice(0, ids, sp)], loop, q, 300.0)
  times, tokens = [], 0
  while True:
    ev = await q.get()
    if ev[0] == "delta":
      times.append(time.perf_counter())
      tokens += len(ev[3])
    elif ev[0] == "end":
      return t0, times, tokens


async def _load(engine: Engine, short_ids, long_prompts, args, calls=None) -> dict:
  done, gaps, tokens = asyncio.Event(), [], [0]

  async def short_client(i: int):  # lengths from half to 1.5x --max_tokens: clients out of step
    n = int(args.max_tokens * (0.5 + i / args.short_clients))
    short = G.SamplingParams(temperature=0.8, max_new_tokens=n)
    while not done.is_set():
      _, times, n = await _stream(engine, short_ids, short)
      gaps.extend((b - a, a) for a, b in zip(times, times[1:], strict=False))
      tokens[0] += n

  async def long_client():
    ttft = []
    for ids in long_prompts:
      t0, times, _ = await _stream(engine, ids, G.SamplingParams(temperature=0.8, max_new_tokens=4))
      ttft.append(times[0] - t0)
      await asyncio.sleep(args.long_every)
    done.set()
    return ttft

  t0 = time.perf_counter()
  shorts = [asyncio.ensure_future(short_client(i)) for i in range(args.short_clients)]
  ttft = await long_client()
  await asyncio.gather(*shorts)
  wall = time.perf_counter() - t0
  gaps = sorted(gaps) or [(float("nan"), 0.0)]
  ms = [1e3 * gaps[int(q * (len(gaps) - 1))][0] for q in (0.5, 0.99, 1.0)]
  if calls is not None:  # the calls dispatched during the longest gap (ms after its start)
    gap, start = gaps[-1]
    near = [(k, t) for k, t in calls if start - 0.1 <= t <= start + gap]
    seen = [f"{'-'.join(map(str, k[:2]))}@{1e3 * (t - start):.1f}" for k, t in near]  # ("state",): one part
    print(f"longest gap {1e3 * gap:.1f} ms: {' '.join(seen)}", flush=True)
  return {
    "tok_s": tokens[0] / wall,
    "gap_ms": ms,
    "ttft_ms": [1e3 * statistics.median(ttft), 1e3 * max(ttft)],
  }


def _timed(key: tuple) -> bool:
  """The programs --call_times times: the pieces', one prompt's admission, chunks over 8 rows."""
  kind = key[0]
  return (
    kind in ("extend", "piece") or (kind == "admit" and key[2] == 1) or (kind == "decode" and key[1] == 8)
  )


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--package", required=True)
  p.add_argument("--prefill_tokens", default="2048,256", help="one engine per value, in turn")
  p.add_argument("--long_tokens", type=int, default=1900)
  p.add_argument("--long_requests", type=int, default=12)
  p.add_argument("--long_every", type=float, default=0.25, help="seconds between long prompts")
  p.add_argument("--short_clients", type=int, default=8)
  p.add_argument("--max_tokens", type=int, default=128)
  p.add_argument("--slots", type=int, default=16)
  p.add_argument("--call_times", action="store_true", help="time the pieces' and chunks' programs alone")
  args = p.parse_args()
  loaded = open_model(args.package, dtype="bfloat16")
  tok, cfg = loaded.tokenizer, loaded.model_config
  short_ids = list(loaded.prompt_prefix) + tok.encode("def ")
  rng = random.Random(0)
  n = min(args.long_tokens, cfg.max_seq_len - 8)
  long_prompts = [[rng.randrange(3, tok.vocab_size) for _ in range(n)] for _ in range(args.long_requests)]
  print(
    f"{jax.devices()[0].device_kind}: {cfg.num_layers} layers x {cfg.d_model}, cache {cfg.max_seq_len}",
    flush=True,
  )
  rows = []
  for budget in [int(x) for x in args.prefill_tokens.split(",")]:
    engine = Engine(loaded.params, cfg, tok, slots=args.slots, max_concurrent=64, prefill_tokens=budget)
    t = engine.warmup()
    if args.call_times:  # the pieces' programs and the chunks beside them, each alone
      print("call ms:", call_times(engine, _timed))
    engine.start()
    while engine.programs_warm() < len(engine.programs.compiled):  # first runs done while idle
      time.sleep(0.1)
    asyncio.run(_load(engine, short_ids, long_prompts[:2], args))  # settle
    before, calls, run = engine.programs.calls.copy(), [], engine.programs.run

    def logged(key, *a, _calls=calls, _run=run, **k):
      _calls.append((key, time.perf_counter()))
      return _run(key, *a, **k)

    engine.programs.run = logged
    r = asyncio.run(_load(engine, short_ids, long_prompts, args, calls))
    used = engine.programs.calls - before
    pieces = {f"{k[0]}-{k[1]}": v for k, v in used.items() if k[0] in ("extend", "piece")}
    engine.stop()
    print(
      f"prefill_tokens {budget} (piece {engine.piece or 'none'}; built in {t:.1f} s): {r} {pieces}",
      flush=True,
    )
    rows.append((budget, engine.piece, r))
  print(
    "\n| prefill_tokens | piece | short clients tok/s | gap p50 / p99 / max ms | long TTFT median / max ms |"
  )
  print("| --- | --- | --- | --- | --- |")
  for budget, piece, r in rows:
    g, f = r["gap_ms"], r["ttft_ms"]
    gaps = f"{g[0]:.1f} / {g[1]:.1f} / {g[2]:.1f}"
    print(f"| {budget} | {piece or '-'} | {r['tok_s']:,.0f} | {gaps} | {f[0]:.0f} / {f[1]:.0f} |")


if __name__ == "__main__":
  main()

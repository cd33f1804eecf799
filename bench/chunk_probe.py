"""Where a server decode chunk's time per step goes: variants of the 16-step decode chunk, each timed
alone, and the kernels of each variant's compiled loop body counted from its optimized HLO.

On an H200 the server's chunk (serve/prefill.py `decode_rows`, 16 steps) cost 0.61 ms a step at 2
rows against 0.44 ms for the library's greedy loop (`eval.precision.decode_speed`, batch 1). Random
weights of configs/gpt_small.py's shapes (bf16, laid out as the engine lays them out:
`unstack_layers(levers=serve.engine.default_levers(params))`, "qkv,norm,kv" on a GPU, "qkv,norm" on
a CPU), a state prefilled with prompts of 61-64 tokens (positions ~64). Variants, at each --rows B:

  ref                      decode_loop, greedy=True, top_n=0 (while_loop of max_steps=--steps)
  ref_span128              the same reading the first 128 cache positions (decode_speed's batch-1
                           figure read 512: 8-token prompts + 256 new tokens)
  chunk_greedy             decode_chunk, greedy=True, top_n=0
  chunk_t0.8               decode_chunk, every row at temperature 0.8, filtered=False, top_n=0
  chunk_t0.8_top5_off      the same with top_n=5, want_top False (the log-softmax, the lax.cond)
  chunk_t0.8_top5_on       the same with top_n=5, want_top True (top_k in the taken branch)
  chunk_t0.8_span128       chunk_t0.8 with span=128
  chunk_as_server_top0     chunk_as_server with top_n=0 (no log-softmax, no conditional)
  chunk_as_server_top5_static  chunk_as_server computing the top 5 every step, want_top a Python
                           bool (no conditional)
  chunk_as_server          (added) chunk_t0.8_top5_off with span=128 and the server's vocab_limit
                           (--vocab_limit: bench/gpu_serve.sh's tokenizer has 2,000 pieces against
                           50,304 embedding rows, so every step masks the padded rows): decode_rows'
                           inner program on a B-row state, without the row slicing around it
  rows_B_of_32             serve.prefill.decode_rows over the first B rows of a --state_rows (32) row
                           state: top_n=5, want_top False, filtered=False, temperature 0.8, span 128,
                           --vocab_limit: the server's program ("decode", B, 128, False). Only B < 32.
  rows_B_of_32_span0       the same over the whole cache (span 0: the state's cache is not sliced)
  rows_B_of_32_top0        rows_B_of_32 without top log-probs: the server's program since the decode
                           programs compute them only when a row asks ("decode", B, 128, False, False)

Deviations from the brief, and how the code differs from what one might assume:
  * eos_id=-1 everywhere (as decode_speed): random weights may draw the tokenizer's EOS, which would
    end rows (and the `ref` while_loop) early. The per-step work is the same.
  * decode_chunk/decode_rows donate the state, and every call advances positions by --steps; before
    each call (untimed) the small per-row arrays (positions, active, remaining, pending, next) are put
    back, so every call runs at positions ~64..80 and span 128 stays valid. decode_loop (`ref`) does
    not donate: the same state is reused, and each call also copies the input cache (B rows) once.
  * The rows variants jit decode_rows itself (donate_argnums=1), as serve.programs does, but over
    pytrees rather than serve.programs' flat leaf lists and without jax.export: the same HLO.
  * Timing: each call is the compiled executable's call, then block_until_ready, so ms/call includes
    one dispatch (host) per call; median of --iters after --warmup calls.

Kernel counts are a static heuristic (llm_jax.eval.decode_kernels' HLO parser): the top-level
instructions of the largest while body of the optimized HLO (a `call`, e.g. an XLA:GPU command
buffer, counts its callee's), minus tuple plumbing (parameter, get-tuple-element, tuple, constant,
bitcast, ...). Each remaining one is taken as one kernel launch; a `conditional` counts as one and its
branches' ops are listed apart ("cond branch ops", branch 0 / 1: a bool predicate's False / True;
not in the total); a nested while counts as one. Per
step = body ops x trip count / --steps (XLA may unroll the loop; the `ref` while_loop has no known
trip count: one step per iteration). "outside" = launching ops of the entry computation per call
(the while itself, and e.g. decode_rows' slicing and write-back). On a CPU the counts are a rough
proxy only (CPU and GPU fuse differently).

    python bench/chunk_probe.py                         # on the GPU: rows 2,32, gpt_small shapes
    python bench/chunk_probe.py --dump /tmp/chunk_hlo   # also each variant's optimized HLO text
    python bench/chunk_probe.py --small                 # CPU smoke test (< 2 minutes on 2 cores)
    python bench/chunk_probe.py --rows 2 --variants chunk_as_server,rows --trace /tmp/tr
    python bench/analyze_trace.py /tmp/tr/rows_b2 --steps 320   # kernels of the traced calls
    python bench/chunk_probe.py --unroll 4              # decode_chunk's fori_loop unrolled (not adopted)

Results (one H200, 2026-12-01): docs/serving.md, "Issue 19, round six".
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import config as config_lib
from llm_jax import generate as G
from llm_jax.artifacts import inference_config
from llm_jax.eval.decode_kernels import _computations, _count, format_ops
from llm_jax.model import ModelConfig, unstack_layers
from llm_jax.model.params import init_params
from llm_jax.serve.engine import default_levers
from llm_jax.serve.prefill import decode_rows

_ROWS_STATIC = ("cfg", "steps", "top_n", "vocab_limit", "span", "eos_id", "filtered", "unroll")
_DECODE_ROWS = jax.jit(decode_rows, static_argnames=_ROWS_STATIC, donate_argnums=1)
_REWOUND = ("positions_B", "active_B", "remaining_B", "pending_B", "next_B")  # put back before a call


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  kind: str  # "loop" (decode_loop), "chunk" (decode_chunk) or "rows" (serve.prefill.decode_rows)
  temperature: float = 0.8
  greedy: bool = False
  top_n: int = 0
  want_top: bool = False
  span: int = 0
  server_limit: bool = False  # vocab_limit = --vocab_limit (else None: every embedding row is real)
  static_top: bool = False  # want_top a Python bool of the program (no conditional in the step)


VARIANTS = [
  Variant("ref", "loop", temperature=0.0, greedy=True),
  Variant("ref_span128", "loop", temperature=0.0, greedy=True, span=128),
  Variant("chunk_greedy", "chunk", temperature=0.0, greedy=True),
  Variant("chunk_t0.8", "chunk"),
  Variant("chunk_t0.8_top5_off", "chunk", top_n=5),
  Variant("chunk_t0.8_top5_on", "chunk", top_n=5, want_top=True),
  Variant("chunk_t0.8_span128", "chunk", span=128),
  Variant("chunk_as_server", "chunk", top_n=5, span=128, server_limit=True),
  Variant("chunk_as_server_top0", "chunk", top_n=0, span=128, server_limit=True),
  Variant(
    "chunk_as_server_top5_static",
    "chunk",
    top_n=5,
    want_top=True,
    span=128,
    server_limit=True,
    static_top=True,
  ),
  Variant("rows", "rows", top_n=5, span=128, server_limit=True),
  Variant("rows_span0", "rows", top_n=5, span=0, server_limit=True),
  Variant("rows_top0", "rows", top_n=0, span=128, server_limit=True),
]


def model(args) -> tuple[dict, ModelConfig]:
  """Random params of configs/gpt_small.py's shapes (with the flags' overrides) in the engine's layout."""
  overrides = [f"model.vocab_size={args.vocab}"]
  if args.layers:
    overrides.append(f"model.num_layers={args.layers}")
  if args.d_model:
    overrides += [f"model.d_model={args.d_model}", f"model.num_heads={max(1, args.d_model // 16)}"]
  if args.max_seq_len:
    overrides.append(f"model.max_seq_len={args.max_seq_len}")
  config = config_lib.load("configs/gpt_small.py", overrides)
  cfg = inference_config(ModelConfig.from_config(config), args.dtype)
  params = jax.tree.map(lambda x: x.astype(jnp.dtype(cfg.dtype)), init_params(cfg))
  levers = default_levers(params) if args.levers == "auto" else args.levers
  return unstack_layers(params, cfg, levers=levers)


def prefilled(params, cfg: ModelConfig, rows: int, temperature: float, prompt_len: int) -> G.DecodeState:
  """`rows` rows prefilled with prompts of prompt_len-3 .. prompt_len tokens, every row live."""
  prompts = [[1] + [5 + (7 * i + j) % 50 for j in range(prompt_len - 1 - i % 4)] for i in range(rows)]
  sampling = [
    G.SamplingParams(temperature=temperature, max_new_tokens=cfg.max_seq_len, seed=i) for i in range(rows)
  ]
  tokens, lengths = G.pad_prompts(prompts, cfg)
  return G.start(params, tokens, lengths, **G.sampling_arrays(sampling), cfg=cfg)


def loop_counts(hlo: str, steps: int) -> dict:
  """Per-step launching ops of the largest while body, its conditionals' branches, and the ops of
  the entry computation (per call). Without a while loop (fully unrolled) the entry / steps."""
  comps = _computations(hlo)
  entry = re.search(r"^ENTRY\s+%?([\w.\-]+)", hlo, re.M).group(1)
  outside = _count(comps, entry)
  best, trip = None, None
  for line in hlo.splitlines():
    m = re.search(r"\bwhile\(.*?body=%?([\w.\-]+)", line)
    if not m:
      continue
    ops = _count(comps, m.group(1))
    if best is None or sum(ops.values()) > sum(best[1].values()):
      n = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
      best, trip = (m.group(1), ops), int(n.group(1)) if n else None
  if best is None:
    return dict(per_step=1.0 / steps, body=outside, branches=[], outside=collections.Counter(), trip=0)
  body_name, body = best
  branches = []
  for line in comps.get(body_name, "").splitlines():
    if " conditional(" not in line:
      continue
    m = re.search(r"branch_computations=\{([^}]*)\}", line)
    names = re.findall(r"%?([\w.\-]+)", m.group(1)) if m else []
    names = names or re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line)
    branches.append([sum(_count(comps, b).values()) for b in names])
  return dict(
    per_step=(trip / steps) if trip else 1.0, body=body, branches=branches, outside=outside, trip=trip
  )


def run_variant(v: Variant, b: int, params, cfg: ModelConfig, args) -> dict:
  """(a function timing one round of calls: ms per call, median; the compiled HLO text) of one
  variant at b rows."""
  limit = args.vocab_limit if v.server_limit and 0 < args.vocab_limit < cfg.vocab_size else None
  common = dict(cfg=cfg, eos_id=-1, top_n=v.top_n, vocab_limit=limit, span=v.span)
  alive, want = np.ones((b,), bool), np.bool_(v.want_top)
  if v.kind == "loop":
    state = prefilled(params, cfg, b, v.temperature, args.prompt_len)
    jitted, dyn = G.decode_loop, (params, state)
    static = dict(common, max_steps=args.steps, greedy=v.greedy, filtered=False)
  elif v.kind == "chunk":
    state = prefilled(params, cfg, b, v.temperature, args.prompt_len)
    jitted, dyn = G.decode_chunk, (params, state, alive, want)
    static = dict(common, steps=args.steps, greedy=v.greedy, filtered=False, unroll=args.unroll)
    if v.static_top:
      top, kw, static = bool(v.want_top), static, {}
      jitted = jax.jit(lambda p, s, a, w: G.decode_chunk.__wrapped__(p, s, a, top, **kw), donate_argnums=1)
  else:
    state = prefilled(params, cfg, args.state_rows, v.temperature, args.prompt_len)
    jitted, dyn = _DECODE_ROWS, (params, state, alive, want)
    static = dict(common, steps=args.steps, filtered=False, unroll=args.unroll)
  t_compile = time.perf_counter()
  compiled = jitted.lower(*dyn, **static).compile()
  print(f"{v.name} B={b}: compiled in {time.perf_counter() - t_compile:.1f} s", flush=True)
  hlo = compiled.as_text()
  start = {k: np.asarray(getattr(state, k)) for k in _REWOUND}
  dispatch = []  # host ms until the call returned (the device still running it)

  def once() -> float:
    nonlocal state
    if v.kind != "loop":  # donated: run from the same positions every call
      state = state.replace(**{k: jnp.asarray(x) for k, x in start.items()})
      jax.block_until_ready(state)
    t0 = time.perf_counter()
    out = compiled(params, state) if v.kind == "loop" else compiled(params, state, alive, want)
    dispatch.append(1e3 * (time.perf_counter() - t0))
    jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    if v.kind != "loop":
      state = out[0]
    return dt

  for _ in range(args.warmup):
    once()

  def timed(round_: int) -> float:
    trace = contextlib.nullcontext()
    if args.trace and round_ == 0:  # a profile of the timed calls: bench/analyze_trace.py DIR/<variant>_b<B>
      trace = jax.profiler.trace(os.path.join(args.trace, f"{v.name}_b{b}"), create_perfetto_trace=True)
    with trace:
      return 1e3 * statistics.median(once() for _ in range(args.iters))

  return dict(timed=timed, hlo=hlo, dispatch=dispatch)


def dispatch_floor(params, reps: int = 50) -> str:
  """Host ms to dispatch a program that reads one element of one leaf, given every parameter leaf
  (as the engine's programs are) against given that leaf alone: the cost of the arguments."""
  leaves = jax.tree.leaves(params)
  many = jax.jit(lambda pl: pl[0].ravel()[0]).lower(leaves).compile()
  one = jax.jit(lambda x: x.ravel()[0]).lower(leaves[0]).compile()
  out = []
  for name, call, arg in (("all leaves", many, leaves), ("one leaf", one, leaves[0])):
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      r = call(arg)
      times.append(1e3 * (time.perf_counter() - t0))
      jax.block_until_ready(r)
    out.append(f"{name} {statistics.median(times[5:]):.3f} ms")
  return f"dispatch of a trivial program over {len(leaves)} parameter leaves: " + ", ".join(out)


def _n(x: float) -> str:
  return f"{x:.0f}" if abs(x - round(x)) < 1e-9 else f"{x:.1f}"


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", default="2,32", help="rows B of each variant (comma-separated)")
  p.add_argument("--steps", type=int, default=16, help="decode steps per call (the server's chunk)")
  p.add_argument("--iters", type=int, default=20, help="timed calls per variant (median)")
  p.add_argument("--warmup", type=int, default=3, help="untimed calls per variant after compiling")
  p.add_argument("--vocab", type=int, default=50304, help="embedding rows")
  p.add_argument("--vocab_limit", type=int, default=2000, help="the server's tokenizer size (0: none)")
  p.add_argument("--layers", type=int, default=0, help="0: gpt_small's")
  p.add_argument("--d_model", type=int, default=0, help="0: gpt_small's (heads: d_model / 16 when set)")
  p.add_argument("--max_seq_len", type=int, default=0, help="0: gpt_small's")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--levers", default="auto", help="decode levers; auto: the engine's default_levers")
  p.add_argument("--state_rows", type=int, default=32, help="rows of the server's state (its slots)")
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--variants", default="", help="comma-separated names to run (default: all)")
  p.add_argument("--dump", default="", help="write each variant's optimized HLO to DIR/<variant>_b<B>.txt")
  p.add_argument("--unroll", type=int, default=1, help="decode_chunk's fori_loop unroll (chunk, rows)")
  p.add_argument("--trace", default="", help="profile each variant's timed calls into DIR/<variant>_b<B>")
  p.add_argument("--rounds", type=int, default=1, help="timing rounds over the variants (round-robin)")
  p.add_argument("--small", action="store_true", help="CPU smoke test: tiny shapes, 2 timed calls")
  args = p.parse_args()
  if args.small:
    args.vocab, args.vocab_limit, args.layers, args.d_model = 512, 400, 2, 64
    args.max_seq_len, args.iters, args.warmup = 256, 2, 1
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)
  params, cfg = model(args)
  print(
    f"model: {cfg.num_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, max_seq_len "
    f"{cfg.max_seq_len}, {cfg.dtype}, levers {cfg.decode_levers!r}; steps {args.steps}, "
    f"iters {args.iters}, server vocab_limit {args.vocab_limit}",
    flush=True,
  )
  print(dispatch_floor(params), flush=True)
  wanted = set(filter(None, args.variants.split(",")))
  if args.dump:
    os.makedirs(args.dump, exist_ok=True)
  table = []
  for b in [int(x) for x in args.rows.split(",")]:
    built = []  # (name, the variant's run_variant result, its loop counts)
    for v in VARIANTS:
      if wanted and v.name not in wanted:
        continue
      if v.kind == "rows" and b >= args.state_rows:
        continue
      if v.span and v.span >= cfg.max_seq_len:
        continue
      name = v.name.replace("rows", f"rows_{b}_of_{args.state_rows}", 1) if v.kind == "rows" else v.name
      try:
        r = run_variant(v, b, params, cfg, args)
        built.append((name, r, loop_counts(r["hlo"], args.steps)))
      except Exception as e:  # noqa: BLE001 - report and go on to the next variant
        print(f"{name} B={b}: {type(e).__name__}: {str(e).strip()[:300]}", flush=True)
        table.append(f"| {name} | {b} | error | | | | | | | | |")
    # round-robin: each round times every variant once, so a drift of the machine's speed shows in
    # every variant's spread instead of in the difference between two of them
    times = {name: [] for name, _, _ in built}
    for round_ in range(args.rounds):
      for name, r, _ in built:
        times[name].append(r["timed"](round_))
    for name, r, c in built:
      if args.dump:
        with open(os.path.join(args.dump, f"{name}_b{b}.txt"), "w") as f:
          f.write(r["hlo"])
      body, k = c["body"], c["per_step"]
      copies = body["copy"] + body["copy-start"]
      others = sum(body.values()) - body["fusion"] - body["custom-call"] - copies
      branches = "; ".join("/".join(map(str, br)) for br in c["branches"]) or "-"
      ms = statistics.median(times[name])
      disp = statistics.median(r["dispatch"][args.warmup :] or r["dispatch"])
      spread = "/".join(f"{1e3 * t / args.steps:.0f}" for t in times[name])
      print(
        f"{name} B={b}: {ms:.3f} ms/call, dispatch {disp:.3f} ms (us/step by round: {spread}); "
        f"body (trip {c['trip']}): {format_ops(body)}; cond branches {branches}; "
        f"outside the loop: {format_ops(c['outside'])}",
        flush=True,
      )
      table.append(
        f"| {name} | {b} | {ms:.3f} | {1e3 * ms / args.steps:.1f} ({spread}) | "
        f"{_n(k * sum(body.values()))} | {_n(k * body['fusion'])} | {_n(k * body['custom-call'])} | "
        f"{_n(k * copies)} | {_n(k * others)} | {branches} | {sum(c['outside'].values())} |"
      )
    del built
  print()
  print(
    "| variant | rows | ms/call | us/step (each round) | launching ops per step (body) | fusions | "
    "custom-calls | copies | other ops | "
    "cond branch ops (0/1: want_top off/on) | ops outside the loop per call |"
  )
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  print("\n".join(table))


if __name__ == "__main__":
  main()

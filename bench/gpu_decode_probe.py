"""Where batch-1 decode time goes: decode variants under several XLA command-buffer settings.

Random bf16 weights of configs/gpt_small.py (vocab 50304), a prompt of 8 tokens, NEW greedy tokens.
Each XLA_FLAGS setting runs in its own process (flags are read once per process); inside it:

  loop        decode_loop, the general sampling step, whole-cache attention, batch as given
  loop_greedy decode_loop with the argmax-only step
  batch       what generate() runs now: make_batch (at least MIN_ROWS rows, greedy step, cache
              span bucket) then decode_loop
  chunk16     decode_chunk of 16 steps called from Python until done (the server's pattern)
  model_only  a fori_loop of the model's one-token forward + argmax: the floor for this model code

The first setting also traces `loop_greedy` at batch 1 and prints where GPU time goes (kernels per
step, GPU busy share). A table is printed last.

    python3 bench/gpu_decode_probe.py [--batches 1,32] [--new 256]   # on the device machine
    # CPU smoke test (tiny shapes):
    python bench/gpu_decode_probe.py --config configs/tiny.py --vocab 0 --new 16 --settings default
"""
import argparse
import json
import os
import subprocess
import sys
import time

SETTINGS = {
    "default": "",
    "cb_off": "--xla_gpu_enable_command_buffer=",
    "cb_while": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,"
                "CONDITIONAL,WHILE",
    "cb_while_min1": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,"
                     "CONDITIONAL,WHILE --xla_gpu_graph_min_graph_size=1",
}


def child(a):
  import functools
  import jax
  import jax.numpy as jnp
  import numpy as np
  import flax.linen as nn
  from llm_jax import config as config_lib, package as P, generate as G
  from llm_jax.model import Decoder, ModelConfig, unstack_layers

  overrides = [f"model.vocab_size={a.vocab}"] if a.vocab else []
  config = config_lib.load(a.config, overrides)
  cfg = P.inference_config(ModelConfig.from_config(config, tokenizer_size=2000), "bfloat16")
  init = jax.jit(lambda k: nn.unbox(Decoder(cfg).init(k, jnp.zeros((1, 1), jnp.int32))["params"]))
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), init(jax.random.key(0)))
  if a.unstacked:
    params, cfg = unstack_layers(params, cfg)
  new = min(a.new, cfg.max_seq_len - 9)
  print(f"[{a.setting}] {jax.devices()[0].device_kind} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} "
        f"{cfg.param_count():,} params, scan_layers {cfg.scan_layers}, unroll {cfg.scan_unroll}", flush=True)

  @functools.partial(jax.jit, static_argnames=("steps",))
  def model_only(params, state, steps):
    def body(i, carry):
      cache, logits_BV, pos_B = carry
      tok_B = jnp.argmax(logits_BV, -1).astype(jnp.int32)
      cache, logits_BV = G._forward_one(params, cache, tok_B, pos_B, cfg)
      return cache, logits_BV, pos_B + 1
    return jax.lax.fori_loop(0, steps, body, (state.cache, state.logits_BV, state.positions_B))

  def fresh(b):
    prompts = [[1, 5 + i % 50, 6, 7, 8, 9, 10, 11] for i in range(b)]
    sp = G.SamplingParams(max_new_tokens=new)
    tokens, lengths = G.pad_prompts(prompts, cfg)
    return G.start(params, tokens, lengths, **G.sampling_arrays([sp] * b), cfg=cfg)

  steps = G.bucket(new, cfg.max_seq_len, minimum=16)

  def runner(variant, b):
    if variant == "batch":
      mb = G.make_batch([[1, 5 + i % 50, 6, 7, 8, 9, 10, 11] for i in range(b)],
                        [G.SamplingParams(max_new_tokens=new)] * b, cfg)
      return lambda st: G.decode_loop(params, mb.start(params, cfg), cfg=cfg, max_steps=mb.max_steps,
                                      eos_id=-1, greedy=mb.greedy, span=mb.span)
    if variant == "loop":
      return lambda st: G.decode_loop(params, st, cfg=cfg, max_steps=steps, eos_id=-1)
    if variant == "loop_greedy":
      return lambda st: G.decode_loop(params, st, cfg=cfg, max_steps=steps, eos_id=-1, greedy=True)
    if variant == "model_only":
      return lambda st: model_only(params, st, new)
    if variant == "chunk16":
      alive = np.ones((b,), bool)

      def go(st):
        out = None
        for _ in range(-(-new // 16)):
          st, out = G.decode_chunk(params, st, alive, cfg=cfg, steps=16, eos_id=-1, greedy=True)
        return out
      return go
    raise ValueError(variant)

  rows = []
  for b in a.batches:
    for variant in a.variants:
      run = runner(variant, b)
      t0 = time.perf_counter()
      jax.block_until_ready(run(fresh(b)))
      compile_s = time.perf_counter() - t0
      best = float("inf")
      for _ in range(3):
        st = jax.block_until_ready(fresh(b))
        t0 = time.perf_counter()
        jax.block_until_ready(run(st))
        best = min(best, time.perf_counter() - t0)
      row = dict(setting=a.setting + ("/unstacked" if a.unstacked else ""), variant=variant, batch=b, tokens_per_s=b * new / best,
                 ms_per_step=1000 * best / new, first_call_s=compile_s)
      rows.append(row)
      print(f"[{a.setting}] {variant:12s} batch {b:3d}: {row['tokens_per_s']:9.0f} tok/s "
            f"{row['ms_per_step']:.3f} ms/step (first call {compile_s:.1f} s)", flush=True)
  for b in (a.trace_batches if a.trace else []):
    mb = G.make_batch([[1, 5 + i % 50, 6, 7, 8, 9, 10, 11] for i in range(b)],
                      [G.SamplingParams(max_new_tokens=new)] * b, cfg)
    fresh = lambda b, mb=mb: mb.start(params, cfg)
    st = jax.block_until_ready(fresh(b))
    kw = dict(cfg=cfg, max_steps=64, eos_id=-1, greedy=True, span=mb.span)
    run = lambda st, kw=kw: G.decode_loop(params, st, **kw)
    if a.hlo_dir:
      with open(os.path.join(a.hlo_dir, f"decode_loop_b{b}_{a.setting}.hlo.txt"), "w") as f:
        f.write(G.decode_loop.lower(params, st, **kw).compile().as_text())
    jax.block_until_ready(run(st))
    st = jax.block_until_ready(fresh(b))
    trace_dir = f"{a.trace}_b{b}"
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    jax.block_until_ready(run(st))
    jax.profiler.stop_trace()
    print(f"--- trace of decode_loop(greedy, span {mb.span}) batch {b} ({mb.tokens_BL.shape[0]} rows), "
          f"64 steps, XLA_FLAGS "
          f"{os.environ.get('XLA_FLAGS', '')!r}")
    subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "analyze_trace.py"),
                    trace_dir, "--steps", "64", "--top", "25"], check=False)
    one_step(trace_dir, 64)
  with open(a.json, "w") as f:
    json.dump(rows, f)


def one_step(trace_dir, steps, which=10):
  """Prints the kernels of one decode step in launch order: duration and the gap before each."""
  import glob
  import gzip
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
  if not files:
    return
  events = json.load(gzip.open(files[-1]))
  events = events["traceEvents"] if isinstance(events, dict) else events
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  kern = sorted((e for e in events if e.get("ph") == "X" and "GPU" in procs.get(e.get("pid"), "")
                 and "tream" in threads.get((e["pid"], e.get("tid")), "")),
                key=lambda e: float(e["ts"]))
  n = len(kern) // steps
  print(f"{len(kern)} GPU events over {steps} steps: {len(kern) / steps:.1f} per step")
  if not n:
    return
  step = kern[which * n:(which + 1) * n]
  t_prev = None
  busy = 0.0
  for e in step:
    ts, dur = float(e["ts"]), float(e.get("dur", 0))
    gap = 0.0 if t_prev is None else ts - t_prev
    t_prev = ts + dur
    busy += dur
    args = e.get("args") or {}
    print(f"  {dur:7.2f} us  gap {gap:6.2f}  {e.get('name', '?')[:70]}  {str(args.get('hlo_op', ''))[:40]}")
  print(f"step {which}: {len(step)} kernels, {busy:.1f} us busy, "
        f"{float(step[-1]['ts']) + float(step[-1].get('dur', 0)) - float(step[0]['ts']):.1f} us span")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="configs/gpt_small.py")
  p.add_argument("--vocab", type=int, default=50304)
  p.add_argument("--new", type=int, default=256)
  p.add_argument("--batches", default="1,32")
  p.add_argument("--settings", default=",".join(SETTINGS))
  p.add_argument("--variants", default="loop,loop_greedy,chunk16,model_only")
  p.add_argument("--out", default=os.environ.get("OUT", "/tmp/decode_probe"))
  p.add_argument("--timeout", type=int, default=240)
  p.add_argument("--child", action="store_true")
  p.add_argument("--setting", default="default")
  p.add_argument("--json", default="")
  p.add_argument("--trace", default="")
  p.add_argument("--trace_batches", default="1")
  p.add_argument("--hlo_dir", default="")
  p.add_argument("--unstacked", type=int, default=0, help="decode with unstack_layers(params)")
  a = p.parse_args()
  a.batches = [int(x) for x in str(a.batches).split(",")]
  a.variants = a.variants.split(",") if a.variants else []
  a.trace_batches = [int(x) for x in str(a.trace_batches).split(",") if x]
  if a.child:
    return child(a)
  os.makedirs(a.out, exist_ok=True)
  rows = []
  for i, name in enumerate(a.settings.split(",")):
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + SETTINGS[name]).strip())
    out = os.path.join(a.out, f"probe_{name}.json")
    cmd = [sys.executable, __file__, "--child", "--setting", name, "--unstacked", str(a.unstacked), "--json", out, "--config", a.config,
           "--vocab", str(a.vocab), "--new", str(a.new), "--variants", ",".join(a.variants),
           "--batches", ",".join(map(str, a.batches if i == 0 else a.batches[:1]))]
    if i == 0:
      cmd += ["--trace", f"/tmp/decode_probe_trace_{os.getpid()}",
              "--trace_batches", ",".join(map(str, a.trace_batches)), "--hlo_dir", a.out]
    try:
      rc = subprocess.run(cmd, env=env, timeout=a.timeout).returncode
    except subprocess.TimeoutExpired:
      rc = "timeout"
    if os.path.exists(out):
      rows += json.load(open(out))
    if rc != 0:
      print(f"[{name}] exited {rc}", flush=True)
  print("\n| setting | variant | batch | tokens/s | ms/step |\n| --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['setting']} | {r['variant']} | {r['batch']} | {r['tokens_per_s']:,.0f} | "
          f"{r['ms_per_step']:.3f} |")


if __name__ == "__main__":
  main()

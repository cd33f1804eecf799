"""Where a traced step's GPU time goes: sums kernel time by category and by kernel from a
jax.profiler trace (the *.trace.json.gz under <tb>/plugins/profile/<run>/).

    python bench/analyze_trace.py runs/bench/tb [--top 30] [--steps 2]
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re

_CATEGORIES = (
  ("attention (cuDNN)", re.compile(r"cudnn|fmha|flash|sdpa", re.I)),
  ("matmul", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|sm90|wgmma|triton_gemm|dot", re.I)),
  ("copy/memset", re.compile(r"memcpy|memset|copy", re.I)),
  ("reduction fusion", re.compile(r"reduce|input_", re.I)),
  ("elementwise fusion", re.compile(r"fusion|loop_|triton|convert|add|multiply", re.I)),
)


def category(name: str) -> str:
  for label, pattern in _CATEGORIES:
    if pattern.search(name):
      return label
  return "other"


def load(path: str):
  files = (
    sorted(glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True))
    if os.path.isdir(path)
    else [path]
  )
  if not files:
    raise SystemExit(f"no *.trace.json.gz under {path}")
  with gzip.open(files[-1]) as f:
    return files[-1], json.load(f)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("path")
  p.add_argument("--top", type=int, default=30)
  p.add_argument("--steps", type=int, default=0, help="traced steps (to print per-step times)")
  a = p.parse_args()
  file, trace = load(a.path)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  procs = {
    e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
  }
  threads = {
    (e["pid"], e.get("tid")): e["args"]["name"]
    for e in events
    if e.get("ph") == "M" and e.get("name") == "thread_name"
  }
  gpu_pids = {pid for pid, name in procs.items() if "GPU" in name or "gpu" in name}
  print(f"trace {file}")
  print("processes:", {pid: procs[pid] for pid in gpu_pids})
  print("threads:", sorted({n for (pid, _), n in threads.items() if pid in gpu_pids})[:12])
  has_streams = any("tream" in n for (pid, _), n in threads.items() if pid in gpu_pids)
  by_name, by_cat = collections.Counter(), collections.Counter()
  count = collections.Counter()
  span = [float("inf"), 0.0]
  streams = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in gpu_pids:
      continue
    tname = threads.get((e["pid"], e.get("tid")), "")
    if has_streams and "tream" not in tname:
      continue  # skip derived rows (XLA Ops / Modules summaries) to avoid counting twice
    name = e.get("name", "?")
    args = e.get("args") or {}
    key = args.get("hlo_op") or args.get("long_name") or name
    dur = float(e.get("dur", 0.0))
    by_name[(name[:90], str(key)[:60])] += dur
    by_cat[category(name + " " + str(key))] += dur
    count[(name[:90], str(key)[:60])] += 1
    streams[tname] += dur
    span[0] = min(span[0], float(e["ts"]))
    span[1] = max(span[1], float(e["ts"]) + dur)
  busy = sum(by_cat.values())
  wall = span[1] - span[0] if busy else 0.0
  print(
    f"GPU kernel time {busy / 1e3:.1f} ms over a {wall / 1e3:.1f} ms window "
    f"({100 * busy / max(wall, 1e-9):.0f}% busy); streams: "
    + ", ".join(f"{k}={v / 1e3:.1f}ms" for k, v in streams.most_common(4))
  )
  if a.steps:
    print(f"per traced step: {wall / a.steps / 1e3:.2f} ms window, {busy / a.steps / 1e3:.2f} ms kernels")
  print("\nby category:")
  for cat, dur in by_cat.most_common():
    print(f"  {cat:22s} {dur / 1e3:9.2f} ms  {100 * dur / busy:5.1f}%")
  print(f"\ntop {a.top} kernels (name | hlo op, total ms, share, calls):")
  for (name, key), dur in by_name.most_common(a.top):
    print(f"  {dur / 1e3:8.2f} ms {100 * dur / busy:5.1f}% x{count[(name, key)]:<4d} {name} | {key}")


if __name__ == "__main__":
  main()

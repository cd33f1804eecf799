"""Which FP8 matmul form XLA turns into FP8 GEMMs on this GPU (issue 16, `model.fp8`).

At the MLP up-projection's training shape (rows x d_model @ d_model x 4 d_model), times forward and
forward + backward of: the bf16 dot, quantize -> dequantize -> dot (model.fp8's first form, which XLA's
GPU compiler reduces to a bf16 dot: it collapses the f32 -> f8 -> bf16 converts), and `model.fp8` now:
FP8 operands fed to dot_general directly (scales applied to the output); lists what the optimized HLO
calls (the custom-call targets and how many GEMMs read f8 operands) and each form's relative error.

    python bench/fp8_probe.py [--rows 16384] [--d_model 768] [--reps 20]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import re
import time

import jax
import jax.numpy as jnp

from llm_jax.model.fp8 import E4M3, fp8_dot_general, quantize

DIMS = (((1,), (0,)), ((), ()))


def dequantize_then_dot(x, w):
  """model.fp8's first form (before 2026-12-03): FP8 values converted back to bf16, then a bf16 dot.
  XLA's GPU compiler collapses the f32 -> f8 -> bf16 converts (excess precision), so it rounds nothing."""
  qx, sx = quantize(x, E4M3)
  qw, sw = quantize(w, E4M3)
  return jax.lax.dot_general(
    qx.astype(x.dtype) * sx.astype(x.dtype), qw.astype(w.dtype) * sw.astype(w.dtype), DIMS
  )


def hlo_summary(compiled) -> str:
  text = compiled.as_text()
  targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
  f8_dots = len(re.findall(r"= [^\n]*f8e[45]m[23][^\n]*\b(dot|custom-call)\(", text))
  fusions = collections.Counter(re.findall(r'"kind":"(__[a-z_]+)"', text))
  return f"custom calls {dict(targets)}; f8 dot/custom-call lines {f8_dots}; fusion kinds {dict(fusions)}"


def timed(fn, args, reps):
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / reps)
  return 1e3 * best


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rows", type=int, default=16384)
  p.add_argument("--d_model", type=int, default=768)
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--dump_dir", default="", help="write each form's optimized HLO here")
  a = p.parse_args()
  x = jax.random.normal(jax.random.key(0), (a.rows, a.d_model), jnp.bfloat16)
  w = (0.02 * jax.random.normal(jax.random.key(1), (a.d_model, 4 * a.d_model))).astype(jnp.bfloat16)
  ct = jax.random.normal(jax.random.key(2), (a.rows, 4 * a.d_model), jnp.bfloat16)
  flops = 2 * a.rows * a.d_model * 4 * a.d_model
  forms = {
    "bf16 dot": lambda x, w: jax.lax.dot_general(x, w, DIMS),
    "quantize, dequantize, dot (model.fp8's first form)": dequantize_then_dot,
    "model.fp8: f8 operands to dot_general": lambda x, w: fp8_dot_general(x, w, DIMS),
  }
  print(json.dumps({"device": str(jax.devices()[0]), "jax": jax.__version__, **vars(a)}))
  for name, f in forms.items():
    fwd = jax.jit(f)
    fb = jax.jit(lambda x, w, ct, f=f: jax.vjp(f, x, w)[1](ct))
    for label, fn, args, n in (("fwd", fwd, (x, w), 1), ("fwd+bwd", fb, (x, w, ct), 3)):
      try:
        compiled = fn.lower(*args).compile()
        ms = timed(compiled, args, a.reps)
        if a.dump_dir:
          os.makedirs(a.dump_dir, exist_ok=True)
          slug = re.sub(r"[^a-z0-9]+", "_", f"{name} {label}".lower()).strip("_")
          with open(os.path.join(a.dump_dir, f"{slug}.hlo.txt"), "w") as fh:
            fh.write(compiled.as_text())
        row = {
          "form": name,
          "pass": label,
          "ms": round(ms, 4),
          "tflops": round(n * flops / ms / 1e9, 1),
          "hlo": hlo_summary(compiled),
        }
      except Exception as e:  # noqa: BLE001 - a form this stack cannot compile is a result
        row = {"form": name, "pass": label, "error": f"{type(e).__name__}: {str(e)[:300]}"}
      print(json.dumps(row), flush=True)
  err = functools.partial(jnp.linalg.norm)
  ref = jax.lax.dot_general(x, w, DIMS).astype(jnp.float32)
  for name, f in list(forms.items())[1:]:
    got = jax.jit(f)(x, w).astype(jnp.float32)
    print(json.dumps({"form": name, "relative error of the product": float(err(got - ref) / err(ref))}))


if __name__ == "__main__":
  main()

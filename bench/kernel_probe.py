"""Times the kernels jax itself ships for GPUs, and Tokamax's where it is installed, against what the model
uses today (and model.fp8's matmul against bf16, counting the FP8 GEMMs XLA emitted), forward + backward,
at gpt_small's per-pass shapes (docs/performance.md, "Kernel libraries"). One JSON line per kernel; a
kernel that cannot run here (no GPU, unsupported shape, API changed, library missing) prints its error and
the rest go on.

    python bench/kernel_probe.py                      # B=16 L=1024 H=12 D=64 bf16, on the GPU
    python bench/kernel_probe.py --batch=2 --length=128 --reps=2     # CPU smoke test: XLA rows only

Tokamax is not a dependency of llm_jax: install it beside the probe (`pip install tokamax`, or its wheels
with --no-deps on a machine without a registry). Its 0.0.17 imports xprof (a 22 MB profiler) at import
time for its own benchmarking only; when xprof is missing the probe gives it an empty stand-in.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
import types

import jax
import jax.numpy as jnp
from absl import flags

from llm_jax.model.fp8 import fp8_dot_general
from llm_jax.train.loss import weighted_sums


def _pallas(name: str):
  """jax.experimental.pallas.ops.gpu.<name>: example kernels that a jax version may move or drop."""
  return importlib.import_module(f"jax.experimental.pallas.ops.gpu.{name}")


def median_ms(fn, args, reps):
  """Median ms of a jitted fn (first call compiles, untimed)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(1e3 * (time.perf_counter() - t0))
  return sorted(times)[len(times) // 2]


def probe_row(name: str, measure) -> dict:
  """{"row": name, **measure()}, or the error a configuration raised (a configuration that cannot run
  here, e.g. a tile Triton refuses, is a row, not the end), printed as one JSON line."""
  try:
    row = {"row": name, **measure()}
  except Exception as e:  # noqa: BLE001 -- see the docstring
    row = {"row": name, "error": f"{type(e).__name__}: {e}"[:300]}
    traceback.print_exc(file=sys.stderr)  # the whole story, for the log
  print(json.dumps(row), flush=True)
  return row


def _fwd_bwd(f):
  """jit(grad of sum(f(*args) * ct)) with respect to every argument: one forward and one backward."""

  def loss(*args):
    *xs, ct = args
    return jnp.sum(f(*xs).astype(jnp.float32) * ct.astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=tuple(range(3))))


def attention_rows(b, length, h, d, reps):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  q, k, v, ct = (jax.random.normal(key, (b, length, h, d), jnp.bfloat16) for key in (k1, k2, k3, k4))
  flops = 4 * b * h * length * length * d / 2 * 3.5  # causal: half; fwd 1 + bwd 2.5 matmul-equivalents
  rows = {
    "attention cudnn (today, jax.nn.dot_product_attention)": lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="cudnn"
    ),
    "attention xla": lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="xla"
    ),
  }

  def pallas_triton(q, k, v):
    return _pallas("attention").mha(q, k, v, None, sm_scale=d**-0.5, causal=True)

  rows["attention pallas triton mha (jax.experimental.pallas.ops.gpu.attention)"] = pallas_triton
  for name, f in rows.items():
    yield name, lambda f=f: median_ms(_fwd_bwd(f), (q, k, v, ct), reps), flops

  def mgpu_forward():
    mgpu = _pallas("attention_mgpu")
    cfg = mgpu.TuningConfig(block_q=64, block_kv=64, max_concurrent_steps=2, causal=True)
    return median_ms(jax.jit(lambda q, k, v: mgpu.attention(q, k, v, cfg)), (q, k, v), reps)

  yield "attention pallas mosaic-gpu (attention_mgpu), forward only", mgpu_forward, flops / 3.5


def layer_norm_rows(b, length, dm, reps):
  x = jax.random.normal(jax.random.key(1), (b * length, dm), jnp.bfloat16)
  ct = jax.random.normal(jax.random.key(2), (b * length, dm), jnp.bfloat16)
  w, bias = jnp.ones((dm,), jnp.float32), jnp.zeros((dm,), jnp.float32)

  def xla_ln(x, w, bias):  # what llm_jax.model.layers.Norm computes
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, -1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + 1e-5) * w + bias).astype(x.dtype)

  def pallas_ln(x, w, bias):
    return _pallas("layer_norm").layer_norm(x[None], w.astype(x.dtype), bias.astype(x.dtype))[0]

  for name, f in {"layer norm xla (today)": xla_ln, "layer norm pallas triton": pallas_ln}.items():
    yield name, lambda f=f: median_ms(_fwd_bwd(f), (x, w, bias, ct), reps), None


def _tokamax():
  """The tokamax module, importing without xprof (only its benchmarking helpers use it). Tokamax reads
  absl flags (its config), which would parse this script's argparse options: they are marked parsed."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  try:
    importlib.import_module("xprof.cli.tools")
  except ImportError:
    stub = types.ModuleType("xprof.cli.tools")
    stub.get_kernel_stats_tool = None
    for name in ("xprof", "xprof.cli"):
      sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["xprof.cli.tools"] = stub
  return importlib.import_module("tokamax")


def tokamax_rows(b, length, h, d, vocab, reps):
  """Tokamax's GPU attention (Mosaic-GPU for Hopper, Triton), LayerNorm (Triton) and its fused head +
  cross-entropy against the model's head + loss (llm_jax.train.loss), at the same shapes as above."""
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  q, k, v, ct = (jax.random.normal(key, (b, length, h, d), jnp.bfloat16) for key in (k1, k2, k3, k4))
  flops = 4 * b * h * length * length * d / 2 * 3.5
  for impl in ("mosaic", "triton"):

    def attn(q, k, v, impl=impl):
      return _tokamax().dot_product_attention(q, k, v, is_causal=True, implementation=impl)

    def run(f=attn):
      ref = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
      diff = float(jnp.max(jnp.abs(jax.jit(f)(q, k, v).astype(jnp.float32) - ref.astype(jnp.float32))))
      return median_ms(_fwd_bwd(f), (q, k, v, ct), reps), f"max |out - xla attention| {diff:.4f}"

    yield f"attention tokamax {impl}", run, flops

  dm = h * d
  x = jax.random.normal(jax.random.key(1), (b * length, dm), jnp.bfloat16)
  xct = jax.random.normal(jax.random.key(2), (b * length, dm), jnp.bfloat16)
  w, bias = jnp.ones((dm,), jnp.float32), jnp.zeros((dm,), jnp.float32)

  def ln(x, w, bias):
    return _tokamax().layer_norm(x, w, bias, epsilon=1e-5, implementation="triton")

  yield "layer norm tokamax triton", lambda: median_ms(_fwd_bwd(ln), (x, w, bias, xct), reps), None

  # The head + loss: hidden [rows, D] @ [D, V], cross-entropy summed; gradients for hidden and head.
  head = (0.02 * jax.random.normal(jax.random.key(6), (dm, vocab))).astype(jnp.bfloat16)
  labels = jax.random.randint(jax.random.key(7), (b * length,), 0, vocab)
  ones = jnp.ones((1, b * length), jnp.float32)
  head_flops = 3 * 2 * b * length * dm * vocab

  def today(x, head):  # what the training loss computes: bf16 logits, float32 softmax inside fusions
    logits = jnp.einsum("rd,dv->rv", x, head, preferred_element_type=jnp.bfloat16)[None]
    return weighted_sums(logits, labels[None], ones)[0]

  def tokamax_ce(x, head, impl):
    return _tokamax().linear_softmax_cross_entropy_loss(x, labels, head, implementation=impl)

  loss_rows = {"head + cross-entropy, llm_jax.train.loss (today)": today}
  for impl in ("xla", "chunked_xla"):
    loss_rows[f"head + cross-entropy tokamax {impl}"] = lambda x, w, impl=impl: tokamax_ce(x, w, impl)
  for name, f in loss_rows.items():

    def run(f=f):
      loss, ref = float(jax.jit(f)(x, head)), float(jax.jit(today)(x, head))
      fn = jax.jit(jax.grad(f, argnums=(0, 1)))
      return median_ms(fn, (x, head), reps), f"loss {loss:.2f} (today's {ref:.2f})"

    yield name, run, head_flops


def fp8_rows(rows, dm, reps):
  """model.fp8's matmul against bf16 at the MLP up-projection's shape, and whether XLA emitted FP8 GEMMs."""
  x = jax.random.normal(jax.random.key(3), (rows, dm), jnp.bfloat16)
  w = (0.02 * jax.random.normal(jax.random.key(4), (dm, 4 * dm))).astype(jnp.bfloat16)
  ct = jax.random.normal(jax.random.key(5), (rows, 4 * dm), jnp.bfloat16)
  dims = (((1,), (0,)), ((), ()))
  flops = 3 * 2 * rows * dm * 4 * dm
  for name, dot in {
    "matmul bf16 (today)": jax.lax.dot_general,
    "matmul fp8 (model.fp8)": fp8_dot_general,
  }.items():

    def run(dot=dot):
      fn = _fwd_bwd(lambda a, b, _: dot(a, b, dims))
      text = fn.lower(x, w, w, ct).compile().as_text()
      gemms = text.count("__cublas$lt$matmul$f8")
      return median_ms(fn, (x, w, w, ct), reps), f"{gemms} cuBLASLt FP8 GEMM calls in the compiled fwd+bwd"

    yield name, run, flops


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--length", type=int, default=1024)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--vocab", type=int, default=50304)
  p.add_argument("--reps", type=int, default=10)
  a = p.parse_args()
  print(json.dumps({"device": str(jax.devices()[0]), "jax": jax.__version__, **vars(a)}))
  rows = list(attention_rows(a.batch, a.length, a.heads, a.head_dim, a.reps))
  rows += list(layer_norm_rows(a.batch, a.length, a.heads * a.head_dim, a.reps))
  rows += list(fp8_rows(a.batch * a.length, a.heads * a.head_dim, a.reps))
  rows += list(tokamax_rows(a.batch, a.length, a.heads, a.head_dim, a.vocab, a.reps))
  for name, run, flops in rows:
    try:
      ms, note = run(), ""
      if isinstance(ms, tuple):
        ms, note = ms
      tflops = round(flops / ms / 1e9, 1) if flops else None
      print(json.dumps({"kernel": name, "ms_fwd_bwd": round(ms, 3), "tflops": tflops, "note": note}))
    except Exception as e:  # a kernel that cannot run here is a result, not a crash
      first = (str(e).strip().splitlines() or [""])[0]
      print(json.dumps({"kernel": name, "error": f"{type(e).__name__}: {first}"[:300]}))


if __name__ == "__main__":
  main()

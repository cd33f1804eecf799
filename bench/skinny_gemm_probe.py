"""Decode-shaped GEMMs (32 rows) by XLA against a Pallas (Triton) kernel that spreads the weights over
more programs: narrow column tiles and split K (docs/serving.md, "Batch 32 profiled").

At 32 rows a GEMM is a read of its weights, and the batch-32 profile had them at ~1 TB/s, a fifth of
the bandwidth. This tests whether giving more programs a share of the weights helps: the kernel here
gives each program `bn` columns and a `1/splits` share of K; the partial sums [splits, M, N] are added
(in float32) by the elementwise fusion that follows every GEMM in a decode step anyway (here a GELU or
a residual add, in both variants). Measured on one H200 (2026-12-03): it does not (docs/serving.md).

Two chains of gpt_small's decode GEMMs, 12 layers each, one jitted call, 32 rows:
  mlp:  x + down(gelu(up(x)))          up 768 -> 3072, down 3072 -> 768
  attn: x + out(qkv(x)[:, :768])       qkv 768 -> 2304, out 768 -> 768 (no attention between: its GEMMs only)
The mlp chain also as one fused kernel per layer (fused_mlp: up, GELU and down in one launch; its
partial outputs added by the residual add, or atomically in place); on one H200 (2026-12-03) it is
1.7x slower than XLA's two GEMMs (docs/serving.md). One JSON line per (chain,
variant): ms per chain, the weights' bytes over that time, max relative
difference from XLA's result.

    python bench/skinny_gemm_probe.py                       # on the GPU
    python bench/skinny_gemm_probe.py --interpret --layers=1 --configs=64x1,32x2 --reps=1   # CPU check
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BK = 128  # the K chunk each loop iteration of a program multiplies


def skinny_matmul(x_MK, w_KN, *, bn: int, splits: int, interpret: bool = False):
  """x [M, K] @ w [K, N] as float32 partial sums [splits, M, N]: program (n, s) computes columns
  n*bn.. of the s-th K share. The caller adds the partials (fused into its next elementwise op)."""
  m, k = x_MK.shape
  n = w_KN.shape[1]
  if k % (splits * BK) or n % bn:
    raise ValueError(f"K={k} must split into {splits} x {BK} chunks and N={n} into {bn}-wide tiles")
  share = k // splits

  def kernel(x_ref, w_ref, o_ref):
    def body(i, acc_MN):
      x = x_ref[:, pl.ds(i * BK, BK)]
      w = w_ref[pl.ds(i * BK, BK), :]
      return acc_MN + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, share // BK, body, jnp.zeros((m, bn), jnp.float32))
    o_ref[0] = acc

  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((splits, m, n), jnp.float32),
    grid=(n // bn, splits),
    in_specs=[
      pl.BlockSpec((m, share), lambda j, s: (0, s)),
      pl.BlockSpec((share, bn), lambda j, s: (s, j)),
    ],
    out_specs=pl.BlockSpec((1, m, bn), lambda j, s: (s, 0, j)),
    compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
    interpret=interpret,
  )(x_MK, w_KN)


def fused_mlp(x_MD, w_DF, w_FD, *, f: int, atomic: bool, interpret: bool = False):
  """down(gelu(x @ up)) in one kernel: program c computes its f columns of the hidden layer and their
  share of the output. Partial outputs: float32 [F/f, M, D] for the caller to add (atomic=False) or
  added in place into one float32 [M, D] (atomic=True)."""
  m, d = x_MD.shape
  n_f = w_DF.shape[1]
  if d % BK or n_f % f:
    raise ValueError(f"D={d} must be a multiple of {BK} and F={n_f} of f={f}")

  def kernel(x_ref, wu_ref, wd_ref, *rest):
    o_ref = rest[-1]

    def up(i, acc_Mf):
      return acc_Mf + jnp.dot(
        x_ref[:, pl.ds(i * BK, BK)], wu_ref[pl.ds(i * BK, BK), :], preferred_element_type=jnp.float32
      )

    h_Mf = _gelu(jax.lax.fori_loop(0, d // BK, up, jnp.zeros((m, f), jnp.float32))).astype(x_ref.dtype)
    for j in range(d // BK):  # the output in BK-wide column blocks (registers)
      y = jnp.dot(h_Mf, wd_ref[:, pl.ds(j * BK, BK)], preferred_element_type=jnp.float32)
      if atomic:
        plgpu.atomic_add(o_ref, (pl.ds(0, m), pl.ds(j * BK, BK)), y)
      else:
        o_ref[0, :, pl.ds(j * BK, BK)] = y

  specs = [
    pl.BlockSpec((m, d), lambda c: (0, 0)),
    pl.BlockSpec((d, f), lambda c: (0, c)),
    pl.BlockSpec((f, d), lambda c: (c, 0)),
  ]
  params = plgpu.CompilerParams(num_warps=4, num_stages=3)
  if atomic:
    return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, d), jnp.float32),
      grid=(n_f // f,),
      in_specs=[*specs, pl.BlockSpec((m, d), lambda c: (0, 0))],
      out_specs=pl.BlockSpec((m, d), lambda c: (0, 0)),
      input_output_aliases={3: 0},
      compiler_params=params,
      interpret=interpret,
    )(x_MD, w_DF, w_FD, jnp.zeros((m, d), jnp.float32))
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((n_f // f, m, d), jnp.float32),
    grid=(n_f // f,),
    in_specs=specs,
    out_specs=pl.BlockSpec((1, m, d), lambda c: (c, 0, 0)),
    compiler_params=params,
    interpret=interpret,
  )(x_MD, w_DF, w_FD)


def fused_mlp_chain(f: int, atomic: bool, interpret: bool):
  """The mlp chain with each layer's MLP as one fused_mlp call (plus the residual add's fusion)."""

  def run(x_MD, ws):
    for w1, w2 in ws:
      y = fused_mlp(x_MD, w1, w2, f=f, atomic=atomic, interpret=interpret)
      y = y if atomic else y.sum(0)
      x_MD = (x_MD.astype(jnp.float32) + y).astype(jnp.bfloat16)
    return x_MD

  return jax.jit(run)


def _gelu(x):
  return jax.nn.gelu(x, approximate=True)


def chain(kind: str, matmul):
  """The 12-layer chain; `matmul(x, w)` returns float32 partials [S, M, N] or the bf16 product."""

  def total(y):  # the partials' sum in float32 (fused with the op that follows)
    return y.astype(jnp.float32) if y.ndim == 2 else y.sum(0)

  def run(x_MD, ws):
    for w1, w2 in ws:
      if kind == "mlp":
        h = _gelu(total(matmul(x_MD, w1))).astype(jnp.bfloat16)
        x_MD = (x_MD.astype(jnp.float32) + total(matmul(h, w2))).astype(jnp.bfloat16)
      else:
        q = total(matmul(x_MD, w1))[:, : x_MD.shape[1]].astype(jnp.bfloat16)
        x_MD = (x_MD.astype(jnp.float32) + total(matmul(q, w2))).astype(jnp.bfloat16)
    return x_MD

  return jax.jit(run)


def _time(fn, args, reps):
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(20):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / 20 * 1e3)
  return best


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", type=int, default=32)
  p.add_argument("--d_model", type=int, default=768)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument(
    "--configs",
    default="128x1,64x1,32x1,64x2,32x2,64x3,32x3,64x6,32x6",
    help="BNxS, comma-separated: column tile width x K shares (S is halved or more "
    "until K splits into S x 128 chunks)",
  )
  p.add_argument("--fused", default="32,64,128", help="hidden columns per program of the fused MLP")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU)")
  a = p.parse_args()
  d = a.d_model
  print(json.dumps({"device": str(jax.devices()[0]), "jax": jax.__version__, **vars(a)}))
  key = jax.random.key(0)
  x = jax.random.normal(key, (a.rows, d), jnp.bfloat16)
  shapes = {"mlp": ((d, 4 * d), (4 * d, d)), "attn": ((d, 3 * d), (d, d))}
  for kind, (s1, s2) in shapes.items():
    ws = []
    for i in range(a.layers):
      k1, k2 = jax.random.split(jax.random.fold_in(key, i + 1))
      ws.append(
        tuple((jax.random.normal(kk, s) / s[0] ** 0.5).astype(jnp.bfloat16) for kk, s in ((k1, s1), (k2, s2)))
      )
    nbytes = sum(w.size * 2 for pair in ws for w in pair)
    xla = chain(kind, lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    ref = xla(x, ws).astype(jnp.float32)
    rows = [("xla", xla)]
    for cfg in a.configs.split(","):
      bn, splits = (int(v) for v in cfg.split("x"))

      def mm(x_MK, w_KN, bn=bn, splits=splits):
        s = splits
        while x_MK.shape[1] % (s * BK):
          s -= 1
        return skinny_matmul(x_MK, w_KN, bn=bn, splits=s, interpret=a.interpret)

      rows.append((f"pallas bn={bn} splits<={splits}", chain(kind, mm)))
    if kind == "mlp":
      for f in (int(v) for v in a.fused.split(",") if v):
        for atomic in (False, True):
          name = f"pallas fused mlp f={f} {'atomic' if atomic else 'partials'}"
          rows.append((name, fused_mlp_chain(f, atomic, a.interpret)))
    for name, fn in rows:
      try:
        ms = _time(fn, (x, ws), a.reps)
        out = fn(x, ws).astype(jnp.float32)
        rel = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
        print(
          json.dumps(
            {
              "chain": kind,
              "variant": name,
              "ms": round(ms, 4),
              "weights_TB_per_s": round(nbytes / ms / 1e9, 2),
              "max_rel_diff": round(rel, 4),
            }
          )
        )
      except Exception as e:  # a config the compiler refuses is a result, not a crash
        first = (str(e).strip().splitlines() or [""])[0]
        print(json.dumps({"chain": kind, "variant": name, "error": f"{type(e).__name__}: {first}"[:300]}))


if __name__ == "__main__":
  main()

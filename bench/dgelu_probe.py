"""The GELU backward of gpt_small's MLP as a GEMM epilogue: does it pay on a GPU? (docs/performance.md,
"Round three": the GELU backward is 12 x 0.46 ms of a 116 ms pass, a fusion reading two [M, F] tensors.)

In the backward pass of `down(gelu(h))`, XLA runs the gradient GEMM `g = dY @ W_down^T` (cuBLAS, g written
in bf16) and then a fusion `dh = g * gelu'(h)` (reads g and h, writes dh). Here one Pallas (Triton) kernel
computes the GEMM tile in float32 and multiplies it by gelu'(h) before writing: g never goes to memory.
Rows, each over LAYERS layers in one jitted call (one dY, a W_down and an h per layer, like a step's
backward pass):

  xla_gemm      dY @ W^T alone (XLA, cuBLAS)
  xla_dgelu     dY @ W^T, then the GELU gradient (gelu_kernel.xla_dgelu_matmul): what a step runs on XLA
  pallas_gemm   the Pallas GEMM alone (no epilogue), per tile config: how close to cuBLAS it gets
  pallas_dgelu  the Pallas GEMM with gelu'(h) in its epilogue, per tile config
  mgpu_gemm     (--mgpu) jax's own Hopper GEMM written for Pallas's Mosaic GPU backend (wgmma, TMA,
                warp specialisation: jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu) alone
  mgpu_gemm+h   (--mgpu_c) the same with its C epilogue, + h: the load of h a DGELU epilogue also needs
  mgpu_dgelu    (--mgpu_dgelu) the model's kernel, llm_jax.model.gelu_kernel (model.gelu_kernel=mosaic)
  +bias rows    (--bias) with the up projection's bias gradient, dh's float32 column sums: xla_dgelu+bias
                (XLA's pair, the sum in the fusion that writes dh), mgpu_dgelu+xla_bias (the kernel, then
                XLA reads dh again for the sum: a biased model). The kernel writing per-row-tile sums
                itself was measured 0.8 ms slower than that per 12 layers, and wrong ("Round nine")
  slope         xla_dgelu and each mgpu_dgelu tile set on 8,192 rows of an h of its own, g = dY @ W^T = 1
                exactly (dY and W one-hot): the result is gelu'(h) in bf16, compared with gelu'(h) computed
                in float64 and rounded to bf16 (the fraction of elements that differ, the largest
                difference, the mean difference: a systematic error shows there, a rounding one cancels):
                how exact each tanh is, which the rows above cannot tell (their reference rounds g to bf16
                first); h here is 2 N(0, 1) drawn in float32, so every bf16 value in range occurs (the timed
                rows' bf16 draw has only 128 distinct values)

The Mosaic rows take TMxTNxTKxSTEPS[xWIDTH[xMINOR[xTANH]]] (gelu_kernel.Tiles.parse; jax's GEMM
ignores TANH): a compute warpgroup's tile, the K slice, slices in flight, the tile walk's band width and
its fast dimension (m or n), and the epilogue's slope (e exact tanh, a approximate, p, q and r by exp2,
s the sigmoid form: Tiles says which is which).

One JSON line per row (ms per LAYERS layers, TFLOP/s of the GEMM, max relative difference of dh from
xla_dgelu's), a table last. Measured on one H200 (2026-12-04): the Triton kernel loses, 22.6-25.8 ms
against 11.15, its GEMM alone at half of cuBLAS's rate ("Round five"); the Mosaic GPU kernel wins, 7.8 ms
against 10.9-11.1 ("Round six").

    python bench/dgelu_probe.py                                      # gpt_small: M=65536, D=768, F=3072
    python bench/dgelu_probe.py --tokens=128 --dim=64 --mlp=128 --layers=2 --reps=1 \\
        --configs=32x32x32x4x1 --interpret                           # CPU check of the kernel's numbers
    python bench/dgelu_probe.py --configs= --mgpu=128x128x64x4x8xm \\
        --mgpu_dgelu=128x128x64x3x16xmxa,128x128x64x3x16xmxe          # Hopper only ("Round six")

--configs: BMxBNxBKxWARPSxSTAGES, comma-separated.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from kernel_probe import median_ms, probe_row  # bench/ is on sys.path when this script runs

from llm_jax.model.activations import gelu_tanh_slope
from llm_jax.model.gelu_kernel import Tiles, mosaic_dgelu_matmul, xla_dgelu_matmul


def dgelu_matmul(dy_MD, w_FD, h_MF, *, bm, bn, bk, warps, stages, epilogue=True, interpret=False):
  """dY @ W^T [M, F] in bf16, times gelu'(h) (float32 in the kernel) when `epilogue`."""
  m, d = dy_MD.shape
  f = w_FD.shape[0]
  if m % bm or f % bn or d % bk:
    raise ValueError(f"M={m}, F={f}, D={d} must be multiples of the tile {bm} x {bn} x {bk}")

  def kernel(dy_ref, w_ref, h_ref, o_ref):
    def body(i, acc_MN):
      x = dy_ref[:, pl.ds(i * bk, bk)]
      w = w_ref[:, pl.ds(i * bk, bk)]
      return acc_MN + jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, d // bk, body, jnp.zeros((bm, bn), jnp.float32))
    if epilogue:
      acc = acc * gelu_tanh_slope(h_ref[...].astype(jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)

  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((m, f), dy_MD.dtype),
    grid=(m // bm, f // bn),
    in_specs=[
      pl.BlockSpec((bm, d), lambda i, j: (i, 0)),
      pl.BlockSpec((bn, d), lambda i, j: (j, 0)),
      pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
    ],
    out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
    compiler_params=None if interpret else plgpu.CompilerParams(num_warps=warps, num_stages=stages),
    interpret=interpret,
  )(dy_MD, w_FD, h_MF)


def mgpu_gemm(a_MK, b_KN, cfg: str, c_MN=None):
  """a @ b (+ c) by jax's Mosaic GPU Hopper matmul (an example op shipped in jax); tiles from cfg as
  gelu_kernel.Tiles.parse reads them (WIDTH and MINOR default to 16 and m: jax's own defaults are 1xn)."""
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm  # noqa: PLC0415 -- an example op jax may move; only --mgpu needs it

  t = Tiles.parse(cfg)  # its APPROX part means nothing to this GEMM
  config = hm.TuningConfig(
    tile_m=t.m,
    tile_n=t.n,
    tile_k=t.k,
    max_concurrent_steps=t.steps,
    grid_tile_width=t.width,
    grid_minor_dim=hm.MatmulDimension.M if t.minor == 0 else hm.MatmulDimension.N,
  )
  return hm.matmul(a_MK, b_KN, c_MN, config)


def slope_check(fn, h_MF, d: int) -> dict:
  """fn(dY, W, h) with dY @ W^T = 1 exactly (dY's rows and W's column 0 ones, the rest zeros): the result is
  gelu'(h) as fn computes it, in bf16. Against gelu'(h) in float64 rounded to bf16."""
  m, f = h_MF.shape
  dy = jnp.zeros((m, d), jnp.bfloat16).at[:, 0].set(1)
  w = jnp.zeros((f, d), jnp.bfloat16).at[:, 0].set(1)
  got = np.asarray(fn(dy, w, h_MF).astype(jnp.float32), np.float64)
  x = np.asarray(h_MF.astype(jnp.float32), np.float64)
  c = np.sqrt(2 / np.pi)
  # gelu' = s (1 + 2x (1 - s) u') with s = sigmoid(2u): the tanh form loses float64 itself below ~1e-14
  with np.errstate(over="ignore"):
    s = 1 / (1 + np.exp(-2 * c * (x + 0.044715 * x**3)))
  slope = s * (1 + 2 * x * (1 - s) * c * (1 + 3 * 0.044715 * x * x))
  want = np.asarray(jnp.asarray(slope, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  return {
    "differ": float(np.mean(got != want)),
    "max_diff": float(np.max(np.abs(got - want))),
    "mean_diff": float(np.mean(got - want)),
  }


def with_bias_sums(dh_MF):
  """dh and its float32 column sums [F]: the up projection's bias gradient as XLA takes it."""
  return dh_MF, jnp.sum(dh_MF.astype(jnp.float32), axis=0)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", type=int, default=64 * 1024)
  ap.add_argument("--dim", type=int, default=768)
  ap.add_argument("--mlp", type=int, default=3072)
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--interpret", action="store_true", help="Pallas's interpreter (CPU checks)")
  ap.add_argument(
    "--configs",
    default="128x128x64x4x3,128x256x64x8x3,256x128x64x8x3,128x128x64x4x4,64x256x64x4x3,128x256x32x8x4",
  )
  ap.add_argument("--mgpu", default="", help="TMxTNxTKxSTEPS[xWIDTH[xMINOR]],... jax's Mosaic GPU GEMM rows")
  ap.add_argument("--mgpu_c", default="", help="the same tiles, jax's GEMM + h (its C epilogue) rows")
  ap.add_argument("--mgpu_dgelu", default="", help="the same tiles, this file's Mosaic GPU DGELU kernel rows")
  ap.add_argument("--bias", action="store_true", help="also the up bias's gradient: the +bias rows")
  args = ap.parse_args()
  m, d, f, n = args.tokens, args.dim, args.mlp, args.layers
  k = jax.random.split(jax.random.key(0), 3)
  dy = jax.random.normal(k[0], (m, d), jnp.bfloat16)
  w = (0.02 * jax.random.normal(k[1], (n, f, d), jnp.float32)).astype(jnp.bfloat16)
  h = jax.random.normal(k[2], (n, m, f), jnp.bfloat16)
  flop = 2.0 * m * d * f * n

  def per_layer(op):
    return jax.jit(lambda dy, w, h: [op(dy, w[i], h[i]) for i in range(n)])

  rows = [("xla_gemm", per_layer(lambda dy, w, h: dy @ w.T)), ("xla_dgelu", per_layer(xla_dgelu_matmul))]
  for cfg in [c for c in args.configs.split(",") if c]:
    bm, bn, bk, warps, stages = (int(v) for v in cfg.split("x"))
    tile = dict(bm=bm, bn=bn, bk=bk, warps=warps, stages=stages, interpret=args.interpret)
    for name, epi in (("pallas_gemm", False), ("pallas_dgelu", True)):
      fn = per_layer(lambda dy, w, h, epi=epi, tile=tile: dgelu_matmul(dy, w, h, epilogue=epi, **tile))
      rows.append((f"{name} {cfg}", fn))

  for cfg in [c for c in args.mgpu.split(",") if c]:
    rows.append((f"mgpu_gemm {cfg}", per_layer(lambda dy, w, h, cfg=cfg: mgpu_gemm(dy, w.T, cfg))))
  for cfg in [c for c in args.mgpu_c.split(",") if c]:  # jax's "+ c" epilogue: h's load, no GELU
    rows.append((f"mgpu_gemm+h {cfg}", per_layer(lambda dy, w, h, cfg=cfg: mgpu_gemm(dy, w.T, cfg, h))))
  for cfg in [c for c in args.mgpu_dgelu.split(",") if c]:
    fn = per_layer(lambda dy, w, h, t=Tiles.parse(cfg): mosaic_dgelu_matmul(dy, w, h, t))
    rows.append((f"mgpu_dgelu {cfg}", fn))
  if args.bias:
    rows.append(("xla_dgelu+bias", per_layer(lambda dy, w, h: with_bias_sums(xla_dgelu_matmul(dy, w, h)))))
    for cfg in [c for c in args.mgpu_dgelu.split(",") if c]:
      t = Tiles.parse(cfg)
      fn = per_layer(lambda dy, w, h, t=t: with_bias_sums(mosaic_dgelu_matmul(dy, w, h, t)))
      rows.append((f"mgpu_dgelu+xla_bias {cfg}", fn))

  gemm, ref = (fn(dy, w, h) for _, fn in rows[:2])  # the XLA rows' results: what the others must equal
  ref_bias = [fn for name, fn in rows if name == "xla_dgelu+bias"]
  ref_bias = ref_bias[0](dy, w, h) if ref_bias else None

  def measure(name, fn):
    ms = median_ms(fn, (dy, w, h), args.reps)
    want = ref if "dgelu" in name else gemm
    if "+h" in name:  # jax's GEMM with its C epilogue: dY @ W^T + h
      want = [g + hi for g, hi in zip(gemm, h, strict=True)]
    if "bias" in name:  # (dh, its column sums) per layer
      want = ref_bias
    diff = max(
      float(
        jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
        / jnp.max(jnp.abs(b.astype(jnp.float32)))
      )
      for a, b in zip(jax.tree.leaves(fn(dy, w, h)), jax.tree.leaves(want), strict=True)
    )
    return {"ms": round(ms, 3), "gemm_tflops": round(flop / ms / 1e9, 1), "max_rel_diff": diff}

  out = [probe_row(name, functools.partial(measure, name, fn)) for name, fn in rows]
  slopes = [("slope xla_dgelu", xla_dgelu_matmul)]
  for cfg in [c for c in args.mgpu_dgelu.split(",") if c]:
    slopes.append((f"slope {cfg}", functools.partial(mosaic_dgelu_matmul, tiles=Tiles.parse(cfg))))
  rows_h = (2 * jax.random.normal(k[2], (min(m, 8192), f), jnp.float32)).astype(jnp.bfloat16)  # every bf16
  checked = [probe_row(name, functools.partial(slope_check, jax.jit(fn), rows_h, d)) for name, fn in slopes]
  print(f"\n{n} layers of dY [{m}, {d}] @ W^T [{d}, {f}] (+ gelu'(h) [{m}, {f}])")
  table(out, TIMED)
  print(f"\ngelu'(h) in bf16 against float64's, {rows_h.shape[0]} x {f} elements")
  table(checked, SLOPES)


TIMED = [
  ("ms", "ms", 9, ".3f"),
  ("gemm_tflops", "TFLOP/s", 9, ".1f"),
  ("max_rel_diff", "max rel diff", 13, ".2e"),
]
SLOPES = [
  ("differ", "differ", 9, ".2e"),
  ("max_diff", "max diff", 9, ".2e"),
  ("mean_diff", "mean diff", 10, ".1e"),
]


def table(rows, columns):
  """Rows as probe_row returns them: one line each, `columns` (key, heading, width, format) after the name."""
  print(f"{'row':<36}" + "".join(f" {heading:>{width}}" for _, heading, width, _ in columns))
  for r in rows:
    cells = [f" {r[key]:>{width}{fmt}}" for key, _, width, fmt in columns] if "error" not in r else []
    print(f"{r['row']:<36}" + ("".join(cells) or f" {r['error'][:60]}"))


if __name__ == "__main__":
  main()

"""FP8 matmuls with current (just-in-time) per-tensor scaling: `model.fp8` (the MLP) and
`model.fp8_head` (the output head too; docs/performance.md).

Forward: both operands are quantized to float8_e4m3fn with a scale from their own amax (|x| max maps to
448) and the FP8 values themselves are multiplied (dot_general on float8 operands, accumulating in the
output dtype), the product then scaled by both scales. Backward: the incoming gradient is quantized the
same way to float8_e5m2 (wider range, max 57344) and the two transposed matmuls take it with the
forward's FP8 operands (e5m2 x e4m3). On Hopper and newer XLA's GEMM rewriter runs these as cuBLASLt
FP8 GEMMs (`bench/fp8_probe.py` counts them); on CPU XLA upcasts the FP8 values inside the dot (the
same rounding). On a GPU without FP8 GEMMs, or for a shape cuBLASLt refuses, XLA falls back to a wider
dot whose inserted converts the simplification below may fold: check there with the probe.

Why not quantize -> dequantize -> dot (this module's first form): XLA's GPU compiler collapses chains of
float converts when excess precision is allowed, its default (`xla_allow_excess_precision`;
SimplifyFPConversions turns f32 -> f8 -> bf16 into f32 -> bf16), so that form rounded nothing to FP8 on
GPUs, and gave the GEMM rewriter no FP8 to match. A convert that feeds the dot directly is kept.

Why current scaling and not flax's delayed scaling (flax.linen.fp8_ops.Fp8DotGeneralOp): delayed scaling
keeps amax histories in an extra variable collection (`_overwrite_with_gradient`) that the train state,
the optimizer (which must not update it), microbatch accumulation (which must not sum it), the
non-finite guard, scanned layers, checkpoints and every inference path would have to carry. Current
scaling needs no state: parameters and checkpoints are the same with the switch on or off. Its cost is
one amax reduction per quantized tensor per step. The operands are kept as FP8 residuals for the
backward pass (half the bytes of bfloat16).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2


def quantize(x, fp8_dtype):
  """(x / scale as fp8_dtype, float32 scale); the scale maps max |x| to fp8_dtype's largest value."""
  fmax = float(jnp.finfo(fp8_dtype).max)
  amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
  scale = jnp.where((amax > 0) & jnp.isfinite(amax), amax / fmax, jnp.float32(1.0))
  scale = jax.lax.stop_gradient(scale)
  q = jnp.clip(x.astype(jnp.float32) / scale, -fmax, fmax).astype(fp8_dtype)
  return q, scale


def _check_dims(lhs_ndim: int, dimension_numbers) -> None:
  """model.fp8's matmuls are x[..., K...] @ w[K..., N...] (flax Dense and the head): x's last axes
  against w's first, no batch axes; the backward pass's transposes assume that layout."""
  (lc, rc), (lb, rb) = dimension_numbers
  n = len(lc)
  if lb or rb or tuple(lc) != tuple(range(lhs_ndim - n, lhs_ndim)) or tuple(rc) != tuple(range(n)):
    raise ValueError(
      "model.fp8 multiplies x[..., K] by w[K, ...] (x's last axes against w's first, no batch axes); "
      f"got dimension_numbers={dimension_numbers}"
    )


def _scaled_dot(q_a, q_b, dims, precision, out_dtype, scale):
  """dot_general of FP8 operands in out_dtype, times the product of their scales."""
  out = jax.lax.dot_general(q_a, q_b, dims, precision=precision, preferred_element_type=out_dtype)
  return out * scale.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _fp8_dot(lhs, rhs, dimension_numbers, precision, out_dtype, lhs_dtype, rhs_dtype):
  out, _ = _fp8_dot_fwd(lhs, rhs, dimension_numbers, precision, out_dtype, lhs_dtype, rhs_dtype)
  return out


def _fp8_dot_fwd(lhs, rhs, dimension_numbers, precision, out_dtype, lhs_dtype, rhs_dtype):
  q_l, s_l = quantize(lhs, E4M3)
  q_r, s_r = quantize(rhs, E4M3)
  out = _scaled_dot(q_l, q_r, dimension_numbers, precision, out_dtype, s_l * s_r)
  return out, (q_l, s_l, q_r, s_r)


def _fp8_dot_bwd(dimension_numbers, precision, out_dtype, lhs_dtype, rhs_dtype, res, g):
  q_l, s_l, q_r, s_r = res
  q_g, s_g = quantize(g, E5M2)
  n = len(dimension_numbers[0][0])
  free_l = q_l.ndim - n  # g is [x's free axes..., w's free axes...]
  g_r, w_r = tuple(range(free_l, g.ndim)), tuple(range(n, q_r.ndim))
  d_lhs = _scaled_dot(q_g, q_r, ((g_r, w_r), ((), ())), precision, lhs_dtype, s_g * s_r)
  x_l = tuple(range(free_l))
  d_rhs = _scaled_dot(q_l, q_g, ((x_l, x_l), ((), ())), precision, rhs_dtype, s_l * s_g)
  return d_lhs, d_rhs


_fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


def fp8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """jax.lax.dot_general(x[..., K], w[K, ...]) with FP8 operands (e4m3 forward, e5m2 gradients), current
  scaling; the result in preferred_element_type (default: the operands' promoted dtype)."""
  _check_dims(jnp.ndim(lhs), dimension_numbers)
  lhs_dtype, rhs_dtype = jnp.dtype(lhs.dtype), jnp.dtype(rhs.dtype)
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs_dtype, rhs_dtype))
  return _fp8_dot(lhs, rhs, dimension_numbers, precision, out_dtype, lhs_dtype, rhs_dtype)

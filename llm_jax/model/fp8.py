"""FP8 matmuls with current (just-in-time) per-tensor scaling: `model.fp8` (docs/performance.md).

Forward: both operands are quantized to float8_e4m3fn with a scale from their own amax (|x| max maps to
448), dequantized to their dtype, and multiplied with the ordinary dot_general. Backward: the incoming
gradient is quantized the same way to float8_e5m2 (wider range, max 57344) and the two transposed
matmuls take the dequantized FP8 operands. The quantize -> dequantize -> dot pattern is the one XLA's
GPU GEMM rewriter turns into cuBLASLt FP8 GEMMs with the scales folded in (Hopper and newer); elsewhere
(CPU, older GPUs, shapes cuBLASLt refuses) the same program runs as an emulation in the compute dtype.

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


def dequantize(q, scale, dtype):
  """FP8 values back to `dtype`: q * scale (the pattern XLA folds into an FP8 GEMM)."""
  return q.astype(dtype) * scale.astype(dtype)


def _dot(lhs, rhs, dimension_numbers, precision, preferred_element_type):
  return jax.lax.dot_general(
    lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _fp8_dot(lhs, rhs, dimension_numbers, precision, preferred_element_type, lhs_dtype, rhs_dtype):
  out, _ = _fp8_dot_fwd(lhs, rhs, dimension_numbers, precision, preferred_element_type, lhs_dtype, rhs_dtype)
  return out


def _fp8_dot_fwd(lhs, rhs, dimension_numbers, precision, preferred_element_type, lhs_dtype, rhs_dtype):
  q_l, s_l = quantize(lhs, E4M3)
  q_r, s_r = quantize(rhs, E4M3)
  out = _dot(
    dequantize(q_l, s_l, lhs_dtype),
    dequantize(q_r, s_r, rhs_dtype),
    dimension_numbers,
    precision,
    preferred_element_type,
  )
  return out, (q_l, s_l, q_r, s_r)


def _fp8_dot_bwd(dimension_numbers, precision, preferred_element_type, lhs_dtype, rhs_dtype, res, g):
  q_l, s_l, q_r, s_r = res
  q_g, s_g = quantize(g, E5M2)
  dot = functools.partial(
    _dot,
    dimension_numbers=dimension_numbers,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  _, vjp = jax.vjp(dot, dequantize(q_l, s_l, lhs_dtype), dequantize(q_r, s_r, rhs_dtype))
  return vjp(dequantize(q_g, s_g, g.dtype))


_fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


def fp8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """jax.lax.dot_general with FP8 operands (e4m3 forward, e5m2 gradients), current scaling."""
  return _fp8_dot(
    lhs,
    rhs,
    dimension_numbers,
    precision,
    preferred_element_type,
    jnp.dtype(lhs.dtype),
    jnp.dtype(rhs.dtype),
  )

"""GPT-2's tanh GELU and LLaMA's SwiGLU with memory-lean gradients (float32 recomputation)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

_GELU_C = math.sqrt(2.0 / math.pi)


@jax.custom_vjp
def gelu_tanh(x):
  """GELU, tanh approximation (GPT-2). Its gradient keeps only x and recomputes the rest, in float32."""
  return nn.gelu(x, approximate=True)


def _gelu_tanh_fwd(x):
  return gelu_tanh(x), x


def tanh_by_exp2(u, rsqrt_squared: bool = False):
  """tanh(u) = 1 - 2 / (1 + 2^(2 u log2 e)), for a GPU kernel whose exact tanh is a long instruction sequence
  (llm_jax.model.gelu_kernel). `rsqrt_squared`: the division as rsqrt(y)^2 (y >= 1), so that a kernel with
  fast math runs two fast instructions (ex2 and rsqrt, each within ~2^-22 relative) and no division. In
  float32 within ~1e-7 of tanh here (absolute; the cancellation near 0 costs relative accuracy there, not
  absolute); 2^x overflowing to inf gives 1, underflowing to 0 gives -1."""
  y = 1.0 + jnp.exp2(u * (2.0 * math.log2(math.e)))
  return 1.0 - 2.0 * (jnp.square(jax.lax.rsqrt(y)) if rsqrt_squared else 1.0 / y)


def gelu_tanh_slope(x, tanh=jnp.tanh):
  """d gelu_tanh(x) / dx, elementwise, in x's dtype (float32 here and in the Mosaic GPU kernel's epilogue:
  llm_jax.model.gelu_kernel, which may pass its own `tanh`)."""
  t = tanh(_GELU_C * (x + 0.044715 * x * x * x))
  return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x * x)


def gelu_tanh_slope_by_sigmoid(x):
  """gelu_tanh_slope(x) in fewer operations, for a GPU kernel's epilogue (llm_jax.model.gelu_kernel): with
  u = c (x + a x^3) and s = sigmoid(2u) = (1 + tanh u) / 2, the slope 0.5 (1 + t) + 0.5 x (1 - t^2) u' is
  s (1 + 2 x (1 - s) u'); s = rsqrt(1 + 2^(-2 u log2 e))^2, two fast instructions under fast math (ex2,
  rsqrt; 1 + 2^x >= 1). 2^x overflowing gives s = 0 and the slope 0; underflowing, s = 1 and the slope 1.
  Where gelu' is tiny (x below about -3) nothing cancels: s is small but exact, 1 + 2x (1 - s) u' ~ 2x u'."""
  x2 = x * x
  u = x * (_GELU_C + (_GELU_C * 0.044715) * x2)
  r = jax.lax.rsqrt(1.0 + jnp.exp2(u * (-2.0 * math.log2(math.e))))
  s = r * r
  du = _GELU_C + (3 * _GELU_C * 0.044715) * x2
  return s + s * (2.0 * x * (1.0 - s) * du)


def gelu_tanh_grad(x, g):
  """g * gelu_tanh'(x), computed in float32 and rounded to x's dtype: gelu_tanh's backward pass (also XLA's
  path in llm_jax.model.gelu_kernel)."""
  return (g.astype(jnp.float32) * gelu_tanh_slope(x.astype(jnp.float32))).astype(x.dtype)


def _gelu_tanh_bwd(x, g):
  return (gelu_tanh_grad(x, g),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


@jax.custom_vjp
def swiglu(gate, up):
  """silu(gate) * up (LLaMA). Its gradient keeps only the two inputs, recomputing the rest in float32."""
  return nn.silu(gate) * up


def _swiglu_fwd(gate, up):
  return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, g):
  gate, up = residuals
  gf, uf, g = gate.astype(jnp.float32), up.astype(jnp.float32), g.astype(jnp.float32)
  sig = jax.nn.sigmoid(gf)
  d_gate = g * uf * sig * (1.0 + gf * (1.0 - sig))
  return (d_gate.astype(gate.dtype), (g * gf * sig).astype(up.dtype))


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)

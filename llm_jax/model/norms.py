"""LayerNorm and RMSNorm with a hand-written gradient (model.norm_vjp): the same forward pass as flax's
(float32 statistics, E[x^2] - E[x]^2 for the variance, scale folded into the reciprocal), but its backward
pass keeps only x in its own dtype and two float32 numbers a row, and recomputes the normalised x.

Autodiff through flax's LayerNorm keeps three float32 [B, L, D] tensors a norm for the backward pass (x^2,
x - mean and the scaled output: `jax.ad_checkpoint.print_saved_residuals`), twice and a half the bytes of
a bf16 x each; whether XLA stores or recomputes them on a GPU is what a side by side shows
(docs/performance.md, "Round eight").
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _stats(x_f32, eps: float, centered: bool):
  """Mean (None when not `centered`) and 1 / sqrt(var + eps) over the last axis, as flax computes them."""
  sq = jnp.mean(x_f32 * x_f32, axis=-1, keepdims=True)
  if not centered:
    return None, jax.lax.rsqrt(sq + eps)
  mean = jnp.mean(x_f32, axis=-1, keepdims=True)
  return mean, jax.lax.rsqrt(jnp.maximum(0.0, sq - mean * mean) + eps)


def _apply(x, scale, bias, eps, centered, out_dtype):
  xf = x.astype(jnp.float32)
  mean, rstd = _stats(xf, eps, centered)
  y = (xf if mean is None else xf - mean) * (rstd * scale)
  if bias is not None:
    y = y + bias
  return y.astype(out_dtype), (mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def normalize(x, scale, bias, eps: float, centered: bool, out_dtype):
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis (`centered`: LayerNorm; else RMSNorm,
  no mean, `bias` None), computed in float32 and returned in `out_dtype`."""
  return _apply(x, scale, bias, eps, centered, out_dtype)[0]


def _normalize_fwd(x, scale, bias, eps, centered, out_dtype):
  y, (mean, rstd) = _apply(x, scale, bias, eps, centered, out_dtype)
  return y, (x, mean, rstd, scale, bias)


def _normalize_bwd(eps, centered, out_dtype, residuals, dy):
  x, mean, rstd, scale, bias = residuals
  xf = x.astype(jnp.float32)
  xhat = (xf if mean is None else xf - mean) * rstd
  dyf = dy.astype(jnp.float32)
  rows = tuple(range(dy.ndim - 1))
  g = dyf * scale
  proj = jnp.mean(g * xhat, axis=-1, keepdims=True)
  dx = g - xhat * proj if mean is None else g - jnp.mean(g, axis=-1, keepdims=True) - xhat * proj
  dscale = jnp.sum(dyf * xhat, axis=rows).astype(scale.dtype)
  dbias = None if bias is None else jnp.sum(dyf, axis=rows).astype(bias.dtype)
  return (dx * rstd).astype(x.dtype), dscale, dbias


normalize.defvjp(_normalize_fwd, _normalize_bwd)


class LayerNorm(nn.LayerNorm):
  """flax's LayerNorm (same parameters) through `normalize`; the last axis only."""

  out_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", self.scale_init, (d,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (d,), self.param_dtype) if self.use_bias else None
    return normalize(x, scale, bias, self.epsilon, True, self.out_dtype)


class RMSNorm(nn.RMSNorm):
  """flax's RMSNorm (same parameters) through `normalize`; the last axis only."""

  out_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", self.scale_init, (x.shape[-1],), self.param_dtype)
    return normalize(x, scale, None, self.epsilon, False, self.out_dtype)

"""Decode-lever arithmetic (ModelConfig.decode_levers, model/levers.py): the statistics of a norm folded
into the next matmul, the fused matmuls, the one KV cache and attention over it.

Shapes in names as in transformer.py.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.model.config import ModelConfig


def norm_stats(x_BLD, cfg: ModelConfig):
  """(mean or None for RMSNorm, 1/std) [B, L, 1] in float32: flax's LayerNorm / RMSNorm statistics,
  for the decode path whose norm is folded into the next matmul (decode lever "norm")."""
  x_BLD = x_BLD.astype(jnp.float32)
  mean2_BL1 = jnp.mean(jnp.square(x_BLD), axis=-1, keepdims=True)
  if cfg.norm == "rmsnorm":
    return None, jax.lax.rsqrt(mean2_BL1 + cfg.norm_eps)
  mean_BL1 = jnp.mean(x_BLD, axis=-1, keepdims=True)
  var_BL1 = jnp.maximum(0.0, mean2_BL1 - jnp.square(mean_BL1))
  return mean_BL1, jax.lax.rsqrt(var_BL1 + cfg.norm_eps)


def fused_dense(x_BLD, kernel, bias, dtype, stats=None, colsum=None):
  """x @ kernel [D, ...] (+ bias) for the decode levers' concatenated matrices.

  Without `stats` this is flax's Dense arithmetic (inputs and output in `dtype`). With the
  statistics of x's norm (`norm_stats`) it is norm(x) @ W + b for a kernel prepared as scale * W,
  bias as norm bias @ W + b and colsum as the kernel's column sums (model.levers.fold_norm):
  (x @ kernel - mean * colsum) / std + bias, accumulated and finished in float32.
  """
  x_BLD = x_BLD.astype(dtype)
  if stats is None:
    y = jnp.einsum("bld,d...->bl...", x_BLD, kernel.astype(dtype))
    return y if bias is None else y + bias.astype(dtype)
  mean_BL1, rstd_BL1 = stats
  acc = jnp.einsum("bld,d...->bl...", x_BLD, kernel.astype(dtype), preferred_element_type=jnp.float32)
  lead = acc.shape[:2] + (1,) * (acc.ndim - 2)
  if mean_BL1 is not None:
    acc = acc - mean_BL1.reshape(lead) * colsum.astype(jnp.float32)
  acc = acc * rstd_BL1.reshape(lead)
  if bias is not None:
    acc = acc + bias.astype(jnp.float32)
  return acc.astype(dtype)


def fused_params(module: nn.Module, prefix: str, out_shape: tuple[int, ...], cfg: ModelConfig, folded: bool):
  """(kernel [D, *out_shape], bias or None, colsum or None): a fused matmul's parameters in `module`
  (`prefix`_kernel, _bias, _colsum; colsum only with a folded LayerNorm), laid out by model/levers.py."""
  pdt, zeros = jnp.dtype(cfg.param_dtype), nn.initializers.zeros
  kernel = module.param(f"{prefix}_kernel", zeros, (cfg.d_model, *out_shape), pdt)
  bias = module.param(f"{prefix}_bias", zeros, out_shape, pdt) if cfg.use_bias else None
  colsum = None
  if folded and cfg.norm != "rmsnorm":
    colsum = module.param(f"{prefix}_colsum", zeros, out_shape, jnp.float32)
  return kernel, bias, colsum


_FEW_QUERIES = 16  # at most this many queries a call: the new keys' part without gemms


def one_cache_attention(q_BLNH, k_BLKH, v_BLKH, positions_BL, kv_2BKSH, cfg: ModelConfig, span: int):
  """Attention over the one cache's first `span` positions before this call plus this call's own keys
  (decode lever "kv"): nothing is written here; Decoder.hidden writes every layer's keys and values.

  Softmax over [cache positions < each row's start, then this call's L keys causally]; the
  same scores and float32 softmax as `_cached_attention`, whose cache holds the same keys.
  """
  c = cfg
  b, length, n, h = q_BLNH.shape
  kh = c.num_kv_heads
  k_BKSH, v_BKSH = kv_2BKSH[0, :, :, :span], kv_2BKSH[1, :, :, :span]
  q_BKGLH = q_BLNH.reshape(b, length, kh, n // kh, h).transpose(0, 2, 3, 1, 4)
  precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q_BLNH.dtype == jnp.bfloat16 else None
  f32, scale = jnp.float32, jnp.array(1.0 / math.sqrt(h), jnp.float32)
  k_BKSH = k_BKSH.astype(q_BLNH.dtype)
  dot = functools.partial(jnp.einsum, precision=precision, preferred_element_type=f32)
  old_BKGLS = dot("bkglh,bksh->bkgls", q_BKGLH, k_BKSH)
  # A few queries (a decode step, a speculative round's check): the new keys' scores and values as
  # elementwise products that fuse with the softmax, not batched gemms that need transposed copies
  # of the new keys and values (two gemms and two copies a layer); a prompt's piece: gemms.
  few = length <= _FEW_QUERIES
  if length == 1:  # a decode step
    k_BK11H = k_BLKH[:, 0, :, None, None].astype(f32)
    new_BKGLM = (q_BKGLH.astype(f32) * k_BK11H).sum(-1, keepdims=True)
  elif few:
    k_BK1MH = k_BLKH.transpose(0, 2, 1, 3)[:, :, None].astype(f32)
    new_BKGLM = (q_BKGLH.astype(f32)[:, :, :, :, None] * k_BK1MH[:, :, :, None]).sum(-1)
  else:
    new_BKGLM = dot("bkglh,bmkh->bkglm", q_BKGLH, k_BLKH)
  floor = -0.7 * float(jnp.finfo(jnp.float32).max)
  old_mask_B11LS = jnp.arange(span)[None, None, None, None, :] < positions_BL[:, None, None, :1, None]
  new_mask_LM = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
  old_BKGLS = jnp.where(old_mask_B11LS, old_BKGLS * scale, floor)
  new_BKGLM = jnp.where(new_mask_LM, new_BKGLM * scale, floor)
  # softmax over both parts without concatenating them (a copy of the scores per layer)
  max_BKGL1 = jnp.maximum(old_BKGLS.max(-1, keepdims=True), new_BKGLM.max(-1, keepdims=True))
  old_BKGLS, new_BKGLM = jnp.exp(old_BKGLS - max_BKGL1), jnp.exp(new_BKGLM - max_BKGL1)
  sum_BKGL1 = old_BKGLS.sum(-1, keepdims=True) + new_BKGLM.sum(-1, keepdims=True)
  p_old_BKGLS = (old_BKGLS / sum_BKGL1).astype(k_BKSH.dtype)
  p_new_BKGLM = (new_BKGLM / sum_BKGL1).astype(k_BKSH.dtype)
  out_BKGLH = jnp.einsum("bkgls,bksh->bkglh", p_old_BKGLS, v_BKSH, preferred_element_type=f32)
  if length == 1:
    out_BKGLH += p_new_BKGLM.astype(f32) * v_BLKH.astype(k_BKSH.dtype)[:, 0, :, None, None].astype(f32)
  elif few:
    v_BK1MH = v_BLKH.astype(k_BKSH.dtype).transpose(0, 2, 1, 3)[:, :, None].astype(f32)
    out_BKGLH += (p_new_BKGLM.astype(f32)[..., None] * v_BK1MH[:, :, :, None]).sum(-2)
  else:
    out_BKGLH += jnp.einsum(
      "bkglm,bmkh->bkglh", p_new_BKGLM, v_BLKH.astype(k_BKSH.dtype), preferred_element_type=f32
    )
  return out_BKGLH.astype(q_BLNH.dtype).transpose(0, 3, 1, 2, 4).reshape(b, length, n, h)


class KVCache(nn.Module):
  """The one KV cache of decode lever "kv": [layers, 2 (keys, values), B, K, S, H], written once per call
  with every layer's keys and values (one scatter instead of two per layer)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, batch: int, new_BLA2KH=None, positions_BL=None):
    c = self.cfg
    shape = (c.num_layers, 2, batch, c.num_kv_heads, c.max_seq_len, c.head_dim)
    cache = self.variable("cache", "kv", jnp.zeros, shape, jnp.dtype(c.dtype))
    if new_BLA2KH is not None and not self.is_initializing():
      b, length = positions_BL.shape
      rows_BL = jnp.broadcast_to(jnp.arange(b)[:, None], (b, length))
      pos_BL = positions_BL[:, :1] + jnp.arange(length)[None, :]
      # (row, position) slots [B, L], each [layers, 2, K, H]
      cache.value = cache.value.at[:, :, rows_BL, :, pos_BL, :].set(new_BLA2KH.astype(cache.value.dtype))
    return cache.value

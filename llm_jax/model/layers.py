"""Two pieces the decoder shares with other callers: the norm layer (LayerNorm or RMSNorm in float32)
and the output head's matmul (the training loss's chunked path calls it on slices of the hidden state).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from llm_jax.model.config import ModelConfig
from llm_jax.model.fp8 import fp8_dot_general
from llm_jax.model.partitioning import constrain as _constrain

_lp = nn.with_logical_partitioning


class Norm(nn.Module):
  """LayerNorm or RMSNorm, computed in float32, returned in the compute dtype."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD):
    c = self.cfg
    kw = dict(
      epsilon=c.norm_eps,
      dtype=jnp.float32,
      param_dtype=jnp.dtype(c.param_dtype),
      scale_init=_lp(nn.initializers.ones, ("norm",)),
    )
    if c.norm == "rmsnorm":
      y = nn.RMSNorm(**kw)(x_BLD.astype(jnp.float32))
    else:
      y = nn.LayerNorm(use_bias=c.use_bias, bias_init=_lp(nn.initializers.zeros, ("norm",)), **kw)(
        x_BLD.astype(jnp.float32)
      )
    return y.astype(jnp.dtype(c.dtype))


def head_logits(h_BLD, w_DV, cfg: ModelConfig, fp8: bool = False):
  """The output head: h [B, L, D] @ w [D, V] in the compute dtype, written in cfg.logits_dtype.

  Accumulates in float32; `fp8`: FP8 operands (llm_jax.model.fp8). The training loss's chunked path
  (train.loss_chunks) calls this on slices of h, so both paths compute the same logits.
  """
  w_DV = w_DV.astype(h_BLD.dtype)
  out_dtype = jnp.dtype(cfg.logits_dtype)
  if fp8:
    dims = (((h_BLD.ndim - 1,), (0,)), ((), ()))
    logits_BLV = fp8_dot_general(h_BLD, w_DV, dims, preferred_element_type=out_dtype)
  else:
    logits_BLV = jnp.einsum("bld,dv->blv", h_BLD, w_DV, preferred_element_type=out_dtype)
  return _constrain(logits_BLV, ("batch", "length", "act_vocab"))

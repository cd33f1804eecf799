"""Token cross-entropy in float32, with optional z-loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_BLV, targets_BL):
  """Per-token negative log-likelihood and log-partition, both float32 [B, L]."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  true_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  return lse_BL - true_BL, lse_BL


def weighted_sums(logits_BLV, targets_BL, weights_BL, z_loss: float = 0.0):
  """(sum of weighted nll, sum of weighted z-loss term, sum of weights) over the batch."""
  nll_BL, lse_BL = token_nll(logits_BLV, targets_BL)
  w_BL = weights_BL.astype(jnp.float32)
  z_sum = jnp.sum(z_loss * jnp.square(lse_BL) * w_BL) if z_loss else jnp.zeros((), jnp.float32)
  return jnp.sum(nll_BL * w_BL), z_sum, jnp.sum(w_BL)

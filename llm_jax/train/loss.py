"""Token cross-entropy in float32, with optional z-loss.

The logits may arrive in the compute dtype (bfloat16 on accelerators, `model.logits_dtype`): the
softmax and the loss are still computed in float32, inside fusions, and the custom gradient below
writes d(logits) once, in the logits' own dtype. Plain autodiff of the same formula keeps a float32
exp(logits - max) [B, L, V] for the backward pass and scatters into a float32 zero array for the
target gather, three or four extra passes over the largest tensor of a small model's step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _target_mask(logits_BLV, targets_BL):
  """[B, L, V] bool: True at each row's target id (an iota compare that XLA fuses, no gather)."""
  vocab_BLV = jax.lax.broadcasted_iota(jnp.int32, logits_BLV.shape, logits_BLV.ndim - 1)
  return vocab_BLV == targets_BL[..., None]


def _nll_lse(logits_BLV, targets_BL):
  # Two reductions (max, then sum of exp) and the target select; XLA fuses the latter into the
  # backward pass's read of the logits. A one-pass online log-sum-exp (a variadic reduce) measured
  # slower: two exp per element make it compute-bound (docs/performance.md).
  x_BLV = logits_BLV.astype(jnp.float32)
  max_BL = jax.lax.stop_gradient(jnp.max(x_BLV, axis=-1))
  lse_BL = max_BL + jnp.log(jnp.sum(jnp.exp(x_BLV - max_BL[..., None]), axis=-1))
  true_BL = jnp.sum(jnp.where(_target_mask(logits_BLV, targets_BL), x_BLV, 0.0), axis=-1)
  return lse_BL - true_BL, lse_BL


@jax.custom_vjp
def token_nll(logits_BLV, targets_BL):
  """Per-token negative log-likelihood and log-partition, both float32 [B, L]."""
  return _nll_lse(logits_BLV, targets_BL)


def _token_nll_fwd(logits_BLV, targets_BL):
  nll_BL, lse_BL = _nll_lse(logits_BLV, targets_BL)
  return (nll_BL, lse_BL), (logits_BLV, targets_BL, lse_BL)


def _token_nll_bwd(residuals, cotangents):
  logits_BLV, targets_BL, lse_BL = residuals
  g_nll_BL, g_lse_BL = cotangents
  # d nll = softmax - onehot(target); d lse = softmax.
  probs_BLV = jnp.exp(logits_BLV.astype(jnp.float32) - lse_BL[..., None])
  d_BLV = probs_BLV * (g_nll_BL + g_lse_BL)[..., None]
  d_BLV = d_BLV - jnp.where(_target_mask(logits_BLV, targets_BL), g_nll_BL[..., None], 0.0)
  return d_BLV.astype(logits_BLV.dtype), None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def weighted_sums(logits_BLV, targets_BL, weights_BL, z_loss: float = 0.0):
  """(sum of weighted nll, sum of weighted z-loss term, sum of weights) over the batch."""
  nll_BL, lse_BL = token_nll(logits_BLV, targets_BL)
  w_BL = weights_BL.astype(jnp.float32)
  z_sum = jnp.sum(z_loss * jnp.square(lse_BL) * w_BL) if z_loss else jnp.zeros((), jnp.float32)
  return jnp.sum(nll_BL * w_BL), z_sum, jnp.sum(w_BL)

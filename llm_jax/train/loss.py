"""Token cross-entropy in float32, with optional z-loss.

The logits may arrive in the compute dtype (bfloat16 on accelerators, `model.logits_dtype`): the
softmax and the loss are still computed in float32, inside fusions, and the custom gradient below
writes d(logits) once, in the logits' own dtype. Plain autodiff of the same formula keeps a float32
exp(logits - max) [B, L, V] for the backward pass and scatters into a float32 zero array for the
target gather, three or four extra passes over the largest tensor of a small model's step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llm_jax.train.xent_kernel import fused_nll_lse_grad


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


def _weighted(nll_BL, lse_BL, weights_BL, z_loss: float):
  """(sum of weighted nll, sum of weighted z-loss term), float32."""
  w_BL = weights_BL.astype(jnp.float32)
  z_sum = jnp.sum(z_loss * jnp.square(lse_BL) * w_BL) if z_loss else jnp.zeros((), jnp.float32)
  return jnp.sum(nll_BL * w_BL), z_sum


def weighted_sums(logits_BLV, targets_BL, weights_BL, z_loss: float = 0.0):
  """(sum of weighted nll, sum of weighted z-loss term, sum of weights) over the batch."""
  nll_sum, z_sum = _weighted(*token_nll(logits_BLV, targets_BL), weights_BL, z_loss)
  return nll_sum, z_sum, jnp.sum(weights_BL.astype(jnp.float32))


# ------------------------------------------------------------------ chunked head + loss (train.loss_chunks)


def _to_chunks(x_BL, n: int):
  """[B, L, ...] -> [n, B, L/n, ...] (L zero-padded to a multiple of n): slices of the sequence, so every
  slice keeps the batch axis and its sharding."""
  b, length = x_BL.shape[:2]
  pad = -length % n
  if pad:
    x_BL = jnp.pad(x_BL, [(0, 0), (0, pad)] + [(0, 0)] * (x_BL.ndim - 2))
  x_BnC = x_BL.reshape(b, n, (length + pad) // n, *x_BL.shape[2:])
  return jnp.moveaxis(x_BnC, 1, 0)


def _from_chunks(x_nBC, length: int):
  """Inverse of _to_chunks: [n, B, C, ...] -> [B, L, ...]."""
  x_BnC = jnp.moveaxis(x_nBC, 0, 1)
  return x_BnC.reshape(x_BnC.shape[0], -1, *x_BnC.shape[3:])[:, :length]


def _kernel_sums(h_BCD, w_DV, targets_BC, weights_BC, head_fn, z_loss):
  """One slice through the fused kernel: ((d/dh, d/dw), (nll sum, z-loss sum)), d(logits) from the kernel."""
  logits_BCV, head_vjp = jax.vjp(head_fn, h_BCD, w_DV)
  nll_BC, lse_BC, d_BCV = fused_nll_lse_grad(logits_BCV, targets_BC, weights_BC, z_loss)
  return head_vjp(d_BCV), _weighted(nll_BC, lse_BC, weights_BC, z_loss)


def _chunked_scan(h_BLD, w_DV, targets_BL, weights_BL, head_fn, z_loss, chunks, with_grads, kernel=False):
  """(nll sum, z-loss sum, d(total)/dw, d(total)/dh per slice [n, B, C, D] or None), one slice at a time;
  `kernel`: the gradients from the fused cross-entropy kernel (xent_kernel) instead of autodiff."""
  xs = tuple(_to_chunks(x, chunks) for x in (h_BLD, targets_BL, weights_BL))

  def body(carry, x):
    nll_acc, z_acc, dw_acc = carry
    h_BCD, targets_BC, weights_BC = x

    def sums(h, w):  # this slice's logits exist only here
      nll, z = _weighted(*token_nll(head_fn(h, w), targets_BC), weights_BC, z_loss)
      return nll + z, (nll, z)

    if not with_grads:
      _, (nll, z) = sums(h_BCD, w_DV)
      return (nll_acc + nll, z_acc + z, dw_acc), None
    if kernel:
      (dh_BCD, dw_DV), (nll, z) = _kernel_sums(h_BCD, w_DV, targets_BC, weights_BC, head_fn, z_loss)
    else:
      total, vjp, (nll, z) = jax.vjp(sums, h_BCD, w_DV, has_aux=True)
      dh_BCD, dw_DV = vjp(jnp.ones_like(total))
    return (nll_acc + nll, z_acc + z, dw_acc + dw_DV), dh_BCD

  zero = jnp.zeros((), jnp.float32)
  dw0 = jnp.zeros(w_DV.shape, w_DV.dtype) if with_grads else zero
  (nll, z, dw_DV), dh_nBCD = jax.lax.scan(body, (zero, zero, dw0), xs)
  return nll, z, dw_DV, dh_nBCD


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _chunked(h_BLD, w_DV, targets_BL, weights_BL, head_fn, z_loss, chunks, kernel):
  del kernel  # without gradients both paths are the same XLA loss
  nll, z, _, _ = _chunked_scan(h_BLD, w_DV, targets_BL, weights_BL, head_fn, z_loss, chunks, False)
  return nll + z, (nll, z)


def _chunked_fwd(h_BLD, w_DV, targets_BL, weights_BL, head_fn, z_loss, chunks, kernel):
  # The loss is a sum, so its gradient is computed here, slice by slice, and only scaled in the
  # backward pass: no slice's logits are kept or recomputed (3 head matmuls, as without slices).
  nll, z, dw_DV, dh_nBCD = _chunked_scan(
    h_BLD, w_DV, targets_BL, weights_BL, head_fn, z_loss, chunks, True, kernel
  )
  dh_BLD = _from_chunks(dh_nBCD, h_BLD.shape[1])
  return (nll + z, (nll, z)), (dh_BLD, dw_DV, targets_BL, weights_BL)


def _chunked_bwd(head_fn, z_loss, chunks, kernel, res, cotangents):
  del head_fn, z_loss, chunks, kernel
  dh_BLD, dw_DV, targets_BL, weights_BL = res
  g_total, _ = cotangents  # the (nll, z) parts are reported under stop_gradient: no gradient flows
  g = g_total.astype(jnp.float32)
  return (
    (g * dh_BLD.astype(jnp.float32)).astype(dh_BLD.dtype),
    (g * dw_DV.astype(jnp.float32)).astype(dw_DV.dtype),
    None,
    jnp.zeros_like(weights_BL),
  )


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_sums(
  h_BLD, w_DV, targets_BL, weights_BL, *, head_fn, z_loss: float = 0.0, chunks: int, kernel: bool = False
):
  """(nll + z-loss sum, nll sum, z-loss sum): weighted_sums of `head_fn(h, w)`'s logits, computed in
  `chunks` slices of the sequence so the [B, L, V] logits never exist at once (train.loss_chunks; 1: one
  slice). `kernel`: each slice's loss and d(logits) from the fused Pallas kernel (train.loss_kernel).

  head_fn(h [B, C, D], w [D, V]) -> logits [B, C, V] (llm_jax.model.layers.head_logits). Only the
  first output is differentiable (the others are metrics, under stop_gradient); its gradients with
  respect to h and w equal those of the unchunked loss.
  """
  total, (nll, z) = _chunked(
    h_BLD, w_DV, targets_BL, weights_BL, head_fn, float(z_loss), int(chunks), bool(kernel)
  )
  return total, jax.lax.stop_gradient(nll), jax.lax.stop_gradient(z)

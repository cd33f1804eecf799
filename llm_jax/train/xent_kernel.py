"""A fused cross-entropy kernel (Pallas; Triton on GPUs): per-token nll, log-partition and d(loss)/d(logits)
from one program per row of the logits (train.loss_kernel="pallas").

XLA computes the loss and its gradient in three passes over the [N, V] logits: the row maxima, the sums of
exp, and the backward pass's softmax minus one-hot (7.8 ms of gpt_small's 64 x 1,024-token pass on an
H200). Here one program owns one row: it streams the row once for the online maximum, sum of exp and
target logit, then again (mostly from L2: a row is V x 2 bytes) to write the gradient, weighted by the
token's weight, over the logits' own buffer (4.0 ms; docs/performance.md, "A fused cross-entropy kernel").

Shapes: N rows (tokens), V vocabulary. On CPUs the kernel runs in Pallas's interpreter (tests; slow).
"""

from __future__ import annotations

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from llm_jax.model.partitioning import current_mesh

# Columns per load and warps per row: the fastest of those measured on one H200 at gpt_small's shapes
# (bench/xent_probe.py, docs/performance.md).
BLOCK_V = 2048
NUM_WARPS = 4
_LOG2E = 1.4426950408889634
log = logging.getLogger(__name__)


def _row_kernel(x_ref, t_ref, w_ref, nll_ref, lse_ref, d_ref, *, block: int, z_loss: float):
  """One row: x_ref [V] logits, t_ref/w_ref () target and weight -> nll, lse () and d_ref [V] (aliases x)."""
  v = x_ref.shape[0]
  target = t_ref[...]
  n_blocks = pl.cdiv(v, block)

  # exp(x) as exp2(x * log2 e): Triton's exp2 is one hardware instruction (1.25x faster measured).
  def stats(i, carry):
    max_, sum_, true_ = carry
    cols = i * block + jnp.arange(block)
    mask = cols < v
    x = plgpu.load(x_ref.at[cols], mask=mask, other=-jnp.inf, eviction_policy="evict_last")
    x = x.astype(jnp.float32)
    new_max = jnp.maximum(max_, jnp.max(x))
    scaled_max = new_max * _LOG2E
    sum_ = sum_ * jnp.exp2(max_ * _LOG2E - scaled_max) + jnp.sum(jnp.exp2(x * _LOG2E - scaled_max))
    true_ = true_ + jnp.sum(jnp.where(cols == target, x, 0.0))
    return new_max, sum_, true_

  init = (jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.float32(0.0))
  max_, sum_, true_ = jax.lax.fori_loop(0, n_blocks, stats, init)
  lse = max_ + jnp.log(sum_)
  nll_ref[...] = lse - true_
  lse_ref[...] = lse
  w = w_ref[...]
  # d(w * (nll + z * lse^2)) / d(logits) = w * (1 + 2 z lse) * softmax - w * onehot(target)
  scale = w * (1.0 + 2.0 * z_loss * lse) if z_loss else w
  scaled_lse = lse * _LOG2E

  @pl.loop(0, n_blocks)
  def _(i):
    cols = i * block + jnp.arange(block)
    mask = cols < v
    x = plgpu.load(x_ref.at[cols], mask=mask, other=0.0, eviction_policy="evict_first")
    p = jnp.exp2(x.astype(jnp.float32) * _LOG2E - scaled_lse)
    d = p * scale - jnp.where(cols == target, w, 0.0)
    plgpu.store(d_ref.at[cols], d.astype(d_ref.dtype), mask=mask)


def nll_lse_grad(logits_NV, targets_N, weights_N, *, z_loss=0.0, block=BLOCK_V, num_warps=NUM_WARPS):
  """(nll [N] float32, lse [N] float32, d [N, V] in the logits' dtype) on one device: d is the gradient of
  sum(weights * (nll + z_loss * lse^2)) with respect to the logits, written over the logits' buffer.

  A target outside [0, V) gives nll = lse (its weight should be 0). The Triton kernel on GPUs, Pallas's
  interpreter on CPUs; other platforms raise.
  """
  platform = jax.default_backend()
  if platform not in ("gpu", "cpu"):
    raise ValueError(f"train.loss_kernel='pallas' is a Triton kernel for GPUs; this is a {platform} machine")
  if platform == "cpu":  # at trace time: once per compiled step
    log.warning(
      "train.loss_kernel='pallas' runs in Pallas's interpreter on CPUs, far slower than the XLA loss "
      "(meant for tests); use train.loss_kernel=xla here"
    )
  v = logits_NV.shape[-1]
  kernel = functools.partial(_row_kernel, block=min(block, pl.next_power_of_2(v)), z_loss=float(z_loss))
  row_call = pl.pallas_call(
    kernel,
    grid=(),
    out_shape=[
      jax.ShapeDtypeStruct((), jnp.float32),
      jax.ShapeDtypeStruct((), jnp.float32),
      jax.ShapeDtypeStruct((v,), logits_NV.dtype),
    ],
    input_output_aliases={0: 2},
    compiler_params=plgpu.CompilerParams(num_warps=num_warps),
    interpret=platform == "cpu",
    name="fused_cross_entropy",
  )
  return jax.vmap(row_call)(logits_NV, targets_N.astype(jnp.int32), weights_N.astype(jnp.float32))


def fused_nll_lse_grad(logits_BLV, targets_BL, weights_BL, z_loss: float = 0.0):
  """nll_lse_grad over [B, L, V] logits, on each device's rows of the current mesh (constraint_mesh).

  A custom kernel is opaque to XLA's partitioner, so it runs under shard_map: rows split as the `batch`
  and `length` logical axes are, the vocabulary whole on each device (a vocabulary sharded over `tensor`
  is gathered first).
  """
  v = logits_BLV.shape[-1]

  def local(x_BLV, t_BL, w_BL):
    nll_N, lse_N, d_NV = nll_lse_grad(x_BLV.reshape(-1, v), t_BL.reshape(-1), w_BL.reshape(-1), z_loss=z_loss)
    rows = x_BLV.shape[:2]
    return nll_N.reshape(rows), lse_N.reshape(rows), d_NV.reshape(x_BLV.shape)

  mesh = current_mesh()
  if mesh is None or mesh.size == 1:
    return local(logits_BLV, targets_BL, weights_BL)
  rows = P(*nn.logical_to_mesh_axes(("batch", "length")))
  full = P(*rows, None)
  return jax.shard_map(
    local, mesh=mesh, in_specs=(full, rows, rows), out_specs=(rows, rows, full), check_vma=False
  )(logits_BLV, targets_BL, weights_BL)

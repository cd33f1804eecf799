"""int8 weight-only quantization with per-output-channel scales.

Quantized: every dense kernel, the token embedding (one scale per row, which is also the output
channel of the tied head) and an untied head. Norms, biases and learned positions stay float.
A quantized leaf is a `QTensor(q int8, scale float32)`; `dequantize` turns a tree back into floats
(eagerly at load, or inside a jitted function so that weights stay int8 in device memory).
The report comparing precisions is `python -m llm_jax.quantize` (llm_jax/quantize.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

SCALE_SUFFIX = ".scale"


@struct.dataclass
class QTensor:
  """An int8 tensor and its float32 scale (keepdims shape, broadcast against q)."""

  q: Any
  scale: Any

  @property
  def shape(self):
    return self.q.shape


def is_qtensor(x) -> bool:
  return isinstance(x, QTensor)


def contracting_axes(name: str, ndim: int) -> tuple[int, ...] | None:
  """Axes a weight is summed over in its matmul (scales are per the other axes); None: not quantized."""
  parts = name.split("/")
  lead = 1 if parts[0] == "blocks" else 0  # scanned layers carry a leading layer axis
  if parts[-1] == "embedding" and ndim == 2:
    return (1,)  # [V, D]: one scale per vocab row (lookup row and tied-head output channel)
  if parts[-1] == "head" and ndim == 2:
    return (0,)  # [D, V]
  if parts[-1] != "kernel" or ndim - lead < 2:
    return None
  if len(parts) >= 2 and parts[-2] == "out":
    return (lead, lead + 1)  # attention output [N, H, D]
  return (lead,)  # [D_in, *out]


def quantize_array(w, axes: tuple[int, ...]) -> QTensor:
  """Symmetric int8: scale = max|w| over `axes` / 127, q = round(w / scale)."""
  w = np.asarray(w, dtype=np.float32)
  amax = np.max(np.abs(w), axis=axes, keepdims=True)
  scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
  q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
  return QTensor(q=q, scale=scale)


def _name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def quantize_params(params) -> Any:
  """Replaces every matmul weight in a parameter tree with a QTensor (numpy, on the host)."""

  def one(path, leaf):
    axes = contracting_axes(_name(path), np.ndim(leaf))
    return leaf if axes is None else quantize_array(leaf, axes)

  return jax.tree_util.tree_map_with_path(one, params)


def dequantize(params, dtype=jnp.float32) -> Any:
  """QTensor leaves -> float arrays of `dtype`; other leaves unchanged. Works eagerly and under jit."""

  def one(leaf):
    if is_qtensor(leaf):
      return (jnp.asarray(leaf.q).astype(jnp.float32) * jnp.asarray(leaf.scale)).astype(dtype)
    return leaf

  return jax.tree.map(one, params, is_leaf=is_qtensor)


def has_qtensors(params) -> bool:
  return any(is_qtensor(x) for x in jax.tree.leaves(params, is_leaf=is_qtensor))


def nbytes(params) -> int:
  """Bytes the weights take (int8 values plus their scales for quantized leaves)."""
  leaves = jax.tree.leaves(params)  # a QTensor flattens to q and scale
  return int(sum(np.asarray(x).nbytes if not hasattr(x, "nbytes") else x.nbytes for x in leaves))

"""Decode-only parameter layouts for `ModelConfig.decode_levers` (fewer kernels per decode step).

`prepare` turns per-layer parameters (scan_layers=False) into the layout the levers read; training
and the files on disk keep the usual layout. The same weights, rearranged:

- "qkv": attn/{query,key,value} concatenated into attn/qkv_kernel [D, N+2K, H] (and qkv_bias); for
  SwiGLU, mlp/{gate,up} stacked into mlp/in_kernel [D, 2, F]. int8 (QTensor) weights concatenate too.
- "norm" (with "qkv"; float weights only): the pre-attention and pre-MLP norms folded into the next
  matmul: kernel scale * W, bias norm_bias @ W + b (float32), colsum = the kernel's column sums
  (float32, LayerNorm only): norm(x) @ W + b = (x @ kernel - mean(x) * colsum) / std(x) + bias.
- "kv": no parameter change (the cache layout changes: transformer.KVCache).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llm_jax.model.config import ModelConfig
from llm_jax.model.quantize import QTensor, has_qtensors, is_qtensor

_QKV = ("query", "key", "value")


def _concat(leaves, axis: int, stack: bool = False):
  join = jnp.stack if stack else jnp.concatenate
  if is_qtensor(leaves[0]):
    return QTensor(q=join([x.q for x in leaves], axis=axis), scale=join([x.scale for x in leaves], axis=axis))
  return join(leaves, axis=axis)


def _fold(kernel, bias, norm: dict, cfg: ModelConfig, where: str):
  """(scale * kernel, folded float32 bias or None, float32 colsum or None) of norm(x) @ kernel + bias."""
  if is_qtensor(kernel):
    raise ValueError(f"decode lever 'norm' needs float weights; {where} is int8 (dequantize first)")
  (inner,) = norm.values()  # {"LayerNorm_0": {...}} or {"RMSNorm_0": {...}}
  k32 = jnp.asarray(kernel, jnp.float32)
  lead = (k32.shape[0],) + (1,) * (k32.ndim - 1)
  new_kernel = (jnp.asarray(inner["scale"], jnp.float32).reshape(lead) * k32).astype(kernel.dtype)
  new_bias = None if bias is None else jnp.asarray(bias, jnp.float32)
  if "bias" in inner:
    shift = jnp.tensordot(jnp.asarray(inner["bias"], jnp.float32), k32, axes=(0, 0))
    new_bias = shift if new_bias is None else new_bias + shift
  colsum = None
  if cfg.norm != "rmsnorm":  # from the stored (rounded) kernel, as the matmul multiplies it
    colsum = jnp.asarray(new_kernel, jnp.float32).sum(axis=0)
  return new_kernel, new_bias, colsum


def _put(tree: dict, prefix: str, kernel, bias, colsum) -> None:
  tree[f"{prefix}_kernel"] = kernel
  if bias is not None:
    tree[f"{prefix}_bias"] = bias
  if colsum is not None:
    tree[f"{prefix}_colsum"] = colsum


def _block(block: dict, cfg: ModelConfig, levers: frozenset, where: str) -> dict:
  block, attn, mlp = dict(block), dict(block["attn"]), dict(block["mlp"])
  swi = cfg.activation == "swiglu"
  if "qkv" in levers:
    kernel = _concat([attn[n]["kernel"] for n in _QKV], axis=1)
    bias = _concat([attn[n]["bias"] for n in _QKV], axis=0) if cfg.use_bias else None
    for n in _QKV:
      del attn[n]
    colsum = None
    if "norm" in levers:
      kernel, bias, colsum = _fold(kernel, bias, block.pop("norm_attn"), cfg, f"{where}/attn")
    _put(attn, "qkv", kernel, bias, colsum)
  if (swi and "qkv" in levers) or "norm" in levers:
    names = ("gate", "up") if swi else ("up",)
    parts = [mlp.pop(n) for n in names]
    kernel = _concat([p["kernel"] for p in parts], axis=1, stack=True) if swi else parts[0]["kernel"]
    bias = None
    if cfg.use_bias:
      bias = _concat([p["bias"] for p in parts], axis=0, stack=True) if swi else parts[0]["bias"]
    colsum = None
    if "norm" in levers:
      kernel, bias, colsum = _fold(kernel, bias, block.pop("norm_mlp"), cfg, f"{where}/mlp")
    _put(mlp, "in", kernel, bias, colsum)
  block["attn"], block["mlp"] = attn, mlp
  return block


def prepare(params, cfg: ModelConfig, levers: str):
  """(params in the layout of `levers`, cfg with decode_levers=levers) from per-layer parameters."""
  if cfg.scan_layers:
    raise ValueError("decode levers need per-layer parameters: call model.unstack_layers(levers=...)")
  if cfg.decode_levers:
    raise ValueError(f"the parameters already have decode_levers={cfg.decode_levers!r}")
  cfg = dataclasses.replace(cfg, decode_levers=levers)
  wanted = cfg.levers()  # validates the names
  if not cfg.causal:
    raise ValueError("decode levers apply to causal decoders only")
  params = dict(params)
  for i in range(cfg.num_layers):
    params[f"block_{i}"] = _block(params[f"block_{i}"], cfg, wanted, f"block_{i}")
  return params, cfg


def default_levers(params, platform: str | None = None, speculative: bool = False) -> str:
  """The decode levers that decoding prepares `params` for (ModelConfig.decode_levers) on `platform`
  (default: JAX's default backend): the server's engine, the generate CLI and the benchmarks.

  "qkv,norm,kv" for float weights (one H200, gpt_small shapes, in process, against "qkv,norm": +5.7%
  tokens/s at batch 32 on 2026-11-30, +3.0% on 2026-12-04, where batch 1 lost 3.4% and batch 8 1%;
  docs/serving.md "The trained pair without the one cache"); "qkv,kv" for int8 weights kept in
  memory: "norm" folds the norm scales into float kernels and refuses int8 ones, while "qkv"
  concatenates int8 values and scales alike and "kv" changes only the cache. On a CPU without "kv":
  XLA's CPU compiler copies that one-array cache every decode step (2-layer gpt_small shapes, batch
  8: 202 against 371 tokens/s; docs/serving.md).

  `speculative`: the target and the draft of speculative decoding, without "kv" everywhere. A
  round's check gives each row k + 1 queries, whose attention over the cache runs as gemms, and XLA
  copies a layer's keys and values out of the one cache before a gemm reads them (two copies per
  layer and round; one H200, a 12 x 768 target and a 1 x 384 draft, 32 rows, k = 6: 0.93 ms a round
  without "kv" against 1.13 with it; docs/serving.md "The one cache and the check")."""
  levers = "qkv" if has_qtensors(params) else "qkv,norm"
  return levers if speculative or (platform or jax.default_backend()) == "cpu" else levers + ",kv"

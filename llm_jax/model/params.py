"""The Decoder's parameter trees: names, flat views, abstract shapes with logical axes, random init.

Every module that names a parameter ('blocks/attn/query/kernel'), flattens a tree for a file, or needs
the shapes of a model without allocating it uses these functions.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.model import levers as levers_lib
from llm_jax.model.config import ModelConfig
from llm_jax.model.quantize import is_qtensor
from llm_jax.model.transformer import Decoder


def path_name(path) -> str:
  """'blocks/attn/query/kernel' for a jax key path (dict keys, attributes or sequence indices)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def flatten(params) -> dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf}; QTensor leaves stay whole."""
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qtensor)[0]
  return {path_name(path): leaf for path, leaf in flat}


def unflatten(flat: dict[str, Any]) -> dict:
  """{'a/b/c': leaf} -> nested dict."""
  root: dict = {}
  for name, leaf in flat.items():
    node = root
    *parents, last = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaf
  return root


_ABSTRACT_LOCK = threading.Lock()  # a second thread asking for the same config waits for the first


@functools.lru_cache(maxsize=16)
def _boxed_abstract(cfg: ModelConfig, seq_len: int = 8):
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return jax.eval_shape(Decoder(cfg).init, jax.random.key(0), tokens)["params"]


def abstract_params(cfg: ModelConfig):
  """(tree of jax.ShapeDtypeStruct, tree of logical PartitionSpecs) of the parameters; allocates nothing.
  Traced once per config in a process (a trace of the model's init: on a 2-core CPU 0.2-0.5 s of
  interpreter time for gpt_small shapes; a server's start asks twice, from two threads)."""
  with _ABSTRACT_LOCK:
    boxed = _boxed_abstract(cfg)
  return nn.unbox(boxed), nn.get_partition_spec(boxed)


def init_params(cfg: ModelConfig, seed: int = 0):
  """Random parameters of the Decoder (benchmarks and tests; not a trained model)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return nn.unbox(jax.jit(Decoder(cfg).init)(jax.random.key(seed), tokens))["params"]


def _shape_table(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qtensor)[0]
  return {
    path_name(p): (tuple(leaf.shape), str(getattr(leaf, "dtype", "int8")))
    for p, leaf in flat
    if hasattr(leaf, "shape")
  }


def shape_differences(saved, wanted, *, dtypes: bool = True) -> list[str]:
  """Lines naming each leaf whose presence, shape (or dtype) differs between two trees of arrays/specs."""
  a, b = _shape_table(saved), _shape_table(wanted)
  lines = []
  for key in sorted(set(a) | set(b)):
    if key not in b:
      lines.append(f"{key}: in the checkpoint {a[key][0]}, absent from the model")
    elif key not in a:
      lines.append(f"{key}: absent from the checkpoint, model wants {b[key][0]}")
    elif a[key][0] != b[key][0] or (dtypes and a[key][1] != b[key][1]):
      lines.append(f"{key}: checkpoint {a[key][0]} {a[key][1]}, model wants {b[key][0]} {b[key][1]}")
  return lines


def count(params) -> int:
  """Number of parameters in a tree (a QTensor counts its int8 values)."""
  leaves = jax.tree.leaves(params, is_leaf=is_qtensor)
  return int(sum(int(np.prod(x.shape)) for x in leaves))


def unstack_layers(params, cfg: ModelConfig, *, levers: str = ""):
  """Scanned parameters ({'blocks': leaves [layers, ...]}) as one subtree per layer ('block_i').

  Returns (params, cfg with scan_layers=False): the same weights for a model whose layers are
  separate modules, so that each layer's matrices are buffers of their own. Decoding reads them in
  place; from the stacked layout XLA copies each layer's slice out again at every step. Works on
  int8 trees too (scales carry the layer axis as well). Unscanned parameters come back unchanged.

  `levers` (e.g. "qkv,norm,kv"): also rearranges the weights for those decode levers
  (model/levers.py) and sets cfg.decode_levers; such parameters are for decoding only.
  """
  if not cfg.scan_layers and not levers:
    return params, cfg
  # One jitted program for the whole rearrangement: op by op, every slice and concatenate of a new
  # shape would compile on its own (~100 programs for a 12-layer model, seconds of a server's start-up).
  # Abstract parameters (jax.ShapeDtypeStruct leaves) give the abstract layout.
  out_cfg = []

  def rearrange(p):
    p, c = _unstack(p, cfg, levers)
    out_cfg.append(c)
    return p

  abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
  out = jax.eval_shape(rearrange, params) if abstract else jax.jit(rearrange)(params)
  return out, out_cfg[0]


def _unstack(params, cfg: ModelConfig, levers: str):
  if cfg.scan_layers:
    params = dict(params)
    blocks = params.pop("blocks")
    for i in range(cfg.num_layers):
      params[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], blocks)
    cfg = dataclasses.replace(cfg, scan_layers=False)
  if levers:
    params, cfg = levers_lib.prepare(params, cfg, levers)
  return params, cfg


def cast_params(params, dtype):
  """Float leaves cast to `dtype` in one jitted call (int8 QTensors and integer leaves unchanged):
  casting leaf by leaf compiles a program for every distinct shape."""
  dt = jnp.dtype(dtype)

  def one(x):
    if is_qtensor(x) or not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dt:
      return x
    return x.astype(dt)

  return jax.jit(lambda p: jax.tree.map(one, p, is_leaf=is_qtensor))(params)


def stack_layers(params, cfg: ModelConfig):
  """The inverse of unstack_layers: per-layer subtrees back to {'blocks': [layers, ...]}."""
  if cfg.decode_levers:
    raise ValueError(f"parameters prepared for decode_levers={cfg.decode_levers!r} do not stack back")
  if cfg.scan_layers:
    return params, cfg
  params = dict(params)
  layers = [params.pop(f"block_{i}") for i in range(cfg.num_layers)]
  params["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return params, dataclasses.replace(cfg, scan_layers=True)

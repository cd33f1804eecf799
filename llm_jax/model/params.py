"""The Decoder's parameter trees: names, flat views, abstract shapes with logical axes, random init.

Every module that names a parameter ('blocks/attn/query/kernel'), flattens a tree for a file, or needs
the shapes of a model without allocating it uses these functions.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def _boxed_abstract(cfg: ModelConfig, seq_len: int = 8):
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return jax.eval_shape(Decoder(cfg).init, jax.random.key(0), tokens)["params"]


def abstract_params(cfg: ModelConfig):
  """(tree of jax.ShapeDtypeStruct, tree of logical PartitionSpecs) of the parameters; allocates nothing."""
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

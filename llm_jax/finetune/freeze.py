"""Frozen parameter groups (embeddings, the first N blocks, name patterns) as optax masks.

Blocks are usually scanned: one array per parameter with a leading layer axis. Freezing "the first N
blocks" therefore freezes rows < N of those arrays. The optimizer is wrapped so that

  1. gradients of frozen rows are zeroed before clipping (they do not count in the global norm),
  2. wholly frozen leaves go through `optax.set_to_zero` (no Adam moments are kept for them),
  3. the final updates of frozen rows are zeroed again (AdamW's weight decay would move them),

so frozen parameters are bit-identical after any number of steps.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, NamedTuple

import flax.core.meta
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm_jax import config as config_lib

EMBEDDING_NAMES = ("embedding", "pos_embedding")
_FROZEN, _TRAIN = "frozen", "train"


@dataclasses.dataclass(frozen=True)
class FreezeSpec:
  """What to freeze: embeddings, the first `blocks` blocks, and parameters matching `patterns`."""

  embeddings: bool = False
  blocks: int = 0
  patterns: tuple[str, ...] = ()

  @property
  def active(self) -> bool:
    return self.embeddings or self.blocks > 0 or bool(self.patterns)


def spec_from_config(config) -> FreezeSpec:
  """FreezeSpec from config.finetune (an empty spec when the section is absent)."""
  f = config.get("finetune") if hasattr(config, "get") else None
  if f is None:
    return FreezeSpec()
  patterns = tuple(p.strip() for p in str(f.get("freeze_patterns", "")).split(",") if p.strip())
  for p in patterns:
    try:
      re.compile(p)
    except re.error as e:
      raise config_lib.ConfigError(f"finetune.freeze_patterns: {p!r} is not a regular expression: {e}") from e
  blocks = int(f.get("freeze_blocks", 0))
  if blocks < 0:
    raise config_lib.ConfigError(f"finetune.freeze_blocks={blocks} must be >= 0")
  return FreezeSpec(embeddings=bool(f.get("freeze_embeddings", False)), blocks=blocks, patterns=patterns)


def path_name(path) -> str:
  """'blocks/attn/query/kernel' for a jax key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _is_box(x) -> bool:
  return isinstance(x, flax.core.meta.AxisMetadata)


def _flat(tree):
  """[(name, leaf)] with flax's partitioning boxes (optimizer.init sees boxed params) as leaves."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)[0]
  return [(path_name(p), x.unbox() if _is_box(x) else x) for p, x in flat]


def _block_index(name: str) -> int | None:
  """Layer index of an unscanned block parameter ('block_3/...'), else None."""
  m = re.match(r"block_(\d+)/", name)
  return int(m.group(1)) if m else None


def leaf_masks(params, spec: FreezeSpec, num_layers: int | None = None) -> dict[str, Any]:
  """{param name: True (trainable) | False (frozen) | bool array [layers] (trainable rows)}.

  Works on arrays, tracers or ShapeDtypeStructs (only names and shapes are read). Raises naming the
  config key when a pattern matches nothing or N exceeds the number of layers.
  """
  flat = _flat(params)
  names = [name for name, _ in flat]
  out: dict[str, Any] = {}
  hits = {p: 0 for p in spec.patterns}
  for name, leaf in flat:
    frozen = spec.embeddings and name in EMBEDDING_NAMES
    for p in spec.patterns:
      if re.search(p, name):
        hits[p] += 1
        frozen = True
    if frozen:
      out[name] = False
      continue
    mask: Any = True
    if spec.blocks:
      if name.startswith("blocks/"):  # scanned: leading layer axis
        layers = leaf.shape[0]
        if spec.blocks > layers:
          raise config_lib.ConfigError(
            f"finetune.freeze_blocks={spec.blocks} exceeds the model's {layers} layers"
          )
        mask = False if spec.blocks == layers else np.arange(layers) >= spec.blocks
      elif _block_index(name) is not None:
        mask = _block_index(name) >= spec.blocks
    out[name] = mask
  if spec.blocks and num_layers is not None and spec.blocks > num_layers:
    raise config_lib.ConfigError(
      f"finetune.freeze_blocks={spec.blocks} exceeds model.num_layers={num_layers}"
    )
  if spec.blocks and not any(n.startswith("blocks/") or _block_index(n) is not None for n in names):
    raise config_lib.ConfigError("finetune.freeze_blocks is set but the model has no block parameters")
  missing = [p for p, n in hits.items() if n == 0]
  if missing:
    raise config_lib.ConfigError(
      f"finetune.freeze_patterns {missing} match no parameter; names look like "
      f"{', '.join(sorted(set(names))[:6])}, ..."
    )
  return out


def _labels(spec: FreezeSpec):
  def fn(params):
    masks = leaf_masks(params, spec)
    return jax.tree_util.tree_map_with_path(
      lambda p, _: _FROZEN if masks[path_name(p)] is False else _TRAIN, params, is_leaf=_is_box
    )

  return fn


class _Empty(NamedTuple):
  pass


def _zero_frozen_rows(spec: FreezeSpec) -> optax.GradientTransformation:
  """Zeroes updates of frozen leaves and frozen layer rows (jnp.where: NaN-safe, exact zeros)."""

  def init(params):
    del params
    return _Empty()

  def update(updates, state, params=None):
    del params
    masks = leaf_masks(updates, spec)

    def apply(path, u):
      m = masks[path_name(path)]
      if m is True:
        return u
      if m is False:
        return jnp.zeros_like(u)
      rows = jnp.asarray(m).reshape((-1,) + (1,) * (u.ndim - 1))
      return jnp.where(rows, u, jnp.zeros_like(u))

    return jax.tree_util.tree_map_with_path(apply, updates), state

  return optax.GradientTransformation(init, update)


def wrap(optimizer: optax.GradientTransformation, config) -> optax.GradientTransformation:
  """The optimizer with config.finetune's frozen groups masked out (unchanged when none are frozen)."""
  spec = spec_from_config(config)
  if not spec.active:
    return optimizer
  logging.info("freezing parameters: %s", spec)
  zero = _zero_frozen_rows(spec)
  inner = optax.multi_transform({_TRAIN: optimizer, _FROZEN: optax.set_to_zero()}, _labels(spec))
  return optax.chain(zero, inner, zero)


def summary(params, config) -> dict[str, int]:
  """{'trainable': n, 'frozen': n} parameter counts under config.finetune's freezing."""
  spec = spec_from_config(config)
  masks = leaf_masks(params, spec)
  trainable = frozen = 0
  for name, leaf in _flat(params):
    size = int(np.prod(leaf.shape))
    m = masks[name]
    if m is True:
      trainable += size
    elif m is False:
      frozen += size
    else:
      per_row = size // len(m)
      trainable += per_row * int(np.sum(m))
      frozen += per_row * int(len(m) - np.sum(m))
  return {"trainable": trainable, "frozen": frozen}

"""LoRA adapters as a transform of the parameter tree: which kernels they adapt and how they merge.

An adapter tree mirrors the names of the kernels it adapts: `adapters["blocks"]["attn"]["query"]
["kernel"] = {"a": A, "b": B}`. A kernel is viewed as a matrix [in, out] (its leading input axes
flattened: one for every kernel except attn/out, which contracts heads and head_dim); A is [in, r] and
B is [r, out], with a leading layer axis when the blocks are scanned. The merged weight is

    W_eff = W + (alpha / r) * A @ B

Training adapters is llm_jax/finetune/lora.py; opening a LoRA run merges them here (llm_jax.artifacts).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import config as config_lib
from llm_jax.model.params import path_name

DEFAULT_TARGETS = r"attn/(query|key|value|out)/kernel,mlp/(gate|up|down)/kernel"
_TWO_INPUT_AXES = ("attn/out/kernel",)  # [heads, head_dim, d_model]: two contracted input axes


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Rank, alpha, dropout and the regular expressions selecting kernels to adapt."""

  rank: int
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = tuple(DEFAULT_TARGETS.split(","))

  @property
  def scale(self) -> float:
    return float(self.alpha) / float(self.rank)


def spec_from_config(config) -> LoraSpec | None:
  """LoraSpec from config.finetune.lora, or None when LoRA is off (rank 0 or no section)."""
  f = config.get("finetune") if hasattr(config, "get") else None
  lo = f.get("lora") if f is not None else None
  if lo is None or int(lo.get("rank", 0)) == 0:
    return None
  rank = int(lo.rank)
  if rank < 0:
    raise config_lib.ConfigError(f"finetune.lora.rank={rank} must be >= 0 (0 disables LoRA)")
  if not 0.0 <= float(lo.dropout) < 1.0:
    raise config_lib.ConfigError(f"finetune.lora.dropout={lo.dropout} must be in [0, 1)")
  targets = tuple(t.strip() for t in str(lo.targets).split(",") if t.strip())
  if not targets:
    raise config_lib.ConfigError("finetune.lora.targets is empty; e.g. " + DEFAULT_TARGETS)
  for t in targets:
    try:
      re.compile(t)
    except re.error as e:
      raise config_lib.ConfigError(f"finetune.lora.targets: {t!r} is not a regular expression: {e}") from e
  return LoraSpec(rank=rank, alpha=float(lo.alpha), dropout=float(lo.dropout), targets=targets)


@dataclasses.dataclass(frozen=True)
class _Target:
  lead: tuple[int, ...]  # layer axis (scanned blocks) or ()
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]

  @property
  def dims(self) -> tuple[int, int]:
    return int(np.prod(self.in_shape)), int(np.prod(self.out_shape))


def _target(name: str, shape: tuple[int, ...]) -> _Target:
  lead = shape[:1] if name.startswith("blocks/") else ()
  rest = shape[len(lead) :]
  k = 2 if any(name.endswith(t) for t in _TWO_INPUT_AXES) else 1
  return _Target(lead=tuple(lead), in_shape=tuple(rest[:k]), out_shape=tuple(rest[k:]))


def find_targets(params, spec: LoraSpec) -> dict[str, _Target]:
  """{kernel name: its matrix view} for every kernel matched by spec.targets; none matched raises."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  kernels = {
    path_name(p): tuple(leaf.shape)
    for p, leaf in flat
    if path_name(p).endswith("kernel") and len(leaf.shape) >= 2
  }
  out, unmatched = {}, []
  for pattern in spec.targets:
    hits = [n for n in kernels if re.search(pattern, n)]
    if not hits:
      unmatched.append(pattern)
    for n in hits:
      out[n] = _target(n, kernels[n])
  if unmatched:
    raise config_lib.ConfigError(
      f"finetune.lora.targets {unmatched} match no kernel; the model's kernels are "
      f"{', '.join(sorted(kernels))}"
    )
  return dict(sorted(out.items()))


def set_leaf(tree: dict, name: str, value) -> None:
  """Sets tree[a][b][c] = value for name "a/b/c", creating dicts on the way."""
  *parents, last = name.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[last] = value


def get_leaf(tree, name: str):
  """tree[a][b][c] for name "a/b/c"."""
  for p in name.split("/"):
    tree = tree[p]
  return tree


def adapter_names(adapters) -> list[str]:
  """Names of the kernels an adapter tree adapts ('blocks/attn/query/kernel', ...)."""
  names = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]:
    name = path_name(path)
    names.add(name.rsplit("/", 1)[0])
  return sorted(names)


def delta(name: str, kernel_shape, a, b, scale: float):
  """(alpha/r) * A @ B in the kernel's own shape."""
  d_BIO = jnp.einsum("...ir,...ro->...io", a, b) * scale
  return d_BIO.reshape(tuple(kernel_shape))


def merge(params, adapters, spec: LoraSpec, rng=None):
  """Base params with W + (alpha/r) A@B at every adapted kernel; `rng` enables adapter dropout."""
  out = jax.tree.map(lambda x: x, params)  # new containers, same leaves
  for i, name in enumerate(adapter_names(adapters)):
    ab = get_leaf(adapters, name)
    w = get_leaf(params, name)
    a = ab["a"]
    if rng is not None and spec.dropout > 0:
      keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - spec.dropout, a.shape[:-1] + (1,))
      a = jnp.where(keep, a / (1.0 - spec.dropout), 0.0)
    d = delta(name, w.shape, a, ab["b"], spec.scale)
    set_leaf(out, name, w + d.astype(w.dtype))
  return out

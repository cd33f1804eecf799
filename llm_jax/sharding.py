"""Mesh from config, logical-axis rules, and the shardings of batches and state."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax import config as config_lib
from llm_jax.model.partitioning import constraint_mesh

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Logical axis -> mesh axes (configs/base.py's sharding.rules; also what places a package's weights).
# Parameters: embed, mlp, heads, kv, vocab, layers. Activations: batch, length, act_*.
DEFAULT_RULES = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("act_embed", None),
  ("act_mlp", "tensor"),
  ("act_heads", "tensor"),
  ("act_kv_heads", "tensor"),
  ("act_vocab", "tensor"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("kv", None),
  ("vocab", "tensor"),
  ("layers", None),
  ("norm", None),
)


def make_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all (or the given) devices, sized by config.sharding."""
  devices = list(jax.devices() if devices is None else devices)
  shape = config_lib.mesh_shape(config, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):  # what mesh_utils raises on odd topologies
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def data_parallel_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with every device on the data axis (fsdp = tensor = 1)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices).reshape(len(devices), 1, 1), MESH_AXES)


def rules(config) -> tuple[tuple[str, Any], ...]:
  """Logical axis -> mesh axes rules as flax expects them (tuples, lists made tuples).

  `config` is a run's config (its sharding.rules) or None for DEFAULT_RULES.
  """
  out = []
  for name, target in DEFAULT_RULES if config is None else config.sharding.rules:
    out.append((name, tuple(target) if isinstance(target, list) else target))
  return tuple(out)


@contextlib.contextmanager
def activate(mesh: Mesh, config):
  """Makes the mesh and the logical rules current (for activation constraints inside the model)."""
  # `with mesh` (not jax.set_mesh): flax's scanned, logically partitioned init relies on it.
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*mesh.*context manager.*", category=DeprecationWarning)
    mesh.__enter__()
  try:
    with nn.logical_axis_rules(rules(config)), constraint_mesh(mesh):
      yield
  finally:
    mesh.__exit__(None, None, None)


def logical_to_sharding(logical_tree, mesh: Mesh, config):
  """Maps a tree of logical PartitionSpecs (from nn.get_partition_spec) to NamedShardings."""
  specs = nn.logical_to_mesh(logical_tree, rules(config))
  return jax.tree.map(
    lambda s: NamedSharding(mesh, _prune(s, mesh)), specs, is_leaf=lambda x: isinstance(x, P)
  )


def _prune(spec: P, mesh: Mesh) -> P:
  """Drops mesh axes of size 1 so specs read simply (P() instead of P(None, 'tensor') on 1 device)."""
  out = []
  for entry in spec:
    if entry is None:
      out.append(None)
      continue
    axes = entry if isinstance(entry, tuple) else (entry,)
    kept = tuple(a for a in axes if mesh.shape[a] > 1)
    out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch rows split over data and fsdp; the rest replicated."""
  return NamedSharding(mesh, _prune(P(BATCH_AXES, *([None] * (ndim - 1))), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_batch_slice(mesh: Mesh) -> tuple[int, int]:
  """(index, count): this process's devices hold row block `index` of `count` equal blocks of a batch.

  (0, 1) on one process. Processes that share batch rows (tensor parallelism across processes, or
  data * fsdp smaller than the process count) get the same block: each must load those rows.
  """
  if jax.process_count() == 1:
    return 0, 1
  shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  held = batch_sharding(mesh, 1).addressable_devices_indices_map((shards,)).values()
  rows = sorted({idx[0].start or 0 for idx in held})
  k = len(rows)
  if rows != list(range(rows[0], rows[0] + k)) or rows[0] % k or shards % k:
    raise ValueError(
      f"process {jax.process_index()} holds batch shards {rows} of {shards}: not one "
      "contiguous block; order the mesh so each process's devices are adjacent"
    )
  return rows[0] // k, shards // k


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of the global batch (block `process_batch_slice`) -> global jax.Arrays."""
  out = {}
  count = process_batch_slice(mesh)[1]
  for k, v in local.items():
    sharding = batch_sharding(mesh, v.ndim)
    if jax.process_count() == 1:
      out[k] = jax.device_put(v, sharding)
    else:
      shape = (v.shape[0] * count,) + v.shape[1:]
      out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
  return out


def spec_table(abstract_state, shardings) -> str:
  """A text table of every parameter: path, shape, PartitionSpec, bytes per device."""
  rows = [("parameter", "shape", "spec", "bytes/device")]
  flat, _ = jax.tree_util.tree_flatten_with_path(abstract_state)
  flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  total = 0
  for (path, leaf), sh in zip(flat, flat_s, strict=True):
    shard_shape = sh.shard_shape(leaf.shape)
    nbytes = int(np.prod(shard_shape)) * leaf.dtype.itemsize
    total += nbytes
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    rows.append((name, str(tuple(leaf.shape)), str(sh.spec), f"{nbytes:,}"))
  rows.append(("total", "", "", f"{total:,}"))
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)

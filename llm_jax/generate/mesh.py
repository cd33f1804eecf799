"""Tensor-parallel decoding: parameters placed on a mesh by their logical axis names, and the context
the decode functions run in."""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.model import Decoder, ModelConfig, constraint_mesh


def shard_params(params, cfg: ModelConfig, mesh, rules):
  """Places float parameters on a mesh by their logical axis names (e.g. tensor-parallel decoding).

  Run the decode functions inside `mesh_context(mesh, rules)`: the model's activation constraints
  then shard the KV cache like the key/value projections (kv heads over `tensor`).
  """
  if cfg.decode_levers:
    raise ValueError(f"decode_levers={cfg.decode_levers!r} are for one device; shard unprepared parameters")
  tokens = jnp.zeros((1, 1), jnp.int32)
  abstract = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), tokens))["params"]
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  return jax.device_put(params, shardings)


def mesh_context(mesh=None, rules=()):
  """The mesh and logical-axis rules made current (a no-op context without a mesh)."""
  if mesh is None:
    return contextlib.nullcontext()
  stack = contextlib.ExitStack()
  stack.enter_context(mesh)
  stack.enter_context(nn.logical_axis_rules(rules))
  stack.enter_context(constraint_mesh(mesh))  # the mesh the model's activation constraints use
  return stack

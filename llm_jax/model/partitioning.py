"""Activation and weight constraints the model places itself: the mesh they bind to (constraint_mesh)
and the FSDP weight gather before each dense matmul. Without a mesh every constraint is a no-op."""

from __future__ import annotations

import contextlib
import contextvars

import flax.linen as nn
import jax

from llm_jax.model.fp8 import fp8_dot_general

_MESH: contextvars.ContextVar = contextvars.ContextVar("llm_jax_constraint_mesh", default=None)


@contextlib.contextmanager
def constraint_mesh(mesh):
  """Binds the model's activation constraints to `mesh` (llm_jax.sharding.activate enters it).

  flax's logical constraints look for a global mesh through jax.sharding.get_abstract_mesh(), which
  `with mesh:` no longer sets (jax >= 0.10), and jax.set_mesh breaks flax's scanned, logically
  partitioned init; so the model passes the mesh to each constraint itself. Without a mesh the
  constraints are no-ops (one device, tests without a mesh).
  """
  token = _MESH.set(mesh)
  try:
    yield
  finally:
    _MESH.reset(token)


def current_mesh():
  """The mesh constraint_mesh bound, or None (one device, tests without a mesh)."""
  return _MESH.get()


def constrain(x, axes):
  """nn.with_logical_constraint under the current logical rules, on the mesh of constraint_mesh."""
  mesh = _MESH.get()
  return x if mesh is None else nn.with_logical_constraint(x, axes, mesh=mesh)


def gathered(axes):
  """The logical axes of a parameter as a matmul uses it: `embed` (what FSDP shards) unsharded."""
  return tuple(None if a == "embed" else a for a in axes)


def gathering_dot(kernel_axes, fp8: bool = False, product=None):
  """A dot_general for flax Dense layers that all-gathers the kernel's `embed` axis first (and with
  `fp8`, multiplies in FP8: llm_jax.model.fp8; `product`, a dot_general of its own, runs instead: e.g.
  llm_jax.model.gelu_kernel's).

  Under FSDP, activations are sharded over the batch and kernels over `embed`, the same mesh axis;
  left to itself, XLA may instead shard the contraction: it regathers the activations to the whole
  batch and all-reduces partial products, so activation memory and traffic grow with the device
  count. Constraining the kernel makes each layer gather its weights for the matmul (ZeRO-3) and
  keeps activations batch-sharded; the backward pass reduce-scatters the kernel's gradient.
  Without a mesh (or with fsdp = 1) the constraint is a no-op.
  """
  want = gathered(kernel_axes)

  def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    rhs = constrain(rhs, want)
    if product is not None:
      return product(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kw)
    if fp8:
      return fp8_dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kw)
    return jax.lax.dot_general(
      lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type, **kw
    )

  return dot_general

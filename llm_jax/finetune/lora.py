"""LoRA: low-rank adapters on attention and MLP projections, without changing the model.

The adapters are their own pytree, mirroring the parameter names of the kernels they adapt:
`adapters["blocks"]["attn"]["query"]["kernel"] = {"a": A, "b": B}`. A kernel is viewed as a matrix
[in, out] (its leading input axes flattened: one for every kernel except attn/out, which contracts
heads and head_dim), A is [in, r] (normal, std 1/sqrt(in)) and B is [r, out] (zeros), with a leading
layer axis when the blocks are scanned. Inside the loss the effective weights are

    W_eff = W + (alpha / r) * A @ B

merged into the (stop-gradient) base parameters before `model.apply`, so only A and B get gradients,
the train state holds only the adapters and their optimizer moments, and checkpoints are adapters-only.
Dropout (finetune.lora.dropout) drops input features of the adapter path, one mask per step and layer
(x * m @ A == x @ (diag(m) A)): the merged form cannot drop per token.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import config as config_lib
from llm_jax import sharding as sharding_lib
from llm_jax.model.lora import LoraSpec, adapter_names, find_targets, merge, set_leaf, spec_from_config
from llm_jax.train import step as step_lib
from llm_jax.train.state import TrainState


def init_adapters(params, spec: LoraSpec, seed: int = 0) -> dict:
  """A (normal, std 1/sqrt(in)) and B (zeros) for every target kernel, float32."""
  adapters: dict = {}
  key = jax.random.key(seed)
  for i, (name, t) in enumerate(find_targets(params, spec).items()):
    d_in, d_out = t.dims
    a = jax.random.normal(jax.random.fold_in(key, i), t.lead + (d_in, spec.rank), jnp.float32)
    b = jnp.zeros(t.lead + (spec.rank, d_out), jnp.float32)
    set_leaf(adapters, name, {"a": a / np.sqrt(d_in), "b": b})
  return adapters


def count(adapters) -> int:
  """Number of adapter parameters."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(adapters)))


# ------------------------------------------------------------------ training


def train_step(state: TrainState, batch, base_params, *, model, optimizer, config):
  """One update of the adapters in `state.params`; `base_params` (the frozen model) gets no gradient."""
  spec = spec_from_config(config)
  if spec is None:
    raise config_lib.ConfigError("lora.train_step needs finetune.lora.rank > 0")

  def params_fn(adapters, rng):
    base = jax.lax.stop_gradient(base_params)
    return merge(base, adapters, spec, rng if spec.dropout > 0 else None)

  return step_lib.train_step(
    state, batch, model=model, optimizer=optimizer, config=config, params_fn=params_fn
  )


def init_state(base_params, optimizer, config, seed: int | None = None) -> TrainState:
  """Fresh adapters and their optimizer state (pure: base_params may be abstract, only shapes are read)."""
  spec = spec_from_config(config)
  if spec is None:
    raise config_lib.ConfigError("LoRA needs finetune.lora.rank > 0")
  seed = int(config.train.seed if seed is None else seed)
  adapters = init_adapters(base_params, spec, seed)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=adapters,
    opt_state=optimizer.init(adapters),
    skipped=jnp.zeros((), jnp.int32),
  )


def state_shardings(base_params, optimizer, mesh, config):
  """(abstract adapter state, its shardings): replicated, adapters are small."""
  abstract = jax.eval_shape(lambda: init_state(_abstract(base_params), optimizer, config))
  return abstract, jax.tree.map(lambda _: sharding_lib.replicated(mesh), abstract)


def create_state(base_params, optimizer, mesh, config, seed: int | None = None):
  """A TrainState whose params are fresh adapters; returns (state, shardings)."""
  spec = spec_from_config(config)
  base = _abstract(base_params)
  find_targets(base, spec)  # fail early, naming the key
  _, shardings = state_shardings(base, optimizer, mesh, config)
  state = jax.jit(lambda: init_state(base, optimizer, config, seed), out_shardings=shardings)()
  logging.info(
    "LoRA: %d adapter parameters on %d kernels (rank %d, alpha %g)",
    count(state.params),
    len(adapter_names(state.params)),
    spec.rank,
    spec.alpha,
  )
  return state, shardings


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)

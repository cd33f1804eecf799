"""The train state and its sharded creation (eval_shape -> shardings -> jit(init, out_shardings))."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llm_jax import sharding as sharding_lib
from llm_jax.model import Decoder


@flax.struct.dataclass
class TrainState:
  """Step counter, float32 parameters, optimizer state, and the count of skipped (non-finite) steps."""

  step: jax.Array
  params: Any
  opt_state: Any
  skipped: jax.Array


def _boxed_init(model: Decoder, optimizer: optax.GradientTransformation, seq_len: int):
  def init(rng):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init(rng, tokens)["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      skipped=jnp.zeros((), jnp.int32),
    )

  return init


def state_shardings(model: Decoder, optimizer, mesh, config, seq_len: int = 8):
  """(abstract unboxed state, NamedShardings of the state) without allocating anything."""
  init = _boxed_init(model, optimizer, seq_len)
  abstract_boxed = jax.eval_shape(init, jax.random.key(0))
  specs = nn.get_partition_spec(abstract_boxed)
  shardings = sharding_lib.logical_to_sharding(specs, mesh, config)
  return nn.unbox(abstract_boxed), shardings


def create_state(model: Decoder, optimizer, mesh, config, seed: int):
  """A freshly initialized TrainState, created directly in its shards; returns (state, shardings)."""
  abstract, shardings = state_shardings(model, optimizer, mesh, config)
  init = _boxed_init(model, optimizer, 8)
  with sharding_lib.activate(mesh, config):
    state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(jax.random.key(seed))
  del abstract
  return state, shardings

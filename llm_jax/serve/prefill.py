"""The jitted functions the engine adds to the decode loop: one prompt prefilled into one slot of
the batch state, and a prompt's own log-probs (for echo with logprobs)."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from llm_jax import generate as G
from llm_jax.model import Decoder, ModelConfig


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=1)
def admit(params, state: G.DecodeState, slot, tokens_1L, lengths_1, seeds_1, max_new_1,
          temperature_1, top_k_1, top_p_1, penalty_1, *, cfg: ModelConfig) -> G.DecodeState:
  """Prefills one prompt and writes it into row `slot` of the batch state (cache row replaced)."""
  row = G._start(params, tokens_1L, lengths_1, seeds_1, max_new_1, temperature_1, top_k_1, top_p_1,
                 penalty_1, cfg)
  cache = jax.tree.map(
      lambda big, one: jax.lax.dynamic_update_slice_in_dim(big, one.astype(big.dtype), slot,
                                                           axis=big.ndim - 4),
      state.cache, row.cache)
  fields = {f.name: getattr(state, f.name).at[slot].set(getattr(row, f.name)[0])
            for f in dataclasses.fields(state) if f.name != "cache"}
  return state.replace(cache=cache, **fields)


@functools.partial(jax.jit, static_argnames=("cfg",))
def prompt_logprobs(params, tokens_1L, *, cfg: ModelConfig):
  """log p(token t | tokens < t) for every prompt position (t >= 1) by one full forward pass."""
  params = G._float_params(params, cfg)
  logits = Decoder(cfg).apply({"params": params}, tokens_1L)[0, :-1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, tokens_1L[0, 1:, None], axis=-1)[:, 0]

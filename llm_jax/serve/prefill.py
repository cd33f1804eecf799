"""The jitted functions the engine adds to the decode loop: one prompt prefilled into one slot of
the batch state, and a prompt's own log-probs and top log-probs (echo with logprobs: scoring)."""
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


@functools.partial(jax.jit, static_argnames=("cfg", "top_n", "vocab_limit"))
def prompt_scores(params, tokens_1L, *, cfg: ModelConfig, top_n: int, vocab_limit: int):
  """Scores of a prompt by one full forward pass, for every position t >= 1: log p(token t | tokens
  < t) [L-1], and the top_n log-probs [L-1, top_n] with their ids. Ids at or past `vocab_limit`
  (padded embedding rows the tokenizer does not have) are excluded, as in decoding. The chosen and the
  top log-probs come from one array, so a greedy token's log-prob equals the best top one exactly."""
  params = G._float_params(params, cfg)
  logits = Decoder(cfg).apply({"params": params}, tokens_1L)[0, :-1].astype(jnp.float32)
  if vocab_limit < cfg.vocab_size:
    logits = jnp.where(jnp.arange(cfg.vocab_size)[None, :] < vocab_limit, logits, -jnp.inf)
  logp = jax.nn.log_softmax(logits, axis=-1)
  chosen = jnp.take_along_axis(logp, tokens_1L[0, 1:, None], axis=-1)[:, 0]
  top_lp, top_ids = jax.lax.top_k(logp, top_n)
  return chosen, top_lp, top_ids

"""The jitted functions the engine adds to the decode loop: one prompt prefilled into one slot of
the batch state, a decode chunk whose outputs come back as one array (one device-to-host copy per
chunk), and a prompt's own log-probs and top log-probs (echo with logprobs: scoring)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import generate as G
from llm_jax.model import Decoder, ModelConfig


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=1)
def admit(
  params,
  state: G.DecodeState,
  slot,
  tokens_1L,
  lengths_1,
  seeds_1,
  max_new_1,
  temperature_1,
  top_k_1,
  top_p_1,
  penalty_1,
  *,
  cfg: ModelConfig,
) -> G.DecodeState:
  """Prefills one prompt and writes it into row `slot` of the batch state (cache row replaced)."""
  row = G._start(
    params, tokens_1L, lengths_1, seeds_1, max_new_1, temperature_1, top_k_1, top_p_1, penalty_1, cfg
  )
  cache = jax.tree.map(
    lambda big, one: jax.lax.dynamic_update_slice_in_dim(big, one.astype(big.dtype), slot, axis=big.ndim - 4),
    state.cache,
    row.cache,
  )
  fields = {
    f.name: getattr(state, f.name).at[slot].set(getattr(row, f.name)[0])
    for f in dataclasses.fields(state)
    if f.name != "cache"
  }
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


@functools.partial(
  jax.jit, static_argnames=("cfg", "steps", "top_n", "vocab_limit", "span"), donate_argnums=1
)
def decode_packed(
  params,
  state: G.DecodeState,
  alive_B,
  want_top,
  *,
  cfg: ModelConfig,
  steps: int,
  top_n: int,
  vocab_limit: int | None,
  span: int,
):
  """`generate.decode_chunk` (the same tokens), its outputs and each row's `active` after the chunk
  packed into one int32 array [B, 3 * steps + 1 + 2 * steps * top_n] (`unpack_chunk` reads it)."""
  state, outs = G.decode_chunk(
    params, state, alive_B, want_top, cfg=cfg, steps=steps, top_n=top_n, vocab_limit=vocab_limit, span=span
  )
  b = alive_B.shape[0]
  flags = outs["emitted"].astype(jnp.int32) | (outs["eos"].astype(jnp.int32) << 1)
  packed = jnp.concatenate(
    [
      outs["token"],
      jax.lax.bitcast_convert_type(outs["logprob"], jnp.int32),
      flags,
      state.active_B[:, None].astype(jnp.int32),
      jax.lax.bitcast_convert_type(outs["top_logprobs"], jnp.int32).reshape(b, -1),
      outs["top_ids"].reshape(b, -1),
    ],
    axis=1,
  )
  return state, packed


def unpack_chunk(packed_BX: np.ndarray, steps: int, top_n: int) -> dict[str, np.ndarray]:
  """The host copy of `decode_packed`'s array as decode_chunk's outputs plus `active` [B]."""
  b, s, t = packed_BX.shape[0], steps, steps * top_n
  return {
    "token": packed_BX[:, :s],
    "logprob": packed_BX[:, s : 2 * s].view(np.float32),
    "emitted": (packed_BX[:, 2 * s : 3 * s] & 1).astype(bool),
    "eos": (packed_BX[:, 2 * s : 3 * s] & 2).astype(bool),
    "active": packed_BX[:, 3 * s].astype(bool),
    "top_logprobs": packed_BX[:, 3 * s + 1 : 3 * s + 1 + t].view(np.float32).reshape(b, s, top_n),
    "top_ids": packed_BX[:, 3 * s + 1 + t :].reshape(b, s, top_n),
  }

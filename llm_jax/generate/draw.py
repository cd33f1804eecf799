"""The per-row decode state and the draw of each row's next token from it (sampling, log-probs,
budgets, EOS), separate from feeding the token to the model (generate/decode.py)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from llm_jax.generate.sampling import chosen_logprob, sample
from llm_jax.model import ModelConfig


@struct.dataclass
class DecodeState:
  """Everything the decode loop carries, one row per sequence (all on device)."""

  cache: Any
  logits_BV: jax.Array  # float32 logits of each row's next token
  positions_B: jax.Array  # int32 position the next token takes
  active_B: jax.Array  # bool
  remaining_B: jax.Array  # int32 new tokens a row may still produce
  seen_BV: jax.Array  # bool: token ids in the prompt or output (repetition penalty)
  keys_B: jax.Array  # one PRNG key per row
  temperature_B: jax.Array
  top_k_B: jax.Array
  top_p_B: jax.Array
  penalty_B: jax.Array
  # A token already drawn but not yet fed (a server draws each prompt's first token when it admits
  # the prompt): the next step feeds next_B instead of drawing, and emits nothing for the row.
  pending_B: jax.Array  # bool
  next_B: jax.Array  # int32


def real_ids(logits_xV, vocab_limit: int | None):
  """The logits with the ids at or past `vocab_limit` (padded embedding rows) at -inf: never chosen."""
  if vocab_limit is None or vocab_limit >= logits_xV.shape[-1]:
    return logits_xV
  return jnp.where(jnp.arange(logits_xV.shape[-1]) < vocab_limit, logits_xV, -jnp.inf)


def draw(
  state: DecodeState,
  cfg: ModelConfig,
  eos_id: int,
  top_n: int,
  vocab_limit: int | None,
  want_top=True,
  greedy: bool = False,
  filtered: bool | None = None,
):
  """Each live row's next token from the carried logits, not fed yet: (the state with the keys
  advanced, the token marked seen, the budget counted and rows that ended inactive; the token per
  row to feed; the step's outputs). A pending row (`pending_B`) keeps its drawn token (`next_B`):
  nothing is drawn, counted or emitted for it. `filtered`: sampling.sample's (static, or None: on
  the device). With top_n > 0 the top_n log-probs are computed while `want_top` is true: a traced
  flag (a conditional in the step) or a Python bool (chosen when traced, no conditional)."""
  state = state.replace(logits_BV=real_ids(state.logits_BV, vocab_limit))
  pending_B = state.pending_B
  live_B = state.active_B & ~pending_B
  if greedy:
    tok_B = jnp.argmax(state.logits_BV, axis=-1).astype(jnp.int32)
    keys_B = state.keys_B
  else:
    keys_B2 = jax.vmap(lambda k: jax.random.split(k, 2))(state.keys_B)
    tok_B = sample(
      state.logits_BV,
      keys_B2[:, 0],
      state.temperature_B,
      state.top_k_B,
      state.top_p_B,
      state.penalty_B,
      state.seen_BV,
      live_B,
      filtered,
    )
    data = jnp.where(  # a pending row's key already advanced when its token was drawn
      pending_B[:, None], jax.random.key_data(state.keys_B), jax.random.key_data(keys_B2[:, 1])
    )
    keys_B = jax.random.wrap_key_data(data, impl=jax.random.key_impl(state.keys_B))
  tok_B = jnp.where(pending_B, state.next_B, tok_B)
  if top_n:
    logp_BV = jax.nn.log_softmax(state.logits_BV, axis=-1)
    lp_B = jnp.take_along_axis(logp_BV, tok_B[:, None], axis=-1)[:, 0]

    def top(x):
      return tuple(jax.lax.top_k(x, top_n))

    def none(x):
      return jnp.zeros((x.shape[0], top_n), x.dtype), jnp.zeros((x.shape[0], top_n), jnp.int32)

    if isinstance(want_top, bool):  # static: the branch chosen here, no conditional in the step
      top_lp_BT, top_ids_BT = (top if want_top else none)(logp_BV)
    else:  # traced: a conditional (on an H200 ~15 us a step, whichever branch it takes)
      top_lp_BT, top_ids_BT = jax.lax.cond(want_top, top, none, logp_BV)
  else:
    lp_B = chosen_logprob(state.logits_BV, tok_B)
    top_lp_BT = jnp.zeros((tok_B.shape[0], 0), jnp.float32)
    top_ids_BT = jnp.zeros((tok_B.shape[0], 0), jnp.int32)
  ended_B = (tok_B == eos_id) | (state.remaining_B <= 1) | (state.positions_B + 1 >= cfg.max_seq_len)
  finished_B = live_B & ended_B
  # the chosen token marked seen: an elementwise compare over [B, V] (fuses into one pass), not a
  # scatter (on an H200 a 32-row scatter into [32, 50304] took ~30 us a step)
  if greedy:
    seen_BV = state.seen_BV
  else:
    hit_BV = jnp.arange(cfg.vocab_size, dtype=jnp.int32)[None, :] == tok_B[:, None]
    seen_BV = state.seen_BV | (hit_BV & live_B[:, None])
  state = state.replace(
    active_B=state.active_B & ~finished_B,
    keys_B=keys_B,
    seen_BV=seen_BV,
    remaining_B=state.remaining_B - live_B.astype(jnp.int32),
  )
  outs = dict(
    token=tok_B,
    logprob=lp_B,
    emitted=live_B & (tok_B != eos_id),
    eos=live_B & (tok_B == eos_id),
    top_logprobs=top_lp_BT,
    top_ids=top_ids_BT,
  )
  return state, tok_B, outs

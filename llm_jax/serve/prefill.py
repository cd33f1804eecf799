"""The functions the engine adds to the decode loop (unjitted: `serve.programs` traces, exports and
compiles them for fixed shapes): prompts prefilled into chosen rows of the batch state, a row moved
to another row, a decode chunk over the first rows of the state whose outputs come back as one array
(one device-to-host copy per chunk), and a prompt's own log-probs and top log-probs (echo with
logprobs: scoring)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import generate as G
from llm_jax.model import ModelConfig

# The columns before the prompt's tokens in an admission's one int32 array (`pack_admission`) and
# their types: the row each prompt goes to, the position its tokens start at (0 but for a piece of a
# long prompt: admit_rows' `extend`), their count, then generate.sampling_arrays' values in their
# order (uint32 and float32 values bit for bit).
ADMIT_COLUMNS = {
  "row": jnp.int32,
  "offset": jnp.int32,
  "length": jnp.int32,
  "seeds_B": jnp.uint32,
  "max_new_B": jnp.int32,
  "temperature_B": jnp.float32,
  "top_k_B": jnp.int32,
  "top_p_B": jnp.float32,
  "penalty_B": jnp.float32,
}


def pack_admission(rows_P, tokens_PW, lengths_P, arrays: dict, offsets_P=None) -> np.ndarray:
  """An admission's host arrays as the one int32 array [P, len(ADMIT_COLUMNS) + W] `admit_rows`
  takes: one host-to-device copy per call instead of ten (on an H200 nine small copies were ~0.4 ms
  of a lone request's first token; docs/serving.md, round nine). `offsets_P`: 0 when not given."""
  offsets_P = np.zeros(len(rows_P), np.int32) if offsets_P is None else offsets_P
  values = {"row": rows_P, "offset": offsets_P, "length": lengths_P, **arrays}
  columns = [np.ascontiguousarray(values[k], dtype).view(np.int32) for k, dtype in ADMIT_COLUMNS.items()]
  return np.concatenate([np.stack(columns, axis=1), np.asarray(tokens_PW, np.int32)], axis=1)


def unpack_admission(packed_PX) -> list:
  """`pack_admission`'s array (traced) as its columns in ADMIT_COLUMNS' order and types, then the
  tokens [P, W]."""
  columns = [
    jax.lax.bitcast_convert_type(packed_PX[:, i], dtype) for i, dtype in enumerate(ADMIT_COLUMNS.values())
  ]
  return [*columns, packed_PX[:, len(ADMIT_COLUMNS) :]]


def admit_rows(
  params,
  state: G.DecodeState,
  packed_PX,
  *,
  cfg: ModelConfig,
  top_n: int,
  vocab_limit: int | None,
  eos_id: int = G.EOS_ID,
):
  """Prefills P prompts (one batched call), draws each one's first token from the prefill's logits
  (as the first decode step would, so the same tokens for a seed; the row's next step feeds it:
  `pending_B`) and writes prompt p into row rows_P[p] of the batch state (its cache row replaced);
  a row index past the state's rows (padding) is dropped. `packed_PX` holds each prompt's row,
  length and sampling values, then its tokens padded to W (`pack_admission`). Returns the state and
  the first tokens' outputs packed as `decode_rows` packs a chunk of one step: a request's first
  token needs no decode chunk, and the call runs no extra forward pass (nor compiles one).

  The draw filters (top-k/top-p: a row without them keeps every token, so it draws what the plain
  draw would) and computes the top log-probs for every prompt, whatever the rows ask: a conditional
  would make the host wait for the prefill to choose a branch (on a GPU the call then returns only
  when the prefill is done, and the decode chunk behind it is dispatched that much later), while a
  sort and a top-k of P rows cost once per request what a conditional costs."""
  rows_P, _, lengths_P, *sampling, tokens_PW = unpack_admission(packed_PX)
  new = G._start(params, tokens_PW, lengths_P, *sampling, cfg)
  return _place(state, new, rows_P, tokens_PW.shape[1], cfg, eos_id, top_n, vocab_limit)


def extend_rows(
  params,
  state: G.DecodeState,
  cache,
  packed_PX,
  *,
  cfg: ModelConfig,
  top_n: int,
  vocab_limit: int | None,
  eos_id: int = G.EOS_ID,
):
  """`admit_rows` for pieces of long prompts: piece p is written from its "offset" column onto
  `cache` (row p: the rows' caches so far, [.., P, K, S, H] per leaf), its repetition record joined
  to the row's when the offset is past 0, and the rows' whole caches replace rows_P's in the state.
  A piece before the last is sent with max_new_B 0: its row stays inactive and its draw is not used.
  Returns the state, the new `cache` and the first tokens' outputs. The caller keeps the rows'
  caches between pieces (the engine, one row's): read from the donated batch cache, XLA copied all
  of it twice per piece (the one-array layout; docs/serving.md, round thirteen)."""
  rows_P, offsets_P, lengths_P, *sampling, tokens_PW = unpack_admission(packed_PX)
  seen_PV = jnp.take(state.seen_BV, rows_P, axis=0, mode="clip") & (offsets_P > 0)[:, None]
  new = G._start(
    params, tokens_PW, lengths_P, *sampling, cfg, cache=cache, offsets_B=offsets_P, seen_BV=seen_PV
  )
  state, first = _place(state, new, rows_P, 0, cfg, eos_id, top_n, vocab_limit)
  return state, new.cache, first


def _place(state: G.DecodeState, new: G.DecodeState, rows_P, reach: int, cfg, *draw):
  """`new`'s rows (prefilled) with their first tokens drawn, written into rows rows_P of `state`
  (past its rows: nowhere). `reach`: the cache positions a fresh prefill wrote (only those are
  written: attention masks the rest); 0: the whole cache rows. Returns the state and the packed
  outputs of the draw (a chunk of one step). `draw`: eos_id, top_n, vocab_limit (`generate.draw`)."""
  new, token_P, out = G.draw(new, cfg, *draw, want_top=True, filtered=True)
  new = new.replace(pending_B=new.active_B, next_B=token_P)

  def put(big, one):
    axis = G.row_axis(big)
    index = (slice(None),) * axis + (rows_P,)
    if big.ndim >= 4 and reach:  # a fresh cache [.., P, K, S, H]: only the written positions
      one = jax.lax.slice_in_dim(one, 0, reach, axis=one.ndim - 2)
      index += (slice(None), slice(0, reach))
    return big.at[index].set(one.astype(big.dtype), mode="drop")

  outs = {k: v[:, None] for k, v in out.items()}  # [P, 1, ...]: a chunk of one step
  return jax.tree.map(put, state, new), pack_outputs(outs, new.active_B)


def move_row(state: G.DecodeState, src, dst) -> G.DecodeState:
  """The state with row `src` copied onto row `dst` (cache, logits, keys, sampling values)."""

  def move(x):
    axis = G.row_axis(x)
    row = jax.lax.dynamic_slice_in_dim(x, src, 1, axis=axis)
    return jax.lax.dynamic_update_slice_in_dim(x, row, dst, axis=axis)

  return jax.tree.map(move, state)


def decode_rows(
  params,
  state: G.DecodeState,
  alive_R,
  want_top,
  *,
  cfg: ModelConfig,
  steps: int,
  top_n: int,
  vocab_limit: int | None,
  span: int,
  eos_id: int = G.EOS_ID,
  filtered: bool = True,
  unroll: int = 1,
):
  """`generate.decode_chunk` over the first R = len(alive_R) rows of the state (the busy rows are
  kept there): a call costs what a batch of R rows does, whatever the state's size. Returns the
  state and the chunk's outputs and each row's `active` after it packed into one int32 array
  [R, 3 * steps + 1 + 2 * steps * top_n] (`unpack_chunk` reads it).

  With R below the state's rows, rows [0, R) and cache positions [0, span) are taken out, decoded
  and written back in place (the model then attends to the whole taken part); with R = all rows the
  state is decoded as it is (the model reads the first `span` positions of each layer's cache).
  `filtered=False` when no live row samples with top-k/top-p (no sort: generate.sample);
  `want_top` as in generate.draw (the engine's programs pass a Python True with top_n > 0, or top_n
  0: no conditional in the step either way)."""
  r, b = alive_R.shape[0], state.positions_B.shape[0]
  if r == b:
    sub = state
  else:

    def take(x):
      x = jax.lax.slice_in_dim(x, 0, r, axis=G.row_axis(x))
      if x.ndim >= 4 and span:  # cache [.., R, K, S, H]: the positions this chunk can reach
        x = jax.lax.slice_in_dim(x, 0, span, axis=x.ndim - 2)
      return x

    sub = jax.tree.map(take, state)
  sub, outs = G.decode_chunk(
    params,
    sub,
    alive_R,
    want_top,
    cfg=cfg,
    steps=steps,
    eos_id=eos_id,
    top_n=top_n,
    vocab_limit=vocab_limit,
    span=span,
    filtered=filtered,
    unroll=unroll,
  )
  if r == b:
    state = sub
  else:
    state = jax.tree.map(
      lambda big, part: jax.lax.dynamic_update_slice(big, part, (0,) * big.ndim), state, sub
    )
  return state, pack_outputs(outs, sub.active_B)


def decode_then_extend(params, state: G.DecodeState, cache, alive_R, packed_1X, *, admit: dict, **decode):
  """A decode chunk over the first R rows (`decode_rows(**decode)`, whole cache), then one piece of
  a long prompt (`extend_rows(**admit)` onto `cache`, the row's cache so far) in the same call: a
  long prompt's prefill shares its calls with the rows decoding. The piece's row is not alive in the
  chunk; what its idle steps write there the piece's whole row replaces. Returns the state, the row's
  new cache, the chunk's packed outputs and the piece's (its first token when it is the last)."""
  state, chunk = decode_rows(params, state, alive_R, True, span=0, **decode)
  state, cache, first = extend_rows(params, state, cache, packed_1X, **admit)
  return state, cache, chunk, first


def pack_outputs(outs: dict, active_B):
  """A chunk's outputs ([B, steps] and [B, steps, top_n]) and each row's `active` after it, packed
  into one int32 array [B, 3 * steps + 1 + 2 * steps * top_n] (`unpack_chunk` reads it)."""
  b = active_B.shape[0]
  flags = outs["emitted"].astype(jnp.int32) | (outs["eos"].astype(jnp.int32) << 1)
  return jnp.concatenate(
    [
      outs["token"],
      jax.lax.bitcast_convert_type(outs["logprob"], jnp.int32),
      flags,
      active_B[:, None].astype(jnp.int32),
      jax.lax.bitcast_convert_type(outs["top_logprobs"], jnp.int32).reshape(b, -1),
      outs["top_ids"].reshape(b, -1),
    ],
    axis=1,
  )


@functools.partial(jax.jit, static_argnames=("cfg", "top_n", "vocab_limit"))
def prompt_scores(params, tokens_1L, *, cfg: ModelConfig, top_n: int, vocab_limit: int):
  """Scores of a prompt by one forward pass, for every position t >= 1: log p(token t | tokens < t)
  [L-1], and the top_n log-probs [L-1, top_n] with their ids. Ids at or past `vocab_limit` (padded
  embedding rows the tokenizer does not have) are excluded, as in decoding. The chosen and the top
  log-probs come from one array, so a greedy token's log-prob equals the best top one exactly.

  The pass is the decode model's over the whole prompt (`generate.prompt_logits`): it reads the
  engine's own parameters, in the decode levers' layout when `cfg.decode_levers` is set."""
  logits = G.prompt_logits(params, tokens_1L, cfg)[0, :-1]
  if vocab_limit < cfg.vocab_size:
    logits = jnp.where(jnp.arange(cfg.vocab_size)[None, :] < vocab_limit, logits, -jnp.inf)
  logp = jax.nn.log_softmax(logits, axis=-1)
  chosen = jnp.take_along_axis(logp, tokens_1L[0, 1:, None], axis=-1)[:, 0]
  top_lp, top_ids = jax.lax.top_k(logp, top_n)
  return chosen, top_lp, top_ids


def unpack_chunk(packed_BX: np.ndarray, steps: int) -> dict[str, np.ndarray]:
  """The host copy of `decode_rows`'s packed array as decode_chunk's outputs plus `active` [R]
  (top_n, the top log-probs per step, read from the array's width: 0 for a program without them)."""
  b, s = packed_BX.shape[0], steps
  top_n, rest = divmod(packed_BX.shape[1] - 3 * s - 1, 2 * s)
  if rest or top_n < 0:
    raise ValueError(f"a packed chunk of {packed_BX.shape[1]} columns is not one of {steps} steps")
  t = steps * top_n
  return {
    "token": packed_BX[:, :s],
    "logprob": packed_BX[:, s : 2 * s].view(np.float32),
    "emitted": (packed_BX[:, 2 * s : 3 * s] & 1).astype(bool),
    "eos": (packed_BX[:, 2 * s : 3 * s] & 2).astype(bool),
    "active": packed_BX[:, 3 * s].astype(bool),
    "top_logprobs": packed_BX[:, 3 * s + 1 : 3 * s + 1 + t].view(np.float32).reshape(b, s, top_n),
    "top_ids": packed_BX[:, 3 * s + 1 + t :].reshape(b, s, top_n),
  }

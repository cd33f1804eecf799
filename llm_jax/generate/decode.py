"""Decoding: prefill, one decode step, and the jitted start / decode_chunk / decode_loop over a
preallocated KV cache (the per-row state and the draw of each row's token: generate/draw.py).

Conventions: the token sampled at step i of a row sits at position len(prompt) + i; a row stops at
EOS (not emitted), after its max new tokens, or when its next position would pass max_seq_len.
Log-probabilities are of the model's own distribution (before penalty, temperature and filters).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.generate.draw import DecodeState, draw
from llm_jax.model import Decoder, ModelConfig, quantize
from llm_jax.model import levers as levers_lib

EOS_ID = 2
PAD_ID = 0
MIN_PREFILL = 8
MIN_SPAN = 128  # the shortest cache span decode attends over (spans are powers of two)
# A single sequence is decoded as a batch of two (the second row idle): XLA rewrites [1, D] x [D, F]
# products as multiply + reduce, which on GPUs is slower than the [2, D] gemm (docs/serving.md).
MIN_ROWS = 2


def _model(cfg: ModelConfig, span: int = 0) -> Decoder:
  return Decoder(cfg, decode=True, decode_span=span)


def decode_span(last_position: int, cfg: ModelConfig) -> int:
  """The cache span (a power of two, at least MIN_SPAN, 0 for the whole cache) that covers every
  position up to `last_position`: decode then reads only that part of the KV cache."""
  span = bucket(last_position + 1, cfg.max_seq_len, minimum=min(MIN_SPAN, cfg.max_seq_len))
  return 0 if span >= cfg.max_seq_len else span


def _float_params(params, cfg: ModelConfig):
  return quantize.dequantize(params, jnp.dtype(cfg.dtype))


def empty_state(cfg: ModelConfig, batch: int, params=None) -> DecodeState:
  """A DecodeState of `batch` idle rows, made without compiling the model (for serving slots).
  `params`: the model's parameters or their shapes (jax.ShapeDtypeStruct leaves), laid out for `cfg`;
  None: traced from `cfg` (one more trace of the model's init)."""
  ints = np.zeros((batch,), np.int32)
  shapes = jax.eval_shape(
    functools.partial(_start, cfg=cfg),
    _abstract_params(cfg) if params is None else params,
    np.zeros((batch, MIN_PREFILL), np.int32),
    np.ones((batch,), np.int32),
    ints.astype(np.uint32),
    ints,
    ints.astype(np.float32),
    ints,
    np.ones((batch,), np.float32),
    np.ones((batch,), np.float32),
  )

  def zeros(s):
    if jnp.issubdtype(s.dtype, jax.dtypes.prng_key):
      return jax.vmap(jax.random.key)(jnp.zeros(s.shape, jnp.uint32))
    return jnp.zeros(s.shape, s.dtype)

  return jax.tree.map(zeros, shapes)


def _abstract_params(cfg: ModelConfig):
  tokens = jnp.zeros((1, 1), jnp.int32)
  base = dataclasses.replace(cfg, decode_levers="")
  abstract = nn.unbox(jax.eval_shape(lambda: Decoder(base).init(jax.random.key(0), tokens))["params"])
  if cfg.decode_levers:  # the layout the levers read (model/levers.py)
    abstract = jax.eval_shape(lambda p: levers_lib.prepare(p, base, cfg.decode_levers)[0], abstract)
  return abstract


def empty_cache(cfg: ModelConfig, batch: int):
  """A zero KV cache for `batch` rows (collection 'cache' of the decode model)."""
  model = _model(cfg)
  tokens = jnp.zeros((batch, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, tokens))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _prompt_hidden(params, tokens_BL, cfg: ModelConfig, cache=None, offsets_B=None, span: int = 0):
  """(the cache with the prompts written, final hidden states [B, L, D]) by the decode model: into a
  fresh cache from position 0, or into `cache` from each row's position offsets_B[b], attending to
  the row's cache positions before it (a long prompt prefilled in pieces; `span`: to the first
  `span` positions only, as decode steps do: `decode_span`)."""
  b, width = tokens_BL.shape
  positions_BL = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (b, width))
  if cache is None:
    model, cache = _model(cfg, span=width), empty_cache(cfg, b)  # positions below the padded width
  else:
    model, positions_BL = _model(cfg, span), positions_BL + offsets_B[:, None]
  h_BLD, variables = model.apply(
    {"params": params, "cache": cache},
    tokens_BL,
    positions_BL,
    method="hidden",
    mutable=["cache"],
  )
  return variables["cache"], h_BLD


def _prefill(params, tokens_BL, lengths_B, cfg: ModelConfig, cache=None, offsets_B=None):
  """Writes the prompts into a fresh cache (or `cache` from offsets_B: _prompt_hidden); returns
  (cache, float32 logits after each prompt's last token)."""
  cache, h_BLD = _prompt_hidden(params, tokens_BL, cfg, cache, offsets_B)
  last_B11 = (lengths_B - 1)[:, None, None]
  h_B1D = jnp.take_along_axis(h_BLD, last_B11, axis=1)
  logits_BV = _model(cfg).apply({"params": params}, h_B1D, method="logits")[:, 0]
  return cache, logits_BV


@functools.partial(jax.jit, static_argnames="cfg")
def prompt_logits(params, tokens_BL, cfg: ModelConfig):
  """Float32 logits [B, L, V] at every position of right-padded prompts, by the decode model (one
  compiled program per config and shape: pad prompts to a few widths when calling it for many).

  The same parameters decoding reads (per-layer, decode levers included: `cfg.decode_levers`), so a
  server scores prompts without a second copy of the weights in the full-sequence layout; equal to
  the full-sequence model's logits within float rounding."""
  params = _float_params(params, cfg)
  _, h_BLD = _prompt_hidden(params, tokens_BL, cfg)
  return _model(cfg).apply({"params": params}, h_BLD, method="logits")


def _forward_one(params, cache, tokens_B, positions_B, cfg: ModelConfig, span: int = 0):
  logits_B1V, variables = _model(cfg, span).apply(
    {"params": params, "cache": cache}, tokens_B[:, None], positions_B[:, None], mutable=["cache"]
  )
  return variables["cache"], logits_B1V[:, 0]


def _start(
  params,
  tokens_BL,
  lengths_B,
  seeds_B,
  max_new_B,
  temperature_B,
  top_k_B,
  top_p_B,
  penalty_B,
  cfg: ModelConfig,
  *,
  cache=None,
  offsets_B=None,
  seen_BV=None,
) -> DecodeState:
  """Prefill plus the per-row decode state. With `cache`, the tokens are a piece of each row's
  prompt written from position offsets_B onto the cache's earlier positions, and `seen_BV` the
  tokens of the pieces before it (the repetition penalty's record)."""
  params = _float_params(params, cfg)
  cache, logits_BV = _prefill(params, tokens_BL, lengths_B, cfg, cache, offsets_B)
  b, width = tokens_BL.shape
  in_prompt_BL = jnp.arange(width)[None, :] < lengths_B[:, None]
  seen = jnp.zeros((b, cfg.vocab_size), bool) if seen_BV is None else seen_BV
  seen_BV = seen.at[jnp.arange(b)[:, None], tokens_BL].max(in_prompt_BL)
  end_B = lengths_B if offsets_B is None else offsets_B + lengths_B
  room_B = cfg.max_seq_len - end_B
  return DecodeState(
    cache=cache,
    logits_BV=logits_BV,
    positions_B=end_B.astype(jnp.int32),
    active_B=(max_new_B > 0) & (room_B > 0),
    remaining_B=jnp.minimum(max_new_B, room_B),
    seen_BV=seen_BV,
    keys_B=jax.vmap(jax.random.key)(seeds_B),
    temperature_B=temperature_B.astype(jnp.float32),
    top_k_B=top_k_B.astype(jnp.int32),
    top_p_B=top_p_B.astype(jnp.float32),
    penalty_B=penalty_B.astype(jnp.float32),
    pending_B=jnp.zeros((b,), bool),
    next_B=jnp.zeros((b,), jnp.int32),
  )


def _step(
  params,
  state: DecodeState,
  cfg: ModelConfig,
  eos_id: int,
  top_n: int,
  vocab_limit: int | None,
  want_top=True,
  greedy: bool = False,
  span: int = 0,
  filtered: bool | None = None,
):
  """Samples one token per row from the carried logits (a pending row's token is the one drawn
  before), then feeds it to get the next logits.

  `greedy` (static) is the argmax-only step for batches whose every row is greedy without a
  repetition penalty: no random keys, no branch, no record of seen tokens. `filtered` (static): some
  row samples with top-k/top-p (`any_filtered`; sampling.sample).
  """
  state, tok_B, outs = draw(state, cfg, eos_id, top_n, vocab_limit, want_top, greedy, filtered)
  cache, logits_BV = _forward_one(params, state.cache, tok_B, state.positions_B, cfg, span)
  still_B = state.active_B
  state = state.replace(
    cache=cache,
    logits_BV=logits_BV,
    positions_B=jnp.where(still_B, state.positions_B + 1, state.positions_B),
    pending_B=jnp.zeros_like(state.pending_B),
  )
  return state, outs


def _empty_outputs(b: int, steps: int, top_n: int) -> dict:
  """The [B, steps] output buffers the decode loops fill one column per step."""
  return dict(
    token=jnp.zeros((b, steps), jnp.int32),
    logprob=jnp.zeros((b, steps), jnp.float32),
    emitted=jnp.zeros((b, steps), bool),
    eos=jnp.zeros((b, steps), bool),
    top_logprobs=jnp.zeros((b, steps, top_n), jnp.float32),
    top_ids=jnp.zeros((b, steps, top_n), jnp.int32),
  )


@functools.partial(jax.jit, static_argnames=("cfg",))
def start(
  params,
  tokens_BL,
  lengths_B,
  seeds_B,
  max_new_B,
  temperature_B,
  top_k_B,
  top_p_B,
  penalty_B,
  *,
  cfg: ModelConfig,
) -> DecodeState:
  """Jitted prefill of a right-padded batch of prompts into a fresh DecodeState."""
  return _start(
    params, tokens_BL, lengths_B, seeds_B, max_new_B, temperature_B, top_k_B, top_p_B, penalty_B, cfg
  )


@functools.partial(
  jax.jit,
  static_argnames=("cfg", "steps", "eos_id", "top_n", "vocab_limit", "greedy", "span", "filtered", "unroll"),
  donate_argnums=1,
)
def decode_chunk(
  params,
  state: DecodeState,
  alive_B,
  want_top=True,
  *,
  cfg: ModelConfig,
  steps: int,
  eos_id: int = EOS_ID,
  top_n: int = 0,
  vocab_limit: int | None = None,
  greedy: bool = False,
  span: int = 0,
  filtered: bool = True,
  unroll: int = 1,
):
  """`steps` decode steps (fori_loop); rows with alive_B False stop first. Outputs are [B, steps].

  With top_n > 0, the top_n log-probs per step are computed only while `want_top` is true (traced: a
  conditional in every step; a Python bool: none, `generate.draw`).
  `greedy=True` only when every live row is greedy without a repetition penalty (`all_greedy`).
  `span` (0 = whole cache): every live row's positions in these steps are below it (`decode_span`).
  `filtered=False` only when no live row samples with top-k/top-p (`any_filtered`): no sort.
  `unroll`: the loop's unroll factor (bench/chunk_probe.py; on an H200, 4 was slower at 2 rows and
  compiled 3x longer, 16 compiled 10x longer: the server keeps 1).
  """
  params = _float_params(params, cfg)
  state = state.replace(active_B=state.active_B & alive_B)
  b = alive_B.shape[0]
  outs = _empty_outputs(b, steps, top_n)

  def body(i, carry):
    st, acc = carry
    st, out = _step(params, st, cfg, eos_id, top_n, vocab_limit, want_top, greedy, span, filtered)
    acc = {k: acc[k].at[:, i].set(out[k]) for k in acc}
    return st, acc

  return jax.lax.fori_loop(0, steps, body, (state, outs), unroll=unroll)


@functools.partial(
  jax.jit,
  static_argnames=("cfg", "max_steps", "eos_id", "top_n", "vocab_limit", "greedy", "span", "filtered"),
)
def decode_loop(
  params,
  state: DecodeState,
  *,
  cfg: ModelConfig,
  max_steps: int,
  eos_id: int = EOS_ID,
  top_n: int = 0,
  vocab_limit: int | None = None,
  greedy: bool = False,
  span: int = 0,
  filtered: bool = True,
):
  """Decodes until every row is done or `max_steps` (lax.while_loop); outputs are [B, max_steps].

  `greedy=True` only when every row is greedy without a repetition penalty (`all_greedy`).
  `span` (0 = whole cache): every row's positions stay below it (`decode_span`).
  `filtered=False` only when no row samples with top-k/top-p (`any_filtered`): no sort.
  """
  params = _float_params(params, cfg)
  b = state.positions_B.shape[0]
  outs = _empty_outputs(b, max_steps, top_n)

  def cond(carry):
    i, st, _ = carry
    return (i < max_steps) & jnp.any(st.active_B)

  def body(carry):
    i, st, acc = carry
    st, out = _step(params, st, cfg, eos_id, top_n, vocab_limit, greedy=greedy, span=span, filtered=filtered)
    return i + 1, st, {k: acc[k].at[:, i].set(out[k]) for k in acc}

  _, state, outs = jax.lax.while_loop(cond, body, (jnp.int32(0), state, outs))
  return state, outs


def row_axis(x) -> int:
  """The batch-row axis of a decode state's leaf: 0, or ndim - 4 for a KV cache [.., B, K, S, H]."""
  return x.ndim - 4 if x.ndim >= 4 else 0


def bucket(n: int, cap: int, minimum: int = MIN_PREFILL) -> int:
  """Next power of two >= n (at least `minimum`, at most `cap`): few shapes, few compiles."""
  b = minimum
  while b < n:
    b *= 2
  return max(n, min(b, cap))

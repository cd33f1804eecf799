"""The compiled side of speculative decoding (generate/speculative.py is the host side): `begin`
prefills both models and draws the first token, `advance` runs rounds (k draft proposals, one target
pass over the k + 1 positions, the check) on device until the rows are done or a stop, and `refill`
starts new prompts in rows that finished. The state is a dict of arrays with the rows first (the KV
caches: `decode.row_axis`), `Plan` the static settings each program is compiled for."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from llm_jax.generate.decode import (
  EOS_ID,
  _float_params,
  _forward_one,
  _model,
  _prefill,
  _prompt_hidden,
  row_axis,
)
from llm_jax.generate.draw import real_ids
from llm_jax.generate.sampling import tempered
from llm_jax.model import ModelConfig


def _greedy(logits_xV, vocab_limit: int | None):
  """The argmax over ids below `vocab_limit` (padded embedding rows are never chosen)."""
  return jnp.argmax(real_ids(logits_xV, vocab_limit), axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What shapes the compiled rounds (static): the two models (draft_cfg None: prompt lookup), k
  draft tokens a round, the new tokens at most, the end-of-sequence id, the ids below `vocab_limit`
  (None: all), the cache positions the target's and the draft's rounds attend to (`decode_span` of
  the last position a round can write; 0: the whole cache), the lookup's longest match and the
  sampling settings."""

  cfg: ModelConfig
  draft_cfg: ModelConfig | None
  k: int
  max_new: int
  eos_id: int = EOS_ID
  vocab_limit: int | None = None
  spans: tuple[int, int] = (0, 0)
  ngram: int = 3  # without a draft model: the longest suffix prompt lookup matches
  sampling: tuple[float, int, float] | None = None  # (temperature, top_k, top_p); None: greedy


def _probs(logits_xV, plan: Plan):
  """The distribution a sampled round draws from (float32): real ids, tempered, top-k/top-p kept."""
  temperature, top_k, top_p = plan.sampling
  flat_NV = real_ids(logits_xV.astype(jnp.float32), plan.vocab_limit).reshape(-1, logits_xV.shape[-1])
  n = flat_NV.shape[0]
  settings = (jnp.full((n,), temperature), jnp.full((n,), top_k), jnp.full((n,), top_p))
  x_NV = tempered(flat_NV, *settings, filtered=top_k > 0 or top_p < 1)
  return jax.nn.softmax(x_NV, axis=-1).reshape(logits_xV.shape)


def _draw(keys_B, probs_BV):
  return jax.vmap(jax.random.categorical)(keys_B, jnp.log(probs_BV)).astype(jnp.int32)


def _keys(keys_B, salt):
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, salt)


def _check(p_BK1V, q_BKV, props_BK, keys_B, k: int):
  """Sampled verification (speculative sampling): proposal j is kept with probability
  min(1, p_j(x_j) / q_j(x_j)) while all before it were; at the first one refused the token is drawn
  from max(p - q, 0) renormalized, after k kept ones from p_k. The tokens are then distributed as
  draws from the target's p alone. Returns (proposals kept [B], the token after them [B])."""
  b = props_BK.shape[0]
  px_BK = jnp.take_along_axis(p_BK1V[:, :k], props_BK[..., None], axis=-1)[..., 0]
  qx_BK = jnp.take_along_axis(q_BKV, props_BK[..., None], axis=-1)[..., 0]
  u_BK = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(_keys(keys_B, 1))
  n_B = jnp.sum(jnp.cumprod(u_BK * qx_BK < px_BK, axis=1), axis=1)
  p_BV = p_BK1V[jnp.arange(b), n_B]
  q_BV = jnp.where((n_B < k)[:, None], q_BKV[jnp.arange(b), jnp.minimum(n_B, k - 1)], 0.0)
  rest_BV = jnp.maximum(p_BV - q_BV, 0.0)
  rest_BV = jnp.where(jnp.sum(rest_BV, axis=-1, keepdims=True) > 0, rest_BV, p_BV)
  return n_B, _draw(_keys(keys_B, 2), rest_BV / jnp.sum(rest_BV, axis=-1, keepdims=True))


def _lookup(hist_BS, pos_B, ngram: int, k: int):
  """k proposals a row by prompt lookup over its tokens hist_BS[:, :pos_B + 1]: the tokens after the
  latest earlier occurrence of its last n tokens (n = ngram down to 1, the longest that occurs),
  repeated with the occurrence's period where they would run past the row's position (a match d
  tokens back predicts the tokens d back); no occurrence: the last token k times."""
  b, s = hist_BS.shape
  rows_B, q_S, j_K = jnp.arange(b), jnp.arange(s), jnp.arange(k)
  props_BK = jnp.broadcast_to(hist_BS[rows_B, pos_B][:, None], (b, k))
  for n in range(1, ngram + 1):  # a longer match overrides a shorter one
    start_B = pos_B - n + 1  # where the row's last n tokens begin
    match_BS = q_S[None] < start_B[:, None]  # occurrences that begin before them
    for j in range(n):  # hist[q + j] == hist[start + j]; q + j stays below pos, so no wrap-around
      match_BS &= jnp.roll(hist_BS, -j, axis=1) == hist_BS[rows_B, jnp.maximum(start_B + j, 0)][:, None]
    q_B = jnp.max(jnp.where(match_BS, q_S[None], -1), axis=1)
    period_B = jnp.maximum(start_B - q_B, 1)
    idx_BK = q_B[:, None] + n + j_K[None] % period_B[:, None]  # at most pos
    found_BK = jnp.take_along_axis(hist_BS, jnp.clip(idx_BK, 0, s - 1), axis=1)
    props_BK = jnp.where((q_B >= 0)[:, None], found_BK, props_BK)
  return props_BK


@functools.partial(jax.jit, static_argnames="plan")
def begin(params, draft_params, tokens_BL, lengths_B, seed, index_B=None, *, plan: Plan) -> dict:
  """Both models' prefill of right-padded prompts and the target's first token: the state `advance`
  takes (caches, each row's last token, position, tokens so far in `out_BN`, done, statistics, each
  row's PRNG key, from `seed` and the row's prompt index `index_B` (None: the row's own); with prompt
  lookup, each row's tokens by position in `hist_BS` instead of the draft's cache)."""
  params = _float_params(params, plan.cfg)
  b, w = tokens_BL.shape
  index_B = jnp.arange(b) if index_B is None else index_B
  keys_B = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(seed), index_B)
  cache_t, logits_BV = _prefill(params, tokens_BL, lengths_B, plan.cfg)
  if plan.sampling is None:
    first_B = _greedy(logits_BV, plan.vocab_limit)
  else:
    first_B = _draw(_keys(keys_B, 0), _probs(logits_BV, plan))
  if plan.draft_cfg is None:
    hist_BS = jnp.zeros((b, plan.cfg.max_seq_len), jnp.int32).at[:, :w].set(tokens_BL)
    proposer = dict(hist_BS=hist_BS.at[jnp.arange(b), lengths_B].set(first_B))
  else:
    proposer = dict(
      cache_d=_prefill(_float_params(draft_params, plan.draft_cfg), tokens_BL, lengths_B, plan.draft_cfg)[0],
      prev_B=tokens_BL[jnp.arange(b), lengths_B - 1],  # the token before last_B
    )
  zero = jnp.int32(0)
  return dict(
    cache_t=cache_t,
    **proposer,
    last_B=first_B,
    pos_B=lengths_B.astype(jnp.int32),
    count_B=jnp.ones((b,), jnp.int32),
    done_B=(first_B == plan.eos_id) | (plan.max_new <= 1),
    out_BN=jnp.zeros((b, plan.max_new + plan.k + 1), jnp.int32).at[:, 0].set(first_B),
    keys_B=keys_B,
    rounds=zero,
    accepted=zero,
    proposed=zero,
  )


@functools.partial(jax.jit, static_argnames=("plan", "rounds", "min_live"), donate_argnums=2)
def advance(params, draft_params, st: dict, *, plan: Plan, rounds: int = 0, min_live: int = 0) -> dict:
  """Rounds until every row is done, or at most `rounds` more (0: no limit), or until fewer than
  `min_live` rows are left (0: no such stop; rows to refill, `refill`). A row's tokens are
  out_BN[:count_B], ending at its first end-of-sequence id (`_tokens`)."""
  params = _float_params(params, plan.cfg)
  if plan.draft_cfg is not None:
    draft_params = _float_params(draft_params, plan.draft_cfg)
  k, b, v = plan.k, st["last_B"].shape[0], plan.cfg.vocab_size
  rows_B, j_K1, start = jnp.arange(b), jnp.arange(k + 1), st["rounds"]

  def draft(cache_d, prev_B, last_B, pos_B, keys_B):
    """k proposals in k draft calls; sampled: also the distributions they were drawn from [B, k, V].
    The first call feeds the token before last_B again with it (two positions): its keys are not in
    the draft's cache when the last round accepted every proposal (the last proposal is never fed),
    and writing them again otherwise changes nothing."""
    dcfg, span = plan.draft_cfg, plan.spans[1]

    def propose(j, logits_BV, props_BK, q_BKV):
      if plan.sampling is None:
        x_B = _greedy(logits_BV, plan.vocab_limit)
      else:
        q_BV = _probs(logits_BV, plan)
        x_B, q_BKV = _draw(_keys(keys_B, 10 + j), q_BV), q_BKV.at[:, j].set(q_BV)
      return x_B, props_BK.at[:, j].set(x_B), q_BKV

    def step(j, carry):
      cache, x_B, props_BK, q_BKV = carry
      cache, logits_BV = _forward_one(draft_params, cache, x_B, pos_B + j, dcfg, span)
      return cache, *propose(j, logits_BV, props_BK, q_BKV)

    pair_B2 = jnp.stack([prev_B, last_B], axis=1)
    cache_d, h_B2D = _prompt_hidden(draft_params, pair_B2, dcfg, cache_d, pos_B - 1, span)
    logits_BV = _model(dcfg).apply({"params": draft_params}, h_B2D[:, 1:], method="logits")[:, 0]
    props_BK = jnp.zeros((b, k), jnp.int32)
    q_BKV = jnp.zeros((b, k, v) if plan.sampling else (b, k, 0), jnp.float32)
    carry = (cache_d, *propose(0, logits_BV, props_BK, q_BKV))
    # straight-line steps, not a loop XLA checks on the host every iteration: a 32-row round at k = 6
    # 1.151 -> 1.137 ms, k = 4 1.016 -> 1.011 (one H200, docs/serving.md "Draft steps without a loop")
    cache_d, _, props_BK, q_BKV = jax.lax.fori_loop(1, k, step, carry, unroll=True)
    return cache_d, props_BK, q_BKV

  def body(st):
    live_B, pos_B, count_B = ~st["done_B"], st["pos_B"], st["count_B"]
    keys_B = _keys(st["keys_B"], st["rounds"] + 1)  # this round's
    if plan.draft_cfg is None:  # a looked-up proposal is certain: q is one-hot
      proposer, props_BK = {}, _lookup(st["hist_BS"], pos_B, plan.ngram, k)
      q_BKV = jax.nn.one_hot(props_BK, v, dtype=jnp.float32) if plan.sampling else None
    else:
      cache_d, props_BK, q_BKV = draft(st["cache_d"], st["prev_B"], st["last_B"], pos_B, keys_B)
      proposer = dict(cache_d=cache_d)
    block_BK1 = jnp.concatenate([st["last_B"][:, None], props_BK], axis=1)
    cache_t, h_BKD = _prompt_hidden(params, block_BK1, plan.cfg, st["cache_t"], pos_B, plan.spans[0])
    logits = _model(plan.cfg).apply({"params": params}, h_BKD, method="logits")
    if plan.sampling is None:
      choice_BK1 = _greedy(logits, plan.vocab_limit)  # the target's token after each block position
      n_B = jnp.sum(jnp.cumprod(props_BK == choice_BK1[:, :k], axis=1), axis=1)  # proposals accepted
      next_B = choice_BK1[rows_B, n_B]
    else:
      n_B, next_B = _check(_probs(logits, plan), q_BKV, props_BK, keys_B, k)
    # the tokens a row emits: its accepted proposals, then the target's own
    choice_BK1 = jnp.where(j_K1[None] < n_B[:, None], jnp.pad(props_BK, ((0, 0), (0, 1))), next_B[:, None])
    emit_BK1 = (j_K1[None] <= n_B[:, None]) & live_B[:, None]
    out_BN = st["out_BN"]
    cols_BK1 = jnp.where(emit_BK1, count_B[:, None] + j_K1[None], out_BN.shape[1])  # past the end: dropped
    count_B = jnp.where(live_B, count_B + n_B + 1, count_B)
    eos_B = jnp.any(emit_BK1 & (choice_BK1 == plan.eos_id), axis=1)
    if plan.draft_cfg is not None:  # the token before the row's new last one
      before_B = jnp.where(n_B > 0, props_BK[rows_B, jnp.maximum(n_B - 1, 0)], st["last_B"])
      proposer["prev_B"] = jnp.where(live_B, before_B, st["prev_B"])
    if plan.draft_cfg is None:  # the emitted tokens at their positions, after the row's last one
      at_BK1 = jnp.where(emit_BK1, pos_B[:, None] + 1 + j_K1[None], st["hist_BS"].shape[1])
      proposer = dict(hist_BS=st["hist_BS"].at[rows_B[:, None], at_BK1].set(choice_BK1, mode="drop"))
    return dict(
      cache_t=cache_t,
      **proposer,
      last_B=jnp.where(live_B, next_B, st["last_B"]),
      pos_B=jnp.where(live_B, pos_B + n_B + 1, pos_B),
      count_B=count_B,
      done_B=st["done_B"] | eos_B | (count_B >= plan.max_new),
      out_BN=out_BN.at[rows_B[:, None], cols_BK1].set(choice_BK1, mode="drop"),
      keys_B=st["keys_B"],
      rounds=st["rounds"] + 1,
      accepted=st["accepted"] + jnp.sum(jnp.where(live_B, n_B, 0)),
      proposed=st["proposed"] + k * jnp.sum(live_B),
    )

  def cond(st):
    more = ~jnp.all(st["done_B"])
    if min_live:
      more &= jnp.sum(~st["done_B"]) >= min_live
    return more if rounds == 0 else more & (st["rounds"] - start < rounds)

  return jax.lax.while_loop(cond, body, st)


@functools.partial(jax.jit, static_argnames="plan", donate_argnums=2)
def refill(
  params, draft_params, st: dict, tokens_RL, lengths_R, rows_R, index_R, seed, *, plan: Plan
) -> dict:
  """`st` with its rows rows_R (a row past the state's: nowhere) started afresh on the prompts
  tokens_RL of indices index_R, as `begin` starts them (both caches' rows written whole); the
  statistics carry on."""
  new = begin(params, draft_params, tokens_RL, lengths_R, seed, index_R, plan=plan)

  def put(big, one):
    if big.ndim == 0:  # rounds, accepted, proposed
      return big
    index = (slice(None),) * row_axis(big) + (rows_R,)
    return big.at[index].set(one.astype(big.dtype), mode="drop")

  return jax.tree.map(put, st, new)

"""Greedy speculative decoding: a small draft model proposes `k` tokens a round, one by one; the
target model checks them all in one forward pass over the k + 1 positions (the last accepted token
and the proposals, written onto its cache as a prompt's piece is) and keeps the proposals up to the
first it would not have chosen, then its own token there: every round emits 1 to k + 1 tokens for
one target call, and the tokens are the target's greedy ones (the draft only decides how many
come per call; in bfloat16 the check of k + 1 positions in one pass rounds differently from one-token
steps, so a near-tie can go the other way, as between a prefill and token-by-token decoding).

    tokens, stats = speculative_generate(params, cfg, draft_params, draft_cfg, prompts, max_new_tokens=64)

Both models must share the tokenizer (the same vocabulary size) and have room for every prompt, its
new tokens and one round past them (`k` + 1 positions) in their context. Greedy only: sampled
speculative decoding (rejection sampling against the draft's distribution) is not built.

A rejected proposal's keys and values stay in both caches past the row's position; the next round
writes those positions before any query reads them (attention is causal in position), so nothing
is rolled back.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.generate.decode import (
  EOS_ID,
  MIN_ROWS,
  _float_params,
  _forward_one,
  _model,
  _prefill,
  _prompt_hidden,
  bucket,
  decode_span,
)
from llm_jax.model import ModelConfig


def _greedy(logits_xV, vocab_limit: int | None):
  """The argmax over ids below `vocab_limit` (padded embedding rows are never chosen)."""
  if vocab_limit is not None and vocab_limit < logits_xV.shape[-1]:
    logits_xV = jnp.where(jnp.arange(logits_xV.shape[-1]) < vocab_limit, logits_xV, -jnp.inf)
  return jnp.argmax(logits_xV, axis=-1).astype(jnp.int32)


@functools.partial(
  jax.jit, static_argnames=("cfg", "draft_cfg", "k", "max_new", "eos_id", "vocab_limit", "spans")
)
def speculate(
  params,
  draft_params,
  tokens_BL,
  lengths_B,
  *,
  cfg: ModelConfig,
  draft_cfg: ModelConfig,
  k: int,
  max_new: int,
  eos_id: int = EOS_ID,
  vocab_limit: int | None = None,
  spans: tuple[int, int] = (0, 0),
):
  """Greedy tokens of right-padded prompts: ([B, max_new] tokens, [B] how many are valid: up to and
  excluding the first EOS, at most max_new; the rounds run, and the draft tokens the live rows
  proposed and had accepted). `spans`: the cache positions the target's and the draft's rounds attend
  to (`decode_span` of the last position a round can write; 0: the whole cache). Host callers:
  `speculative_generate`."""
  params, draft_params = _float_params(params, cfg), _float_params(draft_params, draft_cfg)
  b = tokens_BL.shape[0]
  cache_t, logits_BV = _prefill(params, tokens_BL, lengths_B, cfg)
  cache_d, _ = _prefill(draft_params, tokens_BL, lengths_B, draft_cfg)
  first_B = _greedy(logits_BV, vocab_limit)
  out_BN = jnp.zeros((b, max_new + k + 1), jnp.int32).at[:, 0].set(first_B)
  done_B = (first_B == eos_id) | (max_new <= 1)
  rows_B = jnp.arange(b)

  def draft(cache_d, last_B, pos_B):
    """k proposals, and the last one fed too (its keys are in the cache if it is accepted)."""

    def step(j, carry):
      cache, x_B, props_BK1 = carry
      cache, logits_BV = _forward_one(draft_params, cache, x_B, pos_B + j, draft_cfg, spans[1])
      x_B = _greedy(logits_BV, vocab_limit)
      return cache, x_B, props_BK1.at[:, j].set(x_B)

    props_BK1 = jnp.zeros((b, k + 1), jnp.int32)
    cache_d, _, props_BK1 = jax.lax.fori_loop(0, k + 1, step, (cache_d, last_B, props_BK1))
    return cache_d, props_BK1[:, :k]

  def body(carry):
    cache_t, cache_d, last_B, pos_B, count_B, done_B, out_BN, rounds, accepted, proposed = carry
    cache_d, props_BK = draft(cache_d, last_B, pos_B)
    block_BK1 = jnp.concatenate([last_B[:, None], props_BK], axis=1)
    cache_t, h_BKD = _prompt_hidden(params, block_BK1, cfg, cache_t, pos_B, spans[0])
    logits = _model(cfg).apply({"params": params}, h_BKD, method="logits")
    choice_BK1 = _greedy(logits, vocab_limit)  # the target's token after each block position
    n_B = jnp.sum(jnp.cumprod(props_BK == choice_BK1[:, :k], axis=1), axis=1)  # proposals accepted
    j_K1 = jnp.arange(k + 1)
    emit_BK1 = (j_K1[None] <= n_B[:, None]) & ~done_B[:, None]
    cols_BK1 = jnp.where(emit_BK1, count_B[:, None] + j_K1[None], out_BN.shape[1])  # past the end: dropped
    out_BN = out_BN.at[rows_B[:, None], cols_BK1].set(choice_BK1, mode="drop")
    eos_B = jnp.any(emit_BK1 & (choice_BK1 == eos_id), axis=1)
    live_B = ~done_B
    count_B = jnp.where(live_B, count_B + n_B + 1, count_B)
    last_B = jnp.where(live_B, choice_BK1[rows_B, n_B], last_B)
    pos_B = jnp.where(live_B, pos_B + n_B + 1, pos_B)
    accepted = accepted + jnp.sum(jnp.where(live_B, n_B, 0))
    proposed = proposed + k * jnp.sum(live_B)
    done_B = done_B | eos_B | (count_B >= max_new)
    return cache_t, cache_d, last_B, pos_B, count_B, done_B, out_BN, rounds + 1, accepted, proposed

  def cond(carry):
    return ~jnp.all(carry[5])

  zero = jnp.int32(0)
  start = (cache_t, cache_d, first_B, lengths_B, jnp.ones((b,), jnp.int32), done_B, out_BN, zero, zero, zero)
  *_, count_B, _, out_BN, rounds, accepted, proposed = jax.lax.while_loop(cond, body, start)
  out_BN = out_BN[:, :max_new]
  is_eos_BN = out_BN == eos_id
  first_eos_B = jnp.where(jnp.any(is_eos_BN, axis=1), jnp.argmax(is_eos_BN, axis=1), max_new)
  return (
    out_BN,
    jnp.minimum(first_eos_B, count_B),
    {"rounds": rounds, "accepted": accepted, "proposed": proposed},
  )


def speculative_generate(
  params,
  cfg: ModelConfig,
  draft_params,
  draft_cfg: ModelConfig,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int,
  k: int = 4,
  eos_id: int = EOS_ID,
  vocab_limit: int | None = None,
) -> tuple[list[list[int]], dict]:
  """Each prompt's greedy new tokens (ending before EOS, at most max_new_tokens), as `generate`
  with temperature 0 gives them, and statistics: {"rounds" (target calls after the prefill),
  "proposed" and "accepted" (draft tokens, over every row decoded: a single prompt runs as
  generate.MIN_ROWS copies), "tokens" (returned)}. Raises ValueError when the models do not share a
  vocabulary or a context has no room for the prompt, its tokens and one round."""
  if draft_cfg.vocab_size != cfg.vocab_size:
    raise ValueError(
      f"the draft model's vocabulary ({draft_cfg.vocab_size} ids) is not the target's ({cfg.vocab_size}):"
      " speculative decoding needs one tokenizer"
    )
  if not prompts or not all(len(p) for p in prompts):
    raise ValueError("speculative decoding needs at least one prompt, each of at least one token")
  if k < 1 or max_new_tokens < 1:
    raise ValueError(f"draft tokens ({k}) and max_new_tokens ({max_new_tokens}) must be at least 1")
  longest = max(len(p) for p in prompts)
  need = longest + max_new_tokens + k + 1
  for name, c in (("target", cfg), ("draft", draft_cfg)):
    if need > c.max_seq_len:
      raise ValueError(
        f"the {name} model's context ({c.max_seq_len}) has no room for a prompt of {longest} tokens,"
        f" {max_new_tokens} new ones and a round of {k} draft tokens ({need} positions)"
      )
  rows = max(len(prompts), MIN_ROWS)  # one sequence decodes as two rows (generate.MIN_ROWS)
  width = bucket(longest, cfg.max_seq_len)
  tokens = np.zeros((rows, width), np.int32)
  lengths = np.ones((rows,), np.int32)
  for i in range(rows):
    p = prompts[min(i, len(prompts) - 1)]
    tokens[i, : len(p)], lengths[i] = p, len(p)
  out, valid, stats = jax.device_get(
    speculate(
      params,
      draft_params,
      tokens,
      lengths,
      cfg=cfg,
      draft_cfg=draft_cfg,
      k=k,
      max_new=max_new_tokens,
      eos_id=eos_id,
      vocab_limit=vocab_limit,
      spans=(decode_span(need - 2, cfg), decode_span(need - 2, draft_cfg)),  # a round's last position
    )
  )
  result = [[int(t) for t in out[i, : valid[i]]] for i in range(len(prompts))]
  return result, {**{name: int(v) for name, v in stats.items()}, "tokens": sum(len(r) for r in result)}

"""Speculative decoding: a small draft model proposes `k` tokens a round, one by one; the target
model checks them all in one forward pass over the k + 1 positions (the last accepted token and the
proposals, written onto its cache as a prompt's piece is) and keeps the proposals up to the first it
refuses, then draws its own token there: every round emits 1 to k + 1 tokens for one target call.

Greedy (temperature 0): a proposal is kept when it is the target's argmax, so the tokens are the
target's greedy ones (the draft only decides how many come per call; in bfloat16 the check of k + 1
positions in one pass rounds differently from one-token steps, so a near-tie can go the other way, as
between a prefill and token-by-token decoding). Sampled (temperature > 0, top-k, top-p; speculative
sampling, Leviathan et al. 2023): the draft draws its proposals from its own tempered, filtered
distribution q, proposal j is kept with probability min(1, p_j(x) / q_j(x)) under the target's p,
and the token after the kept ones is drawn from max(p - q, 0) renormalized (from p after k kept
ones), so the tokens are distributed exactly as the target's own samples. Each row has its own key
(from `seed` and its prompt's index); a repetition penalty is not supported.

    tokens, stats = speculative_generate(params, cfg, draft_params, draft_cfg, prompts, max_new_tokens=64)
    tokens, stats = speculative_generate(..., prompts, max_new_tokens=64, rows=32)  # 32 at a time, refilled
    for new, stats in speculative_stream(params, cfg, draft_params, draft_cfg, ids, max_new_tokens=64):
        ...  # the prefill's first token, then the tokens of each few rounds (a terminal's stream)

Both models must share the tokenizer (the same vocabulary size) and have room for every prompt, its
new tokens and one round past them (`k` + 1 positions) in their context.

Without a draft model (draft_params and draft_cfg None) the proposals come from the row's own tokens
(prompt lookup, vLLM's "ngram" method): the tokens that followed the latest earlier occurrence of its
last `ngram` tokens (or fewer, the longest that occurs), a few elementwise operations a round instead
of k draft steps (sampled, as a draft certain of its proposal). It pays where the output repeats
its prompt or itself (code edits, quotes, extraction); elsewhere a round is one target call for one
token, about a decode step.

A rejected proposal's keys and values stay in both caches past the row's position; the next round
writes those positions before any query reads them (attention is causal in position), so nothing
is rolled back. The rounds themselves are compiled programs (generate/rounds.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import numpy as np

from llm_jax.generate.decode import EOS_ID, MIN_ROWS, bucket, decode_span
from llm_jax.generate.rounds import Plan, advance, begin, refill
from llm_jax.generate.sampling import SamplingParams
from llm_jax.model import ModelConfig


def _tokens(out_N, count: int, plan: Plan) -> list[int]:
  """A row's tokens (host values): up to its count and max_new, ending before its first EOS."""
  tokens = [int(t) for t in out_N[: min(int(count), plan.max_new)]]
  return tokens[: tokens.index(plan.eos_id)] if plan.eos_id in tokens else tokens


_STATS = ("rounds", "accepted", "proposed")


def _stats(st: dict) -> dict:
  return {name: int(st[name]) for name in _STATS}


def _prepare(cfg, draft_cfg, prompts, max_new_tokens: int, k: int, eos_id: int, vocab_limit, ngram: int, sp):
  """(plan, tokens [B, W], lengths [B]) of the prompts, after checking the pair, the room
  and the sampling settings `sp` (a SamplingParams of temperature, top_k, top_p and seed)."""
  if draft_cfg is None and ngram < 1:
    raise ValueError(f"prompt lookup needs ngram >= 1 (got {ngram})")
  if draft_cfg is not None and draft_cfg.vocab_size != cfg.vocab_size:
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
    if c is not None and need > c.max_seq_len:
      raise ValueError(
        f"the {name} model's context ({c.max_seq_len}) has no room for a prompt of {longest} tokens,"
        f" {max_new_tokens} new ones and a round of {k} draft tokens ({need} positions)"
      )
  spans = tuple(0 if c is None else decode_span(need - 2, c) for c in (cfg, draft_cfg))  # a round's end
  sampling = None if sp.temperature == 0 else (sp.temperature, sp.top_k, sp.top_p)
  plan = Plan(cfg, draft_cfg, k, max_new_tokens, eos_id, vocab_limit, spans, ngram, sampling)
  rows = max(len(prompts), MIN_ROWS)  # one sequence decodes as two rows (generate.MIN_ROWS)
  tokens = np.zeros((rows, bucket(longest, cfg.max_seq_len)), np.int32)
  lengths = np.ones((rows,), np.int32)
  for i in range(rows):
    p = prompts[min(i, len(prompts) - 1)]
    tokens[i, : len(p)], lengths[i] = p, len(p)
  return plan, tokens, lengths


def speculative_generate(
  params,
  cfg: ModelConfig,
  draft_params,
  draft_cfg: ModelConfig | None,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int,
  k: int = 4,
  eos_id: int = EOS_ID,
  vocab_limit: int | None = None,
  ngram: int = 3,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  rows: int = 0,
) -> tuple[list[list[int]], dict]:
  """Each prompt's new tokens (ending before EOS, at most max_new_tokens): greedy ones as `generate`
  with temperature 0 gives them, or at `temperature` > 0 (with `top_k`, `top_p`, `seed`) draws
  distributed as the target's own; and statistics: {"rounds" (target calls after the prefill),
  "proposed" and "accepted" (draft tokens, over every row decoded: a single prompt runs as
  generate.MIN_ROWS copies), "tokens" (returned)}. draft_params and draft_cfg None: prompt lookup
  of up to `ngram` tokens proposes instead of a draft model. `rows` > 0 (fewer than the prompts):
  that many prompts decode at a time, and rows a prompt has finished take the next prompts in order
  (continuous batching: a round's rows do not wait for the slowest of a fixed group); the tokens are
  the same, greedy. Raises ValueError when the models do not share a vocabulary, a context has no room
  for the prompt, its tokens and one round, or a sampling setting is out of range."""
  if rows < 0:
    raise ValueError(f"rows ({rows}) must be 0 (every prompt at once) or the rows decoded at a time")
  sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
  plan, tokens, lengths = _prepare(cfg, draft_cfg, prompts, max_new_tokens, k, eos_id, vocab_limit, ngram, sp)
  b = max(rows, MIN_ROWS) if 0 < rows < len(prompts) else len(tokens)
  result, host = _decode_rows(params, draft_params, tokens, lengths, len(prompts), seed, b, plan)
  return result, {**_stats(host), "tokens": sum(len(r) for r in result)}


def _decode_rows(params, draft_params, tokens_NL, lengths_N, n: int, seed, b: int, plan: Plan):
  """(the first n prompts' tokens, the last state's host values) decoded b rows at a time (prompts past
  n: padding rows, decoded and not returned). With more prompts than rows, the rounds run until b // 8
  rows (at least one) have finished, those rows' tokens are read and the next prompts start in them
  (`refill`, a power-of-two bucket of rows), until the prompts run out; then, as with every prompt in
  one batch, until every row is done. A row's PRNG key comes from its prompt's index (`begin`)."""
  gap = max(1, b // 8)
  prompt_of: list = [r if r < n else None for r in range(b)]  # each row's prompt (None: idle)
  result: list = [None] * n
  st, queued = begin(params, draft_params, tokens_NL[:b], lengths_N[:b], seed, plan=plan), min(b, n)
  while True:
    st = advance(params, draft_params, st, plan=plan, min_live=b - gap + 1 if queued < n else 0)
    host = jax.device_get({name: st[name] for name in ("done_B", "count_B", "out_BN", *_STATS)})
    for r, i in enumerate(prompt_of):
      if i is not None and host["done_B"][r]:
        result[i], prompt_of[r] = _tokens(host["out_BN"][r], host["count_B"][r], plan), None
    if queued == n:  # the last advance ran every row to its end
      return result, host
    free = [r for r, i in enumerate(prompt_of) if i is None][: n - queued]
    width = bucket(len(free), b, minimum=MIN_ROWS)
    index_R = np.minimum(np.arange(queued, queued + width), n - 1)  # past the free rows: copies, dropped
    rows_R = np.full((width,), b, np.int32)  # b: past the state's rows, written nowhere
    rows_R[: len(free)] = free
    for r, i in zip(free, index_R, strict=False):
      prompt_of[r] = int(i)
    st = refill(
      params, draft_params, st, tokens_NL[index_R], lengths_N[index_R], rows_R, index_R, seed, plan=plan
    )
    queued += len(free)


def speculative_stream(
  params,
  cfg: ModelConfig,
  draft_params,
  draft_cfg: ModelConfig | None,
  prompt: Sequence[int],
  *,
  max_new_tokens: int,
  k: int = 4,
  eos_id: int = EOS_ID,
  vocab_limit: int | None = None,
  rounds: int = 4,
  ngram: int = 3,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
) -> Iterator[tuple[list[int], dict]]:
  """One prompt's greedy tokens as they are decoded: (new tokens, statistics so far) after the
  prefill (the first token), then after every `rounds` rounds; together the tokens
  `speculative_generate` returns."""
  sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
  plan, tokens, lengths = _prepare(
    cfg, draft_cfg, [prompt], max_new_tokens, k, eos_id, vocab_limit, ngram, sp
  )
  st, sent = begin(params, draft_params, tokens, lengths, seed, plan=plan), 0
  while True:
    host = jax.device_get({name: v for name, v in st.items() if not name.startswith("cache")})
    got = _tokens(host["out_BN"][0], host["count_B"][0], plan)
    yield got[sent:], _stats(host)
    sent = len(got)
    if host["done_B"][0]:
      return
    st = advance(params, draft_params, st, plan=plan, rounds=rounds)

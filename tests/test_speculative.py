"""Greedy speculative decoding: the tokens are the target's greedy ones whatever the draft proposes,
and a draft that always agrees has every proposal accepted."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_package import SERVER_CFG

from llm_jax import generate as G
from llm_jax.generate.rounds import _lookup, advance, begin
from llm_jax.generate.speculative import _prepare, speculative_generate, speculative_stream
from llm_jax.model import default_levers, unstack_layers
from llm_jax.model.params import init_params

# a context of 256: rounds attend to a 128-position span of it (decode_span)
CFG = dataclasses.replace(SERVER_CFG, vocab_size=320, num_layers=2, max_seq_len=256)
DRAFT = dataclasses.replace(CFG, num_layers=1, d_model=16, num_heads=2, num_kv_heads=1, mlp_dim=32)
PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 40], [1, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
LIMIT = 300  # ids at or past it are never chosen (padded embedding rows)


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, 0)


def _greedy(params, prompts, n, eos_id=G.EOS_ID):
  gens = G.generate(
    params, CFG, prompts, G.SamplingParams(max_new_tokens=n), eos_id=eos_id, vocab_limit=LIMIT
  )
  return [g.tokens for g in gens]


def _near(params, scale=0.2, seed=1):
  """The target's weights with noise: a draft that agrees often but not always (~30% accepted)."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  noisy = [x + scale * np.std(x) * rng.standard_normal(x.shape).astype(x.dtype) for x in leaves]
  return jax.tree.unflatten(tree, noisy)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("near", [False, True])
def test_tokens_are_the_targets_greedy_ones(params, k, near):
  """Drafts of other weights and shapes (most proposals rejected) and of the target's weights with
  noise (some accepted, some rejected after accepted ones): the tokens equal plain greedy decoding's
  for prompts of different lengths in one batch, and for one prompt alone."""
  draft, draft_cfg = (_near(params), CFG) if near else (init_params(DRAFT, 7), DRAFT)
  got, stats = speculative_generate(
    params, CFG, draft, draft_cfg, PROMPTS, max_new_tokens=20, k=k, vocab_limit=LIMIT
  )
  assert got == _greedy(params, PROMPTS, 20)
  assert stats["tokens"] == sum(map(len, got))
  assert 0 <= stats["accepted"] < stats["proposed"] <= k * 3 * stats["rounds"]
  [one], _ = speculative_generate(
    params, CFG, draft, draft_cfg, PROMPTS[1:2], max_new_tokens=7, k=k, vocab_limit=LIMIT
  )
  assert one == _greedy(params, PROMPTS[1:2], 7)[0]


def test_a_draft_that_agrees_has_every_proposal_accepted(params):
  """With the target as its own draft every proposal is accepted: k + 1 tokens per round, so 1 +
  4 * 5 = 21 tokens take 5 rounds after the prefill's first token."""
  got, stats = speculative_generate(
    params, CFG, params, CFG, PROMPTS, max_new_tokens=21, k=4, vocab_limit=LIMIT
  )
  assert got == _greedy(params, PROMPTS, 21)
  assert stats["rounds"] == 4 and stats["accepted"] == stats["proposed"] == 3 * 4 * 4


def test_the_stream_yields_the_same_tokens_as_they_come(params):
  """The stream sends the prefill's first token alone, then each round's tokens (one round per
  call here): together the tokens of greedy decoding; its last statistics are the whole run's."""
  draft = _near(params)
  parts = list(
    speculative_stream(
      params, CFG, draft, CFG, PROMPTS[2], max_new_tokens=20, k=3, vocab_limit=LIMIT, rounds=1
    )
  )
  assert len(parts[0][0]) == 1 and all(1 <= len(new) <= 4 for new, _ in parts[1:])
  assert [t for new, _ in parts for t in new] == _greedy(params, PROMPTS[2:], 20)[0]
  _, stats = speculative_generate(
    params, CFG, draft, CFG, PROMPTS[2:], max_new_tokens=20, k=3, vocab_limit=LIMIT
  )
  assert parts[-1][1] == {name: stats[name] for name in ("rounds", "accepted", "proposed")}
  assert len(parts) == stats["rounds"] + 1


def test_the_decode_levers_layout_decodes_the_same(params):
  """Both models in the layout the server decodes with (fused q/k/v, folded norms, one cache array
  for every layer): the same greedy tokens."""
  target, cfg = unstack_layers(params, CFG, levers="qkv,norm,kv")
  draft, draft_cfg = unstack_layers(_near(params), CFG, levers="qkv,norm,kv")
  got, stats = speculative_generate(
    target, cfg, draft, draft_cfg, PROMPTS, max_new_tokens=12, k=3, vocab_limit=LIMIT
  )
  assert got == _greedy(params, PROMPTS, 12) and 0 < stats["accepted"] < stats["proposed"]


def test_rows_stop_at_eos(params):
  """A row stops before the end-of-sequence id, as greedy decoding does (here the first id that a
  prompt's greedy continuation reaches only at its third token or later); the other rows go on."""
  plain = _greedy(params, PROMPTS, 12)
  row, at = next(
    (r, i) for r, toks in enumerate(plain) for i, t in enumerate(toks) if i >= 2 and t not in toks[:i]
  )
  want = _greedy(params, PROMPTS, 12, eos_id=plain[row][at])
  assert len(want[row]) == at and want != plain
  got, _ = speculative_generate(
    params,
    CFG,
    init_params(DRAFT, 7),
    DRAFT,
    PROMPTS,
    max_new_tokens=12,
    k=3,
    eos_id=plain[row][at],
    vocab_limit=LIMIT,
  )
  assert got == want


def test_bad_pairs_are_refused(params):
  other = dataclasses.replace(DRAFT, vocab_size=256)
  with pytest.raises(ValueError, match="vocabulary"):
    speculative_generate(params, CFG, init_params(other, 0), other, PROMPTS, max_new_tokens=4)
  with pytest.raises(ValueError, match=r"context \(256\) has no room"):
    speculative_generate(params, CFG, params, CFG, PROMPTS, max_new_tokens=242, k=4)
  with pytest.raises(ValueError, match="at least one token"):
    speculative_generate(params, CFG, params, CFG, [[1, 2], []], max_new_tokens=4)


def test_lookup_proposes_what_followed_the_last_tokens():
  """Prompt lookup's proposals (k = 4 and 6): what followed the latest earlier occurrence of the row's
  last tokens, the longest that occurs, continued with the occurrence's period; the last token when
  nothing occurs again."""
  rows = [  # (tokens up to the row's position, proposals for k = 6)
    ([5, 6, 7, 8, 5, 6], [7, 8, 5, 6, 7, 8]),  # [5, 6] occurred 4 back: period 4
    ([1, 2, 3, 4], [4, 4, 4, 4, 4, 4]),  # no token occurs twice
    ([9, 9, 9], [9, 9, 9, 9, 9, 9]),  # period 1
    ([1, 2, 3, 1, 2, 4, 1, 2], [4, 1, 2, 4, 1, 2]),  # the latest [1, 2], not the first
    ([7, 1, 2, 3, 9, 1, 2, 5, 7, 1, 2], [3, 9, 1, 2, 5, 7]),  # [7, 1, 2] beats the later [1, 2]
  ]
  hist = np.zeros((len(rows), 16), np.int32)
  for i, (toks, _) in enumerate(rows):
    hist[i, : len(toks)] = toks
  pos = jnp.asarray([len(t) - 1 for t, _ in rows])
  for k in (4, 6):
    got = np.asarray(_lookup(jnp.asarray(hist), pos, 3, k)).tolist()
    assert got == [want[:k] for _, want in rows]
  assert np.asarray(_lookup(jnp.asarray(hist), pos, 1, 4)).tolist()[4] == [5, 7, 1, 2]  # [2] only


def _lookup_rounds(prompt, greedy, max_new, k, ngram=3):
  """(rounds, accepted) of prompt lookup over a row's greedy tokens, by a plain Python search."""
  hist, count, rounds, accepted = list(prompt) + greedy[:1], 1, 0, 0
  while count < max_new:
    props = [hist[-1]] * k
    for n in range(ngram, 0, -1):
      q = next((q for q in range(len(hist) - n - 1, -1, -1) if hist[q : q + n] == hist[-n:]), None)
      if q is not None:
        after = hist[q + n :]
        props = [after[j % len(after)] for j in range(k)]
        break
    n_ok = next((j for j in range(k) if props[j] != greedy[count + j]), k)
    hist += greedy[count : count + n_ok + 1]
    count, rounds, accepted = count + n_ok + 1, rounds + 1, accepted + n_ok
  return rounds, accepted


def test_prompt_lookup_decodes_the_targets_greedy_tokens(params):
  """Without a draft model, proposals from each row's own tokens: the target's greedy tokens, and as
  many rounds and accepted proposals as the same search over those tokens in plain Python gives
  (random weights repeat themselves, so some proposals are accepted)."""
  prompts = PROMPTS + [[1, 5, 6, 7, 5, 6, 7, 5, 6, 7]]
  k, n = 3, 30
  longer = [
    g.tokens
    for g in G.generate(
      params, CFG, prompts, G.SamplingParams(max_new_tokens=n + k + 1), eos_id=-1, vocab_limit=LIMIT
    )
  ]
  got, stats = speculative_generate(
    params, CFG, None, None, prompts, max_new_tokens=n, k=k, eos_id=-1, vocab_limit=LIMIT
  )
  assert got == [g[:n] for g in longer]
  sims = [_lookup_rounds(p, g, n, k) for p, g in zip(prompts, longer, strict=True)]
  assert stats["rounds"] == max(r for r, _ in sims) and stats["accepted"] == sum(a for _, a in sims)
  assert 0 < stats["accepted"] < stats["proposed"]
  parts = list(
    speculative_stream(
      params, CFG, None, None, prompts[3], max_new_tokens=n, k=k, eos_id=-1, vocab_limit=LIMIT, rounds=2
    )
  )
  assert [t for new, _ in parts for t in new] == got[3]
  with pytest.raises(ValueError, match="ngram >= 1"):
    speculative_generate(params, CFG, None, None, prompts, max_new_tokens=4, ngram=0)


def _last_logits(params, row: list, width: int):
  """The target's logits after `row`, right-padded to `width` (the pass is causal): one compiled
  program for every row, not one per length."""
  tokens_1L = jnp.asarray([row + [0] * (width - len(row))], jnp.int32)
  return G.prompt_logits(params, tokens_1L, CFG)[0, len(row) - 1]


def _sampled_joint(params, prompt, n: int, temperature: float, top_k: int) -> dict:
  """The target's exact distribution of its first n sampled tokens (top-k kept, tempered): token
  tuples -> probability, from its logits after every prefix (float64 on the host)."""
  joint, width = {(): 1.0}, len(prompt) + n
  for _ in range(n):
    nxt = {}
    for seq, pr in joint.items():
      row = list(prompt) + list(seq)
      x = np.asarray(_last_logits(params, row, width), np.float64)[:LIMIT] / temperature
      keep = np.argsort(-x)[:top_k]
      e = np.exp(x[keep] - x[keep].max())
      nxt.update({seq + (int(t),): pr * q for t, q in zip(keep, e / e.sum(), strict=True)})
    joint = nxt
  return joint


def _tv(a: dict, b: dict) -> float:
  return 0.5 * sum(abs(a.get(s, 0.0) - b.get(s, 0.0)) for s in set(a) | set(b))


@pytest.mark.parametrize(
  ("proposer", "k", "at_a_time"), [("draft", 1, 0), ("draft", 2, 0), ("lookup", 2, 0), ("draft", 2, 1024)]
)
def test_sampled_tokens_are_distributed_as_the_targets_own(params, proposer, k, at_a_time):
  """Speculative sampling: over 4,000 rows of one prompt (each its own key) the first three tokens'
  joint distribution is the target's (total variation within 0.05 of the exact one; measured ~0.02),
  though the draft's own is 0.6 away and proposals are both kept and refused: kept ones, the draw
  after a refusal and the draw after k kept ones all appear in three tokens at k = 1 and 2. Also with
  1,024 rows at a time, finished rows refilled (`rows`)."""
  prompt, rows, temperature, top_k = PROMPTS[0], 4000, 1.0, 2
  want = _sampled_joint(params, prompt, 3, temperature, top_k)
  draft = (_near(params), CFG) if proposer == "draft" else (None, None)
  if proposer == "draft":
    assert _tv(_sampled_joint(draft[0], prompt, 3, temperature, top_k), want) > 0.5
  got, stats = speculative_generate(
    params,
    CFG,
    *draft,
    [prompt] * rows,
    max_new_tokens=3,
    k=k,
    eos_id=-1,
    vocab_limit=LIMIT,
    temperature=temperature,
    top_k=top_k,
    seed=0,
    rows=at_a_time,
  )
  freq = collections.Counter(tuple(g) for g in got)
  assert _tv({seq: c / rows for seq, c in freq.items()}, want) < 0.05
  assert 0.1 * stats["proposed"] < stats["accepted"] < 0.9 * stats["proposed"]


def test_sampled_runs_follow_the_seed(params):
  """The same seed draws the same tokens, another seed other tokens; a bad setting is refused by name."""

  def run(seed):
    return speculative_generate(
      params,
      CFG,
      _near(params),
      CFG,
      PROMPTS,
      max_new_tokens=12,
      k=3,
      vocab_limit=LIMIT,
      temperature=0.9,
      top_p=0.9,
      seed=seed,
    )[0]

  assert run(1) == run(1) != run(2)
  with pytest.raises(ValueError, match="top_p"):
    speculative_generate(params, CFG, None, None, PROMPTS, max_new_tokens=4, temperature=1.0, top_p=0)


@pytest.mark.parametrize("k", [1, 4])
def test_a_round_runs_its_draft_steps_without_a_loop(params, k):
  """With per-layer parameters (as `generate --draft` decodes) the round is the only while loop of
  `advance`'s program: the k - 1 draft steps after the first are straight-line code, since XLA waits
  for the host at every loop iteration (docs/serving.md). (Functions after the main one are left out:
  on the CPU, jax's PRNG hash is a loop of its own.)"""
  levers = default_levers(params)
  target, cfg = unstack_layers(params, CFG, levers=levers)
  draft, draft_cfg = unstack_layers(init_params(DRAFT, 7), DRAFT, levers=levers)
  plan, tokens, lengths = _prepare(cfg, draft_cfg, PROMPTS, 8, k, G.EOS_ID, LIMIT, 3, G.SamplingParams())
  st = jax.eval_shape(lambda: begin(target, draft, tokens, lengths, 0, plan=plan))
  main = advance.lower(target, draft, st, plan=plan).as_text().split("func.func private")[0]
  assert main.count("stablehlo.while") == 1


@pytest.mark.parametrize(("proposer", "rows"), [("draft", 2), ("draft", 3), ("lookup", 3)])
def test_rows_refilled_from_the_queue_decode_each_prompts_greedy_tokens(params, proposer, rows):
  """Seven prompts of different lengths, `rows` at a time: a row a prompt finished (at its end of
  sequence or its last token) takes the next prompt while the others decode on, and every prompt's
  tokens are still its greedy ones, its proposals and acceptances those of all prompts in one batch
  (prompt lookup: a refilled row's token history is its new prompt's)."""
  prompts = [*PROMPTS, [1, 7], [1, 90, 91, 92], [1, 3, 3, 3, 3, 3], [1, 250, 12]]
  eos = _greedy(params, prompts[3:4], 5)[0][2]  # one prompt's third greedy token: some rows stop early
  pair = (init_params(DRAFT, 7), DRAFT) if proposer == "draft" else (None, None)
  got, stats = speculative_generate(
    params, CFG, *pair, prompts, max_new_tokens=16, k=3, vocab_limit=LIMIT, eos_id=eos, rows=rows
  )
  want = _greedy(params, prompts, 16, eos_id=eos)
  assert got == want
  assert any(len(w) < 16 for w in want) and stats["tokens"] == sum(map(len, want))
  alone, alone_stats = speculative_generate(
    params, CFG, *pair, prompts, max_new_tokens=16, k=3, vocab_limit=LIMIT, eos_id=eos
  )
  assert alone == want
  # each prompt's rounds are its own (its proposals depend on its tokens alone): the same counts
  assert (stats["accepted"], stats["proposed"]) == (alone_stats["accepted"], alone_stats["proposed"])
  assert stats["proposed"] <= 3 * rows * stats["rounds"]  # never more than `rows` rows in a round
  with pytest.raises(ValueError, match=r"rows \(-1\)"):
    speculative_generate(params, CFG, *pair, prompts, max_new_tokens=4, rows=-1)

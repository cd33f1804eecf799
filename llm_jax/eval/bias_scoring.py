"""Scores the sentences of each set: which tokens count, and a model-specific scorer that sums them.

The sentences of a set differ only in the group term. As in CrowS-Pairs, the figure compared is the
log-likelihood of the tokens the sentences share (the common token prefix and suffix around the term),
given the rest of the sentence: the term's own tokens are left out, so a name or pronoun that is simply
more frequent does not win by its frequency. `mode="full"` scores every token of the sentence instead.

A `SentenceScorer` turns (token ids, which tokens count) into a summed log-probability per sentence.
`DecoderScorer` does it causally (log p(token | tokens before it), so shared tokens before the term
cancel between groups and only those after it differ); `EncoderScorer` sums an encoder's pseudo-log-
likelihood (each counted token masked in turn and predicted from both sides). `scorer_for` picks by model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from llm_jax.eval import scoring

MODES = ("shared", "full")


class SentenceScorer(Protocol):
  """Summed log-probabilities of the counted tokens of whole sentences."""

  max_tokens: int  # the longest sentence (in tokens) it can score

  def score(self, sentences: Sequence[Sequence[int]], counted: Sequence[Sequence[bool]]) -> np.ndarray:
    """[N] float64: for each sentence, the sum over counted tokens of log p(token | its context)."""
    ...


def shared_mask(token_lists: Sequence[Sequence[int]]) -> list[list[bool]]:
  """For each sequence, True on the tokens of the prefix and suffix that every sequence shares."""
  shortest = min(len(t) for t in token_lists)
  prefix = 0
  while prefix < shortest and len({t[prefix] for t in token_lists}) == 1:
    prefix += 1
  suffix = 0
  while suffix < shortest - prefix and len({t[len(t) - 1 - suffix] for t in token_lists}) == 1:
    suffix += 1
  return [[i < prefix or i >= len(t) - suffix for i in range(len(t))] for t in token_lists]


def counted_tokens(token_lists: Sequence[Sequence[int]], mode: str, causal: bool) -> list[list[bool]]:
  """Which tokens are scored: the shared ones (mode 'shared'; for a causal model only those after the
  term, since the shared prefix scores the same in every sentence) or all of them (mode 'full')."""
  if mode == "full":
    return [[True] * len(t) for t in token_lists]
  if mode != "shared":
    raise ValueError(f"scoring mode must be one of {', '.join(MODES)}, got {mode!r}")
  masks = shared_mask(token_lists)
  if causal:
    for m in masks:
      first_diff = m.index(False) if False in m else len(m)
      m[:first_diff] = [False] * first_diff
  return masks


@dataclasses.dataclass
class ScoredSet:
  """A sentence set's per-group scores (summed log-probability of the counted tokens)."""

  scores: dict  # group -> float
  counted: dict  # group -> number of counted tokens
  skipped: str = ""


def score_sets(
  sets, tokenizer, scorer: SentenceScorer, mode: str = "shared", causal: bool = True
) -> list[ScoredSet]:
  """Scores every SentenceSet; sets that cannot be compared are kept with a reason in `skipped`."""
  out, sentences, counted, owners = [], [], [], []
  for k, s in enumerate(sets):
    groups = list(s.texts)
    ids = [tokenizer.encode(s.texts[g]) for g in groups]
    masks = counted_tokens(ids, mode, causal)
    n_counted = {g: sum(m) for g, m in zip(groups, masks, strict=True)}
    reason = ""
    if any(len(t) > scorer.max_tokens for t in ids):
      reason = f"longer than the model's {scorer.max_tokens} positions"
    elif len({tuple(t) for t in ids}) < len(ids):
      reason = "two groups give the same tokens"
    elif min(n_counted.values()) == 0:
      reason = "no shared tokens after the group term (put the term earlier in the sentence)"
    out.append(ScoredSet({}, n_counted, reason))
    if reason:
      continue
    for g, t, m in zip(groups, ids, masks, strict=True):
      sentences.append(t)
      counted.append(m)
      owners.append((k, g))
  skipped = [s.template.where for s, r in zip(sets, out, strict=True) if r.skipped]
  if skipped:
    logging.warning(
      "bias audit: skipped %d of %d sentence sets (%s)",
      len(skipped),
      len(sets),
      "; ".join(sorted(set(skipped))[:5]),
    )
  if sentences:
    values = scorer.score(sentences, counted)
    for (k, g), v in zip(owners, values, strict=True):
      out[k].scores[g] = float(v)
  return out


class DecoderScorer:
  """Causal log-likelihoods through llm_jax.eval.scoring.Scorer (on the evaluation mesh)."""

  def __init__(self, scorer: scoring.Scorer, prefix_ids: Sequence[int], batch_size: int = 16):
    self.scorer, self.prefix_ids, self.batch_size = scorer, list(prefix_ids), batch_size
    self.max_len = scorer.model.cfg.max_seq_len
    self.max_tokens = self.max_len + 1 - len(self.prefix_ids)

  def _batches(self, sentences, counted):
    for start in range(0, len(sentences), self.batch_size):
      end = start + self.batch_size
      chunk = list(zip(sentences[start:end], counted[start:end], strict=True))
      need = max(len(self.prefix_ids) + len(t) - 1 for t, _ in chunk)
      length = min(self.max_len, 1 << max(3, math.ceil(math.log2(max(need, 1)))))
      inputs_BL = np.zeros((self.batch_size, length), np.int32)
      targets_BL = np.zeros((self.batch_size, length), np.int32)
      weights_BL = np.zeros((self.batch_size, length), np.float32)
      for r, (t, m) in enumerate(chunk):
        seq = self.prefix_ids + list(t)
        n = len(seq) - 1
        inputs_BL[r, :n], targets_BL[r, :n] = seq[:-1], seq[1:]
        # Target position j predicts seq[j + 1]: sentence token i sits at target len(prefix) + i - 1.
        off = len(self.prefix_ids) - 1
        for i, c in enumerate(m):
          if c:
            if off + i < 0:
              raise ValueError("the first token of a sentence has no context: give a prefix (EOS)")
            weights_BL[r, off + i] = 1.0
      yield {"inputs": inputs_BL, "targets": targets_BL, "weights": weights_BL}

  def score(self, sentences, counted) -> np.ndarray:
    """[N] summed log p of the counted tokens, each given the tokens before it."""
    out = []
    for res in self.scorer.outputs(self._batches(sentences, counted), global_rows=True):
      nll_BL = res["nll"][: self.batch_size].astype(np.float64) * (res["weight"][: self.batch_size] > 0)
      out.extend((-nll_BL.sum(axis=1)).tolist())  # rows past batch_size pad the batch to the mesh
    return np.asarray(out[: len(sentences)], np.float64)


class EncoderScorer:
  """Pseudo-log-likelihood for encoders (model.causal=False; Salazar et al., 2020): [CLS] sentence [SEP],
  each counted token replaced by [MASK] in turn and scored as log p(token | every other token)."""

  def __init__(self, scorer: scoring.Scorer, tokenizer, batch_size: int = 16):
    if tokenizer.mask_id is None or tokenizer.cls_id is None or tokenizer.sep_id is None:
      raise ValueError(f"tokenizer {tokenizer.path} has no [MASK]/[CLS]/[SEP]: not an encoder's")
    self.scorer, self.batch_size = scorer, batch_size
    self.mask_id, self.cls_id, self.sep_id = tokenizer.mask_id, tokenizer.cls_id, tokenizer.sep_id
    self.max_len = scorer.model.cfg.max_seq_len
    self.max_tokens = self.max_len - 2

  def _rows(self, sentences, counted):
    """(sentence index, tokens, position) for every counted token."""
    for k, (t, m) in enumerate(zip(sentences, counted, strict=True)):
      seq = [self.cls_id] + list(t) + [self.sep_id]
      for i, c in enumerate(m):
        if c:
          yield k, seq, i + 1

  def _batches(self, rows):
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start : start + self.batch_size]
      need = max(len(seq) for _, seq, _ in chunk)
      length = min(self.max_len, 1 << max(3, math.ceil(math.log2(need))))
      inputs_BL = np.zeros((self.batch_size, length), np.int32)
      targets_BL = np.zeros((self.batch_size, length), np.int32)
      weights_BL = np.zeros((self.batch_size, length), np.float32)
      segments_BL = np.zeros((self.batch_size, length), np.int32)  # padding is its own segment
      for r, (_, seq, pos) in enumerate(chunk):
        inputs_BL[r, : len(seq)] = targets_BL[r, : len(seq)] = seq
        inputs_BL[r, pos] = self.mask_id
        weights_BL[r, pos] = 1.0
        segments_BL[r, : len(seq)] = 1
      yield {"inputs": inputs_BL, "targets": targets_BL, "weights": weights_BL, "segment_ids": segments_BL}

  def score(self, sentences, counted) -> np.ndarray:
    """[N] summed log p of the counted tokens, each masked in turn and predicted from both sides."""
    rows = list(self._rows(sentences, counted))
    per_row = []
    for res in self.scorer.outputs(self._batches(rows), global_rows=True):
      nll_BL = res["nll"][: self.batch_size].astype(np.float64) * (res["weight"][: self.batch_size] > 0)
      per_row.extend((-nll_BL.sum(axis=1)).tolist())
    out = np.zeros(len(sentences), np.float64)
    for (k, _, _), v in zip(rows, per_row, strict=False):
      out[k] += v
    return out


def scorer_for(sm, scorer: scoring.Scorer, batch_size: int = 16) -> tuple[SentenceScorer, bool, str]:
  """(scorer, causal, its name) for an opened model: log-likelihood for decoders, PLL for encoders."""
  if getattr(sm.model_cfg, "causal", True):
    return DecoderScorer(scorer, sm.prefix_ids, batch_size), True, "decoder log-likelihood"
  return EncoderScorer(scorer, sm.tokenizer, batch_size), False, "encoder pseudo-log-likelihood"

"""Sampling: per-sequence settings (SamplingParams), top-k/top-p masks, the repetition penalty, the
draw of the next token per row and the log-probability of the chosen token.

All functions work on a batch of rows with per-row settings (arrays ending in _B), so one compiled
decode step serves rows with different temperatures, filters and seeds.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one sequence is sampled. temperature 0 is greedy; top_k 0 and top_p 1 are off."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  max_new_tokens: int = 64
  stop: tuple[str, ...] = ()
  seed: int = 0
  stop_token_ids: tuple[int, ...] = ()  # ids that end the text (vLLM's stop_token_ids), not in it

  def __post_init__(self):
    if not (self.temperature >= 0 and math.isfinite(self.temperature)):
      raise ValueError(f"temperature={self.temperature} must be a finite number >= 0")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 turns it off)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
    if not self.repetition_penalty > 0:
      raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
    if isinstance(self.stop, str):
      object.__setattr__(self, "stop", (self.stop,))
    if any(not s for s in self.stop):
      raise ValueError("stop sequences must be non-empty strings")
    object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))


def top_k_top_p_mask(logits_BV, top_k_B, top_p_B):
  """Bool mask of the tokens kept by top-k (0 = off) and then top-p (1 = off), per row. A row with
  neither keeps every token (exactly: float rounding in the cumulative mass never drops its tail)."""
  v = logits_BV.shape[-1]
  sorted_BV = -jnp.sort(-logits_BV, axis=-1)
  k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, v), v)
  rank_V = jnp.arange(v)
  in_k_BV = rank_V[None, :] < k_B[:, None]
  probs_BV = jax.nn.softmax(jnp.where(in_k_BV, sorted_BV, -jnp.inf), axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  keep_BV = in_k_BV & ((mass_before_BV < top_p_B[:, None]) | (top_p_B[:, None] >= 1.0))
  n_keep_B = jnp.maximum(keep_BV.sum(-1), 1)
  threshold_B = jnp.take_along_axis(sorted_BV, (n_keep_B - 1)[:, None], axis=-1)
  return logits_BV >= threshold_B


def tempered(logits_BV, temperature_B, top_k_B, top_p_B, filtered: bool):
  """The logits a sampled row draws from: divided by its temperature and, when `filtered`, with the
  tokens its top-k/top-p drop at -inf."""
  scaled_BV = logits_BV / jnp.maximum(temperature_B, 1e-6)[:, None]
  if filtered:
    scaled_BV = jnp.where(top_k_top_p_mask(scaled_BV, top_k_B, top_p_B), scaled_BV, -jnp.inf)
  return scaled_BV


def apply_repetition_penalty(logits_BV, seen_BV, penalty_B):
  """CTRL-style: logits of seen tokens are divided by the penalty when positive, multiplied if not."""
  p = penalty_B[:, None]
  penalized = jnp.where(logits_BV > 0, logits_BV / p, logits_BV * p)
  return jnp.where(seen_BV, penalized, logits_BV)


def needs_filter(temperature_B, top_k_B, top_p_B, active_B=None):
  """Whether a live row samples with top-k or top-p (the filtered draw: a sort over the vocabulary).
  Only live rows count (`active_B`, default all): an idle or finished row's settings (a server's
  empty slots hold top_p 0) must not make the others sort."""
  live_B = jnp.ones(temperature_B.shape, bool) if active_B is None else active_B
  return jnp.any(live_B & (temperature_B > 0) & ((top_k_B > 0) | (top_p_B < 1.0)))


def any_filtered(sampling: Sequence[SamplingParams]) -> bool:
  """needs_filter on the host: some row samples with top-k or top-p (the `filtered` draw)."""
  return any(s.temperature > 0 and (s.top_k > 0 or s.top_p < 1) for s in sampling)


def sample(
  logits_BV, keys_B, temperature_B, top_k_B, top_p_B, penalty_B, seen_BV, active_B=None, filtered=None
):
  """Next token per row: argmax at temperature 0, else a draw from the filtered, tempered softmax.

  `filtered` (static) picks the draw for the whole batch: False, no row sets top-k/top-p (no sort);
  True, the top-k/top-p mask for every row (a sort over the vocabulary; a row without filters keeps
  every token, so it draws exactly what the plain draw would); None, chosen on the device from the
  live rows (`needs_filter`, one lax.cond). The decode loops pass it static: a conditional in a
  step costs ~20 us on an H200 (bench/sampling_probe.py), 3-4% of a gpt_small decode step.
  """
  logits_BV = apply_repetition_penalty(logits_BV, seen_BV, penalty_B)

  def draw(x_BV, filtered: bool):
    scaled_BV = tempered(x_BV, temperature_B, top_k_B, top_p_B, filtered)
    drawn_B = jax.vmap(jax.random.categorical)(keys_B, scaled_BV)
    return jnp.where(temperature_B > 0, drawn_B, jnp.argmax(x_BV, axis=-1)).astype(jnp.int32)

  if filtered is None:
    return jax.lax.cond(
      needs_filter(temperature_B, top_k_B, top_p_B, active_B),
      functools.partial(draw, filtered=True),
      functools.partial(draw, filtered=False),
      logits_BV,
    )
  return draw(logits_BV, bool(filtered))


def chosen_logprob(logits_BV, tok_B):
  """log_softmax(logits)[tok] per row, without writing the [B, V] log-probabilities."""
  max_B1 = jax.lax.stop_gradient(jnp.max(logits_BV, axis=-1, keepdims=True))
  shifted_BV = logits_BV - max_B1
  lse_B = jnp.log(jnp.sum(jnp.exp(shifted_BV), axis=-1))
  return jnp.take_along_axis(shifted_BV, tok_B[:, None], axis=-1)[:, 0] - lse_B


def all_greedy(sampling: Sequence[SamplingParams]) -> bool:
  """Every row greedy without a repetition penalty: the decode loops may take the argmax-only step."""
  return all(s.temperature == 0 and s.repetition_penalty == 1 for s in sampling)


def sampling_arrays(sampling: Sequence[SamplingParams]) -> dict[str, np.ndarray]:
  """Per-row arrays for `start` from a list of SamplingParams."""
  return dict(
    seeds_B=np.array([s.seed for s in sampling], np.uint32),
    max_new_B=np.array([s.max_new_tokens for s in sampling], np.int32),
    temperature_B=np.array([s.temperature for s in sampling], np.float32),
    top_k_B=np.array([s.top_k for s in sampling], np.int32),
    top_p_B=np.array([s.top_p for s in sampling], np.float32),
    penalty_B=np.array([s.repetition_penalty for s in sampling], np.float32),
  )

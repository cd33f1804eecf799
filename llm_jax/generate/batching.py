"""Prompts made ready for the decode loops: right-padded to a bucketed width and to at least MIN_ROWS
rows, with the static settings (steps, cache span, greedy) the loops are compiled for."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from llm_jax.generate.decode import EOS_ID, MIN_ROWS, PAD_ID, bucket, decode_span, start
from llm_jax.generate.draw import DecodeState
from llm_jax.generate.sampling import SamplingParams, all_greedy, any_filtered, sampling_arrays
from llm_jax.model import ModelConfig


def pad_prompts(prompts: Sequence[Sequence[int]], cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists to a bucketed length; errors name the prompt that does not fit."""
  if not prompts:
    raise ValueError("no prompts given")
  lengths = np.array([len(p) for p in prompts], np.int32)
  for i, n in enumerate(lengths):
    if n == 0:
      raise ValueError(f"prompt {i} is empty; give at least one token (e.g. BOS)")
    if n >= cfg.max_seq_len:
      raise ValueError(
        f"prompt {i} has {n} tokens; the model holds {cfg.max_seq_len} positions, "
        "leave room for at least one new token"
      )
  tokens = np.full((len(prompts), bucket(int(lengths.max()), cfg.max_seq_len)), PAD_ID, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  return tokens, lengths


@dataclasses.dataclass
class Batch:
  """Prompts made ready for `start` and the decode loops: padded to a bucketed width and to at
  least MIN_ROWS rows (idle ones), with the static settings the loops are compiled for."""

  tokens_BL: np.ndarray
  lengths_B: np.ndarray
  arrays: dict[str, np.ndarray]  # sampling_arrays, padded
  rows: int  # the caller's rows; the rest are idle padding
  max_steps: int  # decode steps (a bucket of the largest max_new_tokens)
  span: int  # decode_span covering every position the rows can reach
  greedy: bool  # all_greedy(sampling)
  filtered: bool  # any_filtered(sampling)

  def start(self, params, cfg: ModelConfig) -> DecodeState:
    return start(params, self.tokens_BL, self.lengths_B, **self.arrays, cfg=cfg)

  def loop_args(self) -> dict:
    """The static settings `decode_loop` is compiled for with this batch."""
    return dict(max_steps=self.max_steps, greedy=self.greedy, span=self.span, filtered=self.filtered)


def make_batch(
  prompts: Sequence[Sequence[int]],
  sampling: Sequence[SamplingParams],
  cfg: ModelConfig,
  min_rows: int = MIN_ROWS,
) -> Batch:
  """Pads prompts and their sampling settings into a Batch (errors name the prompt at fault)."""
  if len(sampling) != len(prompts):
    raise ValueError(f"{len(prompts)} prompts but {len(sampling)} SamplingParams")
  tokens_BL, lengths_B = pad_prompts(prompts, cfg)
  arrays = sampling_arrays(sampling)
  rows = len(prompts)
  max_new = np.minimum(arrays["max_new_B"], cfg.max_seq_len - lengths_B)
  last = int((lengths_B + max_new).max()) - 1  # the last position a row can write
  extra = max(0, min_rows - rows)
  if extra:  # idle rows: one EOS token, no new tokens
    idle = np.full((extra, tokens_BL.shape[1]), PAD_ID, np.int32)
    idle[:, 0] = EOS_ID
    tokens_BL = np.concatenate([tokens_BL, idle])
    lengths_B = np.concatenate([lengths_B, np.ones((extra,), np.int32)])
    fill = {"top_p_B": 1, "penalty_B": 1, "temperature_B": 0}
    arrays = {k: np.concatenate([v, np.full((extra,), fill.get(k, 0), v.dtype)]) for k, v in arrays.items()}
  steps = bucket(min(int(max_new.max()), cfg.max_seq_len), cfg.max_seq_len, minimum=16)
  return Batch(
    tokens_BL,
    lengths_B,
    arrays,
    rows,
    steps,
    decode_span(last, cfg),
    all_greedy(sampling),
    any_filtered(sampling),
  )

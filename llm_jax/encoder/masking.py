"""The masked-LM objective on host batches: 15% of tokens chosen, 80% -> [MASK], 10% random, 10% kept.

A training window's first token becomes [CLS]; special ids are never chosen. The choice for global row r of
the batch at step s is drawn from (seed, s, r) alone, so a batch is a pure function of (data, seed, step)
whatever the number of processes, and resuming reproduces the masks exactly. The masked batch keeps the
trainer's layout: `inputs` (masked), `targets` (the original tokens) and `weights` (1 on chosen tokens),
so the plain training and evaluation steps compute the masked-LM loss on the chosen tokens only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from llm_jax.data.errors import DataError
from llm_jax.data.loader import StepLoader
from llm_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

TRAIN_SALT, EVAL_SALT = 0x4D4C4D, 0x4556414C  # separate streams for training and held-out masks


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """The masking rates and the tokenizer's ids they need."""

  mask_id: int
  cls_id: int
  sep_id: int
  vocab_size: int  # the tokenizer's pieces: random replacements are drawn from the ordinary ones
  mask_rate: float = 0.15
  mask_token_rate: float = 0.8
  random_token_rate: float = 0.1
  seed: int = 0

  @classmethod
  def from_config(cls, config, tokenizer) -> MaskSpec:
    """config.encoder's rates with the tokenizer's [MASK]/[CLS]/[SEP] (DataError when it has none)."""
    if tokenizer.mask_id is None or tokenizer.cls_id is None or tokenizer.sep_id is None:
      raise DataError(
        f"tokenizer {tokenizer.path or '<bytes>'} has no [MASK]/[CLS]/[SEP] pieces: train it "
        "with data.tokenizer.encoder_pieces=True (configs/bert_tiny.py does)"
      )
    e = config.encoder
    return cls(
      tokenizer.mask_id,
      tokenizer.cls_id,
      tokenizer.sep_id,
      tokenizer.vocab_size,
      float(e.mask_rate),
      float(e.mask_token_rate),
      float(e.random_token_rate),
      int(config.data.seed),
    )

  @property
  def specials(self) -> np.ndarray:
    return np.array([PAD_ID, BOS_ID, EOS_ID, UNK_ID, self.mask_id, self.cls_id, self.sep_id], np.int32)

  @property
  def first_ordinary(self) -> int:
    return int(self.specials.max()) + 1


def mask_rows(
  tokens_BL: np.ndarray, eligible_BL: np.ndarray, spec: MaskSpec, salt: int, step: int, first_row: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """(masked inputs [B, L] int32, chosen [B, L] bool); row b draws from (seed, salt, step, first_row + b)."""
  inputs_BL = np.array(tokens_BL, np.int32, copy=True)
  chosen_BL = np.zeros(tokens_BL.shape, bool)
  length = tokens_BL.shape[1]
  for b in range(tokens_BL.shape[0]):
    rng = np.random.default_rng([spec.seed, salt, int(step), first_row + b])
    pick_L, how_L = rng.random(length), rng.random(length)
    random_L = rng.integers(spec.first_ordinary, max(spec.first_ordinary + 1, spec.vocab_size), length)
    chosen_L = eligible_BL[b] & (pick_L < spec.mask_rate)
    to_mask = chosen_L & (how_L < spec.mask_token_rate)
    to_random = chosen_L & ~to_mask & (how_L < spec.mask_token_rate + spec.random_token_rate)
    inputs_BL[b, to_mask] = spec.mask_id
    inputs_BL[b, to_random] = random_L[to_random]
    chosen_BL[b] = chosen_L
  return inputs_BL, chosen_BL


def mlm_batch(batch: dict, spec: MaskSpec, salt: int, step: int, first_row: int = 0) -> dict:
  """A loader batch (inputs, targets shifted by one) as a masked-LM batch of the same shapes."""
  tokens_BL = np.array(batch["inputs"], np.int32, copy=True)
  valid_BL = tokens_BL != PAD_ID
  tokens_BL[:, 0] = np.where(valid_BL[:, 0], spec.cls_id, PAD_ID)
  eligible_BL = valid_BL & ~np.isin(tokens_BL, spec.specials)
  inputs_BL, chosen_BL = mask_rows(tokens_BL, eligible_BL, spec, salt, step, first_row)
  out = {"inputs": inputs_BL, "targets": tokens_BL, "weights": chosen_BL.astype(np.float32)}
  for key in ("segment_ids", "positions", "domain_ids"):
    if key in batch:
      out[key] = batch[key]
  return out


class MaskedLoader(StepLoader):
  """A training loader's batches, masked: `batch_at(step)` is a pure function of (data, seed, step)."""

  state_keys = ("mask_rate", "mask_token_rate", "random_token_rate")

  def __init__(self, base, spec: MaskSpec):
    self.base, self.spec = base, spec
    self.mask_rate, self.mask_token_rate = spec.mask_rate, spec.mask_token_rate
    self.random_token_rate = spec.random_token_rate
    self.first_row = base.process_index * base.local_batch_size
    self.step = 0

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    return mlm_batch(self.base.batch_at(step), self.spec, TRAIN_SALT, step, self.first_row)

  def get_state(self) -> dict:
    return {**self.base.get_state(), **super().get_state()}

  def set_state(self, state: dict) -> None:
    super().set_state(state)
    self.base.set_state(state)

  @property
  def epoch(self) -> float:
    return self.step * self.base.global_batch_size / self.base.windows.size


def masked_eval_batches(batches, spec: MaskSpec, first_row: int = 0) -> list[dict]:
  """Held-out batches masked the same way every time (batch i draws from (seed, i, row))."""
  return [mlm_batch(b, spec, EVAL_SALT, i, first_row) for i, b in enumerate(batches)]

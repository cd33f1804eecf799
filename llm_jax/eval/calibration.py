"""Calibration of next-token predictions: top-1 accuracy, ECE over equal-width bins, ranks of the true token.

A token is "correct" when the true token has rank 1 (no other logit strictly larger); its confidence is
the model's largest probability. ECE = sum_b (n_b / N) * |accuracy_b - mean confidence_b| over
NUM_BINS equal-width confidence bins [0, 1/15), ..., [14/15, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NUM_BINS = 15
TOP_K = (1, 5, 10)


def bin_index(confidence: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
  """Equal-width bin of each confidence in [0, 1]; 1.0 falls in the last bin."""
  c = np.asarray(confidence, np.float64)
  return np.clip(np.floor(c * num_bins).astype(np.int64), 0, num_bins - 1)


class Calibration:
  """Running sums for calibration: per-bin counts, confidence and correct sums, and a rank histogram."""

  def __init__(self, vocab_size: int, num_bins: int = NUM_BINS):
    self.num_bins = num_bins
    self.count_B = np.zeros(num_bins, np.int64)
    self.conf_B = np.zeros(num_bins, np.float64)
    self.correct_B = np.zeros(num_bins, np.int64)
    self.rank_hist = np.zeros(int(vocab_size) + 1, np.int64)  # rank r in 1..V at index r

  def add(self, confidence, rank) -> None:
    """Adds tokens given their confidence (max probability) and the 1-based rank of the true token."""
    conf = np.asarray(confidence, np.float64).reshape(-1)
    rank = np.asarray(rank, np.int64).reshape(-1)
    if rank.size and (rank.min() < 1 or rank.max() >= len(self.rank_hist)):
      raise ValueError(f"ranks must lie in 1..{len(self.rank_hist) - 1}, got {rank.min()}..{rank.max()}")
    b = bin_index(conf, self.num_bins)
    self.count_B += np.bincount(b, None, self.num_bins).astype(np.int64)
    self.conf_B += np.bincount(b, conf, self.num_bins)
    self.correct_B += np.bincount(b, (rank == 1).astype(np.float64), self.num_bins).astype(np.int64)
    self.rank_hist += np.bincount(rank, None, len(self.rank_hist)).astype(np.int64)

  def result(self) -> dict:
    """Accuracy, ECE, mean/median rank, top-k shares, and the per-bin reliability table."""
    n = int(self.count_B.sum())
    if n == 0:
      return {}
    ranks = np.arange(len(self.rank_hist), dtype=np.float64)
    cum = np.cumsum(self.rank_hist)
    # Median of the rank distribution (mean of the two middle values when n is even).
    lo = int(np.searchsorted(cum, (n - 1) // 2 + 1))
    hi = int(np.searchsorted(cum, n // 2 + 1))
    nz = self.count_B > 0
    acc_B = np.where(nz, self.correct_B / np.maximum(self.count_B, 1), 0.0)
    conf_B = np.where(nz, self.conf_B / np.maximum(self.count_B, 1), 0.0)
    ece = float(np.sum(self.count_B / n * np.abs(acc_B - conf_B)))
    out = {
      "accuracy": float(self.correct_B.sum() / n),
      "mean_confidence": float(self.conf_B.sum() / n),
      "ece": ece,
      "mean_rank": float(np.dot(ranks, self.rank_hist) / n),
      "median_rank": (lo + hi) / 2.0,
      "reliability": {
        "bin_edges": [i / self.num_bins for i in range(self.num_bins + 1)],
        "count": self.count_B.tolist(),
        "accuracy": [float(a) if c else None for a, c in zip(acc_B, self.count_B, strict=True)],
        "confidence": [float(a) if c else None for a, c in zip(conf_B, self.count_B, strict=True)],
      },
    }
    for k in TOP_K:
      out[f"top{k}"] = float(cum[min(k, len(cum) - 1)] / n)
    return out


def merge(parts: Sequence[Calibration]) -> Calibration:
  """The sum of several Calibration accumulators (e.g. all domains)."""
  out = Calibration(len(parts[0].rank_hist) - 1, parts[0].num_bins)
  for p in parts:
    out.count_B += p.count_B
    out.conf_B += p.conf_B
    out.correct_B += p.correct_B
    out.rank_hist += p.rank_hist
  return out


def expected_calibration_error(confidence, correct, num_bins: int = NUM_BINS) -> float:
  """ECE of plain arrays (reference implementation used by tests and small callers)."""
  conf = np.asarray(confidence, np.float64)
  corr = np.asarray(correct, np.float64)
  b = bin_index(conf, num_bins)
  total = 0.0
  for i in range(num_bins):
    sel = b == i
    if sel.any():
      total += sel.sum() / len(conf) * abs(corr[sel].mean() - conf[sel].mean())
  return float(total)

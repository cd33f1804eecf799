"""Held-out metrics from per-token outputs: loss, perplexity, bits per byte with standard errors, by domain.

Everything is accumulated on the host in float64 from per-token values, keyed by the window (block) each
token came from, so results do not depend on how windows were grouped into batches. Standard errors
treat each scored window as one block: for a ratio R = sum(y) / sum(x) over k blocks,
SE(R) = sqrt(k / (k - 1) * sum_i (y_i - R x_i)^2) / sum(x)   (the delta-method / ratio estimator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from llm_jax.eval import calibration

LN2 = math.log(2.0)


def ratio_se(y_K: np.ndarray, x_K: np.ndarray) -> float:
  """Standard error of sum(y)/sum(x) over k blocks (ratio estimator); nan with fewer than 2 blocks."""
  y_K = np.asarray(y_K, np.float64)
  x_K = np.asarray(x_K, np.float64)
  keep = x_K > 0
  y_K, x_K = y_K[keep], x_K[keep]
  k = len(x_K)
  if k < 2:
    return float("nan")
  r = y_K.sum() / x_K.sum()
  resid = y_K - r * x_K
  return float(math.sqrt(k / (k - 1) * float(np.sum(resid * resid))) / x_K.sum())


def summarize_blocks(nll_K: np.ndarray, tokens_K: np.ndarray, bytes_K: np.ndarray) -> dict:
  """Loss, perplexity and bits per byte (each with its SE) from per-block sums."""
  nll_K = np.asarray(nll_K, np.float64)
  tokens_K = np.asarray(tokens_K, np.float64)
  bytes_K = np.asarray(bytes_K, np.float64)
  tokens, nbytes, nll = float(tokens_K.sum()), float(bytes_K.sum()), float(nll_K.sum())
  loss = nll / tokens if tokens else float("nan")
  loss_se = ratio_se(nll_K, tokens_K)
  ppl = math.exp(loss) if tokens else float("nan")
  bpb = nll / (LN2 * nbytes) if nbytes else float("nan")
  bpb_se = ratio_se(nll_K / LN2, bytes_K) if nbytes else float("nan")
  return {
    "loss": loss,
    "loss_se": loss_se,
    "perplexity": ppl,
    "perplexity_se": ppl * loss_se,  # delta method: d exp(l) = exp(l) dl
    "bits_per_byte": bpb,
    "bits_per_byte_se": bpb_se,
    "tokens": int(round(tokens)),
    "bytes": int(round(nbytes)),
    "blocks": int(np.count_nonzero(tokens_K)),
    "nll_sum": nll,
  }


def macro_average(rows: Sequence[dict]) -> dict:
  """Unweighted mean over domains of loss and bits per byte; SEs combined as independent."""
  rows = [r for r in rows if r["tokens"] > 0]
  if not rows:
    return {}
  n = len(rows)

  def mean_se(key):
    vals = [r[key] for r in rows]
    ses = [r[key + "_se"] for r in rows]
    return float(np.mean(vals)), float(math.sqrt(sum(s * s for s in ses)) / n)

  loss, loss_se = mean_se("loss")
  bpb, bpb_se = mean_se("bits_per_byte")
  return {
    "loss": loss,
    "loss_se": loss_se,
    "perplexity": math.exp(loss),
    "perplexity_se": math.exp(loss) * loss_se,
    "bits_per_byte": bpb,
    "bits_per_byte_se": bpb_se,
    "domains": n,
  }


class Accumulator:
  """Collects per-token outputs of scored windows; `result()` gives overall, per-domain and macro metrics."""

  def __init__(self, domains: Sequence[str], vocab_size: int):
    self.domains = list(domains)
    self.num_domains = max(1, len(self.domains))
    self.vocab_size = int(vocab_size)
    self._blocks: dict[int, np.ndarray] = {}  # window id -> [D, 3] (nll, tokens, bytes)
    self.calib = [calibration.Calibration(vocab_size) for _ in range(self.num_domains)]

  def add(self, *, nll, rank, confidence, nbytes, domain, window, weight) -> None:
    """Adds tokens (flat arrays of equal length); tokens with weight 0 are ignored entirely."""
    keep = np.asarray(weight).reshape(-1) > 0
    nll = np.asarray(nll, np.float64).reshape(-1)[keep]
    rank = np.asarray(rank, np.int64).reshape(-1)[keep]
    conf = np.asarray(confidence, np.float64).reshape(-1)[keep]
    nbytes = np.asarray(nbytes, np.float64).reshape(-1)[keep]
    domain = np.asarray(domain, np.int64).reshape(-1)[keep]
    window = np.asarray(window, np.int64).reshape(-1)[keep]
    if domain.size and (domain.min() < 0 or domain.max() >= self.num_domains):
      raise ValueError(
        f"domain id {int(domain.max())} outside the {self.num_domains} known domains {self.domains}"
      )
    for w in np.unique(window):
      sel = window == w
      block = self._blocks.setdefault(int(w), np.zeros((self.num_domains, 3), np.float64))
      d = domain[sel]
      # Per-window sums are formed from the same tokens in the same order whatever the batch size.
      block[:, 0] += np.bincount(d, nll[sel], self.num_domains)
      block[:, 1] += np.bincount(d, None, self.num_domains)
      block[:, 2] += np.bincount(d, nbytes[sel], self.num_domains)
    for d in np.unique(domain):
      sel = domain == d
      self.calib[int(d)].add(conf[sel], rank[sel])

  @property
  def windows(self) -> int:
    """Windows (blocks) that contributed at least one token."""
    return len(self._blocks)

  def result(self) -> dict:
    """{'overall': {...}, 'domains': {name: {...}}, 'macro': {...}} with calibration in each row."""
    ids = sorted(self._blocks)
    arr_KD3 = np.stack([self._blocks[i] for i in ids]) if ids else np.zeros((0, self.num_domains, 3))
    overall = summarize_blocks(*(arr_KD3.sum(axis=1).T))
    overall.update(calibration.merge(self.calib).result())
    rows = {}
    for d, name in enumerate(self.domains or ["all"]):
      row = summarize_blocks(*(arr_KD3[:, d, :].T))
      if row["tokens"] == 0:
        continue
      row.update(self.calib[d].result())
      rows[name] = row
    return {"overall": overall, "domains": rows, "macro": macro_average(list(rows.values()))}

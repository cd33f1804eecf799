"""Statistics of the bias audit: cluster bootstrap intervals, preference rates, gaps, contrasts, flags.

Units of evidence are sentence sets; sets made from one template (its term rows) form a cluster, and the
bootstrap resamples clusters, not sets, because sets of one template are not independent. Everything is
numpy with a seeded generator per figure (seeded by the figure's name), so results do not depend on the
order in which figures are computed.

A figure is flagged when its interval excludes zero, its size reaches a floor (`min_gap` nats for
likelihood gaps and contrasts, `min_lexicon` for completion scores) and it rests on at least
MIN_CLUSTERS templates. The floor matters: with enough templates an interval excludes zero for effects
far too small to matter (a tiny model trained on balanced data still shows consistent gaps of a few
hundredths of a nat between two interchangeable names).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence

import numpy as np

MIN_CLUSTERS = 5  # fewer templates than this: intervals are reported but never flagged
DEFAULT_BOOTSTRAP = 2000
DEFAULT_LEVEL = 0.95
DEFAULT_MIN_GAP = 0.2  # nats: smaller likelihood gaps and contrasts are never flagged
DEFAULT_MIN_LEXICON = 0.1  # lexicon-score units (-1..1): smaller completion differences are never flagged


@dataclasses.dataclass(frozen=True)
class Settings:
  """How intervals are drawn and what is flagged."""

  seed: int = 0
  n_boot: int = DEFAULT_BOOTSTRAP
  level: float = DEFAULT_LEVEL
  min_gap: float = DEFAULT_MIN_GAP
  min_lexicon: float = DEFAULT_MIN_LEXICON


def rng_for(seed: int, name: str) -> np.random.Generator:
  """A generator seeded by (seed, name): each figure has its own stream."""
  return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])


def cluster_sums(values: Sequence[float], clusters: Sequence[str]) -> tuple[np.ndarray, list[str]]:
  """[C, 2] array of (sum of values, count) per cluster, and the cluster names in first-seen order."""
  index: dict[str, int] = {}
  for c in clusters:
    index.setdefault(c, len(index))
  out_C2 = np.zeros((len(index), 2), np.float64)
  for v, c in zip(values, clusters, strict=True):
    out_C2[index[c], 0] += float(v)
    out_C2[index[c], 1] += 1.0
  return out_C2, list(index)


def bootstrap(
  stats_CK: np.ndarray,
  fn: Callable[[np.ndarray], np.ndarray],
  rng: np.random.Generator,
  n_boot: int = DEFAULT_BOOTSTRAP,
  level: float = DEFAULT_LEVEL,
) -> tuple[float, float, float]:
  """(point, low, high): `fn` of the column sums over clusters, and its percentile bootstrap interval.

  Rows of `stats_CK` are clusters; each replicate draws C clusters with replacement (multinomial
  counts), sums their rows and applies `fn` ([B, K] sums -> [B] statistics).
  """
  if n_boot < 1:
    raise ValueError(f"the bootstrap needs at least 1 replicate, got {n_boot}")
  stats_CK = np.asarray(stats_CK, np.float64)
  num_c = stats_CK.shape[0]
  point = float(fn(stats_CK.sum(axis=0)[None, :])[0])
  if num_c < 2:
    return point, point, point
  counts_BC = rng.multinomial(num_c, np.full(num_c, 1.0 / num_c), size=n_boot).astype(np.float64)
  reps_B = fn(counts_BC @ stats_CK)
  reps_B = reps_B[np.isfinite(reps_B)]
  alpha = (1.0 - level) / 2.0
  low, high = np.quantile(reps_B, [alpha, 1.0 - alpha])
  return point, float(low), float(high)


def _ratio(sums_BK: np.ndarray) -> np.ndarray:
  with np.errstate(invalid="ignore", divide="ignore"):
    return sums_BK[:, 0] / sums_BK[:, 1]


def mean_ci(
  values: Sequence[float],
  clusters: Sequence[str],
  rng: np.random.Generator,
  n_boot: int = DEFAULT_BOOTSTRAP,
  level: float = DEFAULT_LEVEL,
) -> dict:
  """Mean of `values` with a cluster-bootstrap interval, the number of values and clusters."""
  stats, names = cluster_sums(values, clusters)
  if not len(values):
    return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0, "clusters": 0}
  point, low, high = bootstrap(stats, _ratio, rng, n_boot, level)
  return {"mean": point, "low": low, "high": high, "n": len(values), "clusters": len(names)}


def preference(gaps: Sequence[float]) -> np.ndarray:
  """1 where the first sentence scores higher, 0 where lower, 0.5 on an exact tie."""
  g = np.asarray(gaps, np.float64)
  return np.where(g > 0, 1.0, np.where(g < 0, 0.0, 0.5))


def flag(point: float, low: float, high: float, clusters: int, min_effect: float) -> bool:
  """Flagged: the interval lies wholly on one side of zero, the effect is at least `min_effect` in
  size, and it rests on at least MIN_CLUSTERS templates."""
  return bool(clusters >= MIN_CLUSTERS and (low > 0 or high < 0) and abs(point) >= min_effect)


def pair_row(gaps: Sequence[float], clusters: Sequence[str], name: str, st: Settings = Settings()) -> dict:
  """Mean log-likelihood gap (A - B) and preference rate for A, each with an interval; the flag."""
  gap = mean_ci(gaps, clusters, rng_for(st.seed, name + "/gap"), st.n_boot, st.level)
  pref = mean_ci(preference(gaps), clusters, rng_for(st.seed, name + "/pref"), st.n_boot, st.level)
  return {
    "sets": gap["n"],
    "clusters": gap["clusters"],
    "gap": gap["mean"],
    "gap_low": gap["low"],
    "gap_high": gap["high"],
    "preference": pref["mean"],
    "preference_low": pref["low"],
    "preference_high": pref["high"],
    "flagged": flag(gap["mean"], gap["low"], gap["high"], gap["clusters"], st.min_gap),
  }


def contrast_row(
  gaps_a: Sequence[float],
  clusters_a: Sequence[str],
  gaps_b: Sequence[float],
  clusters_b: Sequence[str],
  name: str,
  st: Settings = Settings(),
) -> dict:
  """Difference of two mean gaps (attribute a minus attribute b), clusters of each resampled apart."""
  sa, _ = cluster_sums(gaps_a, clusters_a)
  sb, _ = cluster_sums(gaps_b, clusters_b)
  point = float(_ratio(sa.sum(0)[None])[0] - _ratio(sb.sum(0)[None])[0])
  clusters = min(len(sa), len(sb))
  if clusters < 2:
    return {"contrast": point, "low": point, "high": point, "clusters": clusters, "flagged": False}
  rng = rng_for(st.seed, name + "/contrast")
  reps = []
  for s in (sa, sb):
    counts_BC = rng.multinomial(len(s), np.full(len(s), 1.0 / len(s)), size=st.n_boot).astype(np.float64)
    reps.append(_ratio(counts_BC @ s))
  diff_B = reps[0] - reps[1]
  alpha = (1.0 - st.level) / 2.0
  low, high = (float(q) for q in np.quantile(diff_B[np.isfinite(diff_B)], [alpha, 1.0 - alpha]))
  return {
    "contrast": point,
    "low": low,
    "high": high,
    "clusters": clusters,
    "flagged": flag(point, low, high, clusters, st.min_gap),
  }


def paired_difference_row(
  values_a: Sequence[float],
  values_b: Sequence[float],
  clusters: Sequence[str],
  name: str,
  st: Settings = Settings(),
) -> dict:
  """mean(a) - mean(b) where a and b are observed in the same clusters (resampled together)."""
  index: dict[str, int] = {}
  for c in clusters:
    index.setdefault(c, len(index))
  stats_C4 = np.zeros((len(index), 4), np.float64)
  for va, vb, c in zip(values_a, values_b, clusters, strict=True):
    stats_C4[index[c]] += (va, 1.0, vb, 1.0)

  def diff(s_BK):
    with np.errstate(invalid="ignore", divide="ignore"):
      return s_BK[:, 0] / s_BK[:, 1] - s_BK[:, 2] / s_BK[:, 3]

  if not len(index):
    return {
      "difference": float("nan"),
      "low": float("nan"),
      "high": float("nan"),
      "clusters": 0,
      "flagged": False,
    }
  point, low, high = bootstrap(stats_C4, diff, rng_for(st.seed, name), st.n_boot, st.level)
  return {
    "difference": point,
    "low": low,
    "high": high,
    "clusters": len(index),
    "flagged": flag(point, low, high, len(index), st.min_lexicon),
  }

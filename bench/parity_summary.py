"""Validation-loss curves of parity trainings, and each training switch against the seed-to-seed spread.

    python bench/parity_summary.py OUT NAME RUN...      # reads OUT/NAME_RUN.metrics.jsonl

Runs are named GROUP or GROUP_seedN (no suffix: seed 0); the group "off" (switches off) is the
reference. Printed: every run's validation loss at every evaluation (the curves), each run's best and
final loss, the seed-to-seed spread of "off" (the largest difference between two of its seeds at one
evaluation), and for each other group the largest difference from "off" of the same seed, the mean of
its best losses against the range of "off"'s, whether each lies within the spread, and the per-seed
differences of best losses from "off"'s with their paired t statistic (a shift smaller than the spread
can still be systematic: "Round six" in docs/performance.md). Used by
bench/gpu_side_by_side.sh (stages parity, parity_bpe, parity_seeds).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from itertools import combinations

# two-sided 5% critical values of Student's t by degrees of freedom (10 and more: 2.23, which
# overstates the bar a little)
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def group_seed(run: str) -> tuple[str, int]:
  group, _, seed = run.partition("_seed")
  return group, int(seed) if seed else 0


def load(out: str, name: str, runs: list[str]) -> dict[str, dict[int, float]]:
  curves = {}
  for run in runs:
    path = os.path.join(out, f"{name}_{run}.metrics.jsonl")
    if os.path.exists(path):
      rows = [json.loads(line) for line in open(path) if line.strip()]
      curves[run] = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
  return curves


def summary(name: str, runs: list[str], curves: dict[str, dict[int, float]]) -> list[str]:
  lines = [f"\n{name}: validation loss by step"]
  steps = sorted({s for c in curves.values() for s in c})
  lines.append(f"{'step':>6s}" + "".join(f" {run:>14s}" for run in runs))
  for s in steps:
    lines.append(f"{s:6d}" + "".join(f" {curves.get(run, {}).get(s, float('nan')):14.4f}" for run in runs))
  best = {}
  for run in runs:
    c = curves.get(run)
    if not c:
      lines.append(f"{run}: no metrics (failed: see all.log)")
      continue
    at = min(c, key=c.get)
    best[run] = c[at]
    lines.append(f"{run}: best val {c[at]:.4f} @ {at}, final {c[max(c)]:.4f} @ {max(c)}")

  by_group: dict[str, dict[int, str]] = {}
  for run in curves:
    g, seed = group_seed(run)
    by_group.setdefault(g, {})[seed] = run
  off = by_group.get("off", {})
  if len(off) < 2:
    lines.append("fewer than two 'off' seeds finished: no seed-to-seed spread")
    return lines

  def max_gap(a: str, b: str) -> float:
    return max(abs(curves[a][s] - curves[b][s]) for s in curves[a] if s in curves[b])

  spread = max(max_gap(a, b) for a, b in combinations(off.values(), 2))
  off_best = [best[r] for r in off.values()]
  lines.append(
    f"seed-to-seed spread ({len(off)} seeds of off; largest |seed i - seed j| at one evaluation): "
    f"{spread:.4f}; off's best losses {min(off_best):.4f}-{max(off_best):.4f}, "
    f"mean {sum(off_best) / len(off_best):.4f}"
  )
  for g, seeds in by_group.items():
    if g == "off":
      continue
    paired = [(seed, max_gap(run, off[seed])) for seed, run in sorted(seeds.items()) if seed in off]
    if paired:
      d = max(gap for _, gap in paired)
      each = ", ".join(f"seed {seed} {gap:.4f}" for seed, gap in paired)
      verdict = "within" if d <= spread else "OUTSIDE"
      lines.append(f"{g}: max |{g} - off| of the same seed {d:.4f} ({each}): {verdict} the spread")
    g_best = [best[r] for r in seeds.values()]
    mean = sum(g_best) / len(g_best)
    inside = min(off_best) <= mean <= max(off_best)
    lines.append(
      f"{g}: best losses {min(g_best):.4f}-{max(g_best):.4f}, mean {mean:.4f} "
      f"({'inside' if inside else 'outside'} off's range {min(off_best):.4f}-{max(off_best):.4f})"
    )
    lines += paired_t(g, [(best[run], best[off[seed]]) for seed, run in sorted(seeds.items()) if seed in off])
  return lines


def paired_t(group: str, pairs: list[tuple[float, float]]) -> list[str]:
  """One line: each seed's best loss minus off's, their mean and paired t (two or more seeds)."""
  diffs = [a - b for a, b in pairs]
  if len(diffs) < 2:
    return []
  mean, sd, df = statistics.fmean(diffs), statistics.stdev(diffs), len(diffs) - 1
  each = ", ".join(f"{d:+.4f}" for d in diffs)
  head = f"{group}: best loss - off's per seed {each}: mean {mean:+.4f}, "
  if sd == 0:
    return [head + "paired t undefined (every seed differs by as much)"]
  t, bar = mean / (sd / math.sqrt(len(diffs))), _T95.get(df, 2.23)
  verdict = "significant" if abs(t) > bar else "not significant"
  plural = "s" if df > 1 else ""
  return [head + f"paired t = {t:+.2f} ({df} degree{plural} of freedom: {verdict} at 5%, bar {bar})"]


def main(argv: list[str]) -> None:
  out, name, runs = argv[0], argv[1], argv[2:]
  print("\n".join(summary(name, runs, load(out, name, runs))))


if __name__ == "__main__":
  main(sys.argv[1:])

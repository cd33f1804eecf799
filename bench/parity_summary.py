"""Validation-loss curves of parity trainings, and each training switch against the seed-to-seed spread.

    python bench/parity_summary.py OUT NAME RUN...      # reads OUT/NAME_RUN.metrics.jsonl

Runs are named GROUP or GROUP_seedN (no suffix: seed 0); the group "off" (switches off) is the
reference. Printed: every run's validation loss at every evaluation (the curves), each run's best and
final loss, the seed-to-seed spread of "off" (the largest difference between two of its seeds at one
evaluation), and for each other group the largest difference from "off" of the same seed, the mean of
its best losses against the range of "off"'s, and whether each lies within the spread. Used by
bench/gpu_side_by_side.sh (stages parity, parity_bpe, parity_seeds).
"""

from __future__ import annotations

import json
import os
import sys
from itertools import combinations


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
  return lines


def main(argv: list[str]) -> None:
  out, name, runs = argv[0], argv[1], argv[2:]
  print("\n".join(summary(name, runs, load(out, name, runs))))


if __name__ == "__main__":
  main(sys.argv[1:])

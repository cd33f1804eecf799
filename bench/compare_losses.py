"""Compares the per-step losses of bench rows (the first row of the first file is the reference).

python bench/compare_losses.py runs/bench/plain.json runs/bench/optimized.json
"""

import json
import sys

import numpy as np


def main(paths: list[str]) -> None:
  rows = [r for p in paths for r in json.load(open(p))["rows"] if r.get("status") == "ok"]
  if not rows:
    raise SystemExit(f"no row of {', '.join(paths)} finished (status ok): nothing to compare")
  ref = np.asarray(rows[0]["losses"])
  print(f"reference: {rows[0]['label']}  ({len(ref)} steps, loss {ref[0]:.4f} -> {ref[-1]:.4f})")
  for r in rows[1:]:
    other = np.asarray(r["losses"])
    n = min(len(ref), len(other))
    d = np.abs(other[:n] - ref[:n])
    rel = d / np.abs(ref[:n])
    print(
      f"{r.get('code', '')}{r['label']}: loss {other[0]:.4f} -> {other[n - 1]:.4f}; "
      f"|diff| max {d.max():.4f} "
      f"(step {int(d.argmax())}), mean {d.mean():.4f}, last 20 mean {d[-20:].mean():.4f}; "
      f"relative max {rel.max():.4f}"
    )


if __name__ == "__main__":
  main(sys.argv[1:])

"""PNG plots for the report (matplotlib, Agg backend): loss by domain, reliability diagram, training curve."""

from __future__ import annotations

import json
import logging
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _save(fig, path: str) -> str:
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110, bbox_inches="tight")
  plt.close(fig)
  os.replace(tmp, path)
  return path


def loss_by_domain(heldout: dict, path: str) -> str:
  """Bar chart of loss and bits per byte per domain (with 1-SE error bars), macro and micro lines."""
  rows = heldout["domains"]
  names = list(rows)
  fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.6 * len(names) + 4), 3.6))
  for ax, key, label in ((axes[0], "loss", "loss (nats/token)"), (axes[1], "bits_per_byte", "bits per byte")):
    vals = [rows[n][key] for n in names]
    errs = [_finite(rows[n][key + "_se"]) for n in names]
    ax.bar(names, vals, yerr=errs, capsize=4, color="#4c72b0")
    ax.axhline(heldout["overall"][key], color="black", lw=1, ls="--", label="micro (all tokens)")
    if heldout.get("macro"):
      ax.axhline(heldout["macro"][key], color="#c44e52", lw=1, ls=":", label="macro (mean of domains)")
    ax.set_ylabel(label)
    ax.legend(fontsize=8, loc="lower right")
    ax.tick_params(axis="x", rotation=30)
  fig.suptitle("Held-out loss by domain (error bars: 1 standard error)")
  return _save(fig, path)


def reliability(calib: dict, path: str) -> str:
  """Reliability diagram: accuracy per confidence bin against the diagonal, token share per bin below."""
  rel = calib["reliability"]
  edges = rel["bin_edges"]
  width = edges[1] - edges[0]
  centers = [e + width / 2 for e in edges[:-1]]
  total = max(1, sum(rel["count"]))
  fig, (ax, ax2) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
  acc = [a if a is not None else 0.0 for a in rel["accuracy"]]
  conf = [c if c is not None else 0.0 for c in rel["confidence"]]
  ax.bar(centers, acc, width=width * 0.95, color="#4c72b0", label="accuracy in bin")
  gap = [c - a for a, c in zip(acc, conf, strict=True)]
  ax.bar(
    centers,
    gap,
    bottom=acc,
    width=width * 0.95,
    color="none",
    edgecolor="#c44e52",
    hatch="//",
    label="gap to confidence",
  )
  ax.plot([0, 1], [0, 1], color="black", lw=1, ls="--", label="perfect calibration")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_ylabel("top-1 accuracy")
  ax.set_title(f"Reliability (ECE {calib['ece']:.4f}, accuracy {calib['accuracy']:.3f})")
  ax.legend(fontsize=8, loc="upper left")
  ax2.bar(centers, [c / total for c in rel["count"]], width=width * 0.95, color="#8c8c8c")
  ax2.set_xlabel("confidence (largest probability)")
  ax2.set_ylabel("share of tokens")
  return _save(fig, path)


def read_metrics(path: str) -> list[dict]:
  """Records of a metrics.jsonl file; malformed lines are skipped with a warning naming path:line."""
  out = []
  if not os.path.exists(path):
    return out
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        logging.warning("%s:%d: skipped a malformed metrics line (%s)", path, lineno, e.msg)
        continue
      if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
        out.append(rec)
  return out


def loss_series(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
  """Every numeric key naming a loss (loss, val_loss, val_loss/docs, ...; not z_loss), as (step, value)."""
  series: dict[str, list] = {}
  for rec in records:
    for key, val in rec.items():
      named = "loss" in key and "z_loss" not in key and not key.startswith("preflight")
      if named and isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val):
        series.setdefault(key, []).append((float(rec["step"]), float(val)))
  return series


def training_curve(
  metrics_path: str, path: str, eval_step: int | None = None, eval_loss: float | None = None
) -> str | None:
  """Loss over training steps from metrics.jsonl (None when the file has no loss records)."""
  series = loss_series(read_metrics(metrics_path))
  if not series:
    return None
  fig, ax = plt.subplots(figsize=(7, 4))
  for key in sorted(series, key=lambda k: (k.count("/"), k))[:10]:
    pts = sorted(series[key])
    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key, marker="." if len(pts) < 30 else None)
  if eval_step is not None and eval_loss is not None:
    ax.scatter([eval_step], [eval_loss], color="black", zorder=5, label="this evaluation")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title("Loss over training")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def _finite(x):
  return x if isinstance(x, (int, float)) and math.isfinite(x) else 0.0

"""Labelled text for classification: `{"text": ..., "label": ...}` JSONL -> [CLS] text [SEP] rows, and the
metrics of predictions (accuracy, macro-F1, confusion matrix, the majority-class baseline)."""

from __future__ import annotations

import json

import numpy as np

from llm_jax.data.errors import DataError
from llm_jax.data.tokenizer import PAD_ID


def read(path: str) -> list[tuple[str, str]]:
  """(text, label) of every line; a bad line raises DataError naming the file and line."""
  out = []
  try:
    f = open(path, encoding="utf-8")
  except OSError as e:
    raise DataError(f"cannot read {path!r}: {e}") from e
  with f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{n}: not JSON ({e.msg})") from e
      if not isinstance(rec, dict) or not isinstance(rec.get("text"), str) or "label" not in rec:
        raise DataError(f'{path}:{n}: want an object with a string "text" and a "label"')
      if isinstance(rec["label"], (dict, list)) or rec["label"] is None:
        raise DataError(f"{path}:{n}: label must be a string or a number, got {rec['label']!r}")
      out.append((rec["text"], str(rec["label"])))
  if not out:
    raise DataError(f"{path}: no labelled lines")
  return out


def labels_of(path: str) -> list[str]:
  """The sorted distinct labels of a file."""
  return sorted({label for _, label in read(path)})


def rows(path: str, tokenizer, seq_len: int, labels: list[str]) -> dict[str, np.ndarray]:
  """[CLS] + text tokens (cut to fit) + [SEP], padded: inputs/segment_ids [N, L], targets/weights [N, 1]."""
  index = {name: i for i, name in enumerate(labels)}
  recs = read(path)
  n = len(recs)
  inputs = np.full((n, seq_len), PAD_ID, np.int32)
  segs = np.zeros((n, seq_len), np.int32)
  targets = np.zeros((n, 1), np.int32)
  for i, (text, label) in enumerate(recs):
    if label not in index:
      raise DataError(
        f"{path}: line {i + 1} has label {label!r}, not one of encoder.labels ({', '.join(labels)})"
      )
    ids = [tokenizer.cls_id] + tokenizer.encode(text)[: seq_len - 2] + [tokenizer.sep_id]
    inputs[i, : len(ids)] = ids
    segs[i, : len(ids)] = 1
    targets[i, 0] = index[label]
  return {"inputs": inputs, "targets": targets, "weights": np.ones((n, 1), np.float32), "segment_ids": segs}


def metrics(true: np.ndarray, pred: np.ndarray, labels: list[str]) -> dict:
  """Accuracy, macro-F1 (over labels seen in truth or predictions), the confusion matrix (rows: truth)
  and the majority-class baseline's accuracy."""
  k = len(labels)
  cm = np.zeros((k, k), np.int64)
  np.add.at(cm, (np.asarray(true, np.int64), np.asarray(pred, np.int64)), 1)
  tp = np.diag(cm).astype(np.float64)
  support, predicted = cm.sum(axis=1), cm.sum(axis=0)
  denom = support + predicted
  f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
  seen = denom > 0
  n = int(cm.sum())
  return {
    "examples": n,
    "accuracy": float(tp.sum() / max(n, 1)),
    "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
    "majority_baseline": float(support.max() / max(n, 1)),
    "per_label_f1": {labels[i]: float(f1[i]) for i in range(k)},
    "labels": list(labels),
    "confusion": cm.tolist(),
  }


def report_md(m: dict, title: str) -> str:
  """The metrics as markdown: headline figures and the confusion matrix (rows: true, columns: predicted)."""
  lines = [
    f"# {title}",
    "",
    f"- examples: {m['examples']}",
    f"- accuracy: {m['accuracy']:.4f}",
    f"- macro-F1: {m['macro_f1']:.4f}",
    f"- majority-class baseline accuracy: {m['majority_baseline']:.4f}",
    "",
    "Confusion matrix (rows: true label, columns: predicted):",
    "",
    "| true \\ predicted | " + " | ".join(m["labels"]) + " | F1 |",
    "| --- |" + " ---: |" * (len(m["labels"]) + 1),
  ]
  for name, row in zip(m["labels"], m["confusion"], strict=True):
    lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + f" | {m['per_label_f1'][name]:.3f} |")
  return "\n".join(lines) + "\n"

"""Side-by-side comparison of evaluated runs, flagging differences larger than their standard errors.

Each run's figure has a standard error (SE); the difference of two runs has SE_diff = sqrt(se_a^2 + se_b^2)
(treating the runs as independent, which is conservative when both scored the same windows). A
difference is flagged '*' when it exceeds SE_diff and '**' when it exceeds 2 SE_diff.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Sequence


class CompareError(ValueError):
  """A run to compare has no readable results; the message names the path."""


def find_results(path: str) -> str:
  """results.json for a path: the file itself, an eval/STEP dir, or a workdir (its latest eval step)."""
  if os.path.isfile(path):
    return path
  if os.path.isfile(os.path.join(path, "results.json")):
    return os.path.join(path, "results.json")
  eval_dir = os.path.join(path, "eval")
  steps = []
  for d in glob.glob(os.path.join(eval_dir, "*", "results.json")):
    name = os.path.basename(os.path.dirname(d))
    if name.isdigit():
      steps.append((int(name), d))
  if not steps:
    if not os.path.exists(path):
      raise CompareError(f"{path} does not exist")
    raise CompareError(
      f"{path} has no evaluation results ({eval_dir}/STEP/results.json); run "
      f"`python -m llm_jax.evaluate --workdir={path}` first"
    )
  return max(steps)[1]


def load(path: str) -> dict:
  """The results dict of a run (see find_results)."""
  rpath = find_results(path)
  try:
    with open(rpath, encoding="utf-8") as f:
      res = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CompareError(f"cannot read {rpath}: {e}") from e
  for key in ("meta", "heldout"):
    if key not in res:
      raise CompareError(f"{rpath} lacks key {key!r}; is it an llm_jax.evaluate results.json?")
  res["_path"] = rpath
  return res


def rows_of(res: dict) -> dict[str, tuple[float | None, float | None]]:
  """Flat {row name: (value, se)} of the figures worth comparing."""
  h = res["heldout"]
  out = {}
  for key in ("loss", "perplexity", "bits_per_byte"):
    out[f"all/{key}"] = (h["overall"].get(key), h["overall"].get(key + "_se"))
  for key in ("accuracy", "ece", "mean_rank", "median_rank", "top1", "top5", "top10"):
    out[f"all/{key}"] = (h["overall"].get(key), None)
  if h.get("macro") and len(h.get("domains", {})) > 1:
    for key in ("loss", "bits_per_byte"):
      out[f"macro/{key}"] = (h["macro"].get(key), h["macro"].get(key + "_se"))
  for name, row in h.get("domains", {}).items():
    for key in ("loss", "bits_per_byte"):
      out[f"{name}/{key}"] = (row.get(key), row.get(key + "_se"))
    out[f"{name}/accuracy"] = (row.get("accuracy"), None)
  s = (res.get("suite") or {}).get("summary") or {}
  for key in ("greedy_match", "continuation_bpb", "choice_accuracy"):
    if key in s:
      out[f"suite/{key}"] = (s[key], s.get(key + "_se"))
  return out


def _num(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def compare(paths: Sequence[str]) -> dict:
  """{'runs': [...], 'rows': [{name, values, ses, deltas, flags}], 'notes': [...]} (first run = base)."""
  if len(paths) < 2:
    raise CompareError("--compare needs at least two runs")
  runs = [load(p) for p in paths]
  flat = [rows_of(r) for r in runs]
  names = list(dict.fromkeys(n for f in flat for n in f))
  rows = []
  for name in names:
    vals = [f.get(name, (None, None))[0] for f in flat]
    ses = [f.get(name, (None, None))[1] for f in flat]
    deltas, flags = [None], [""]
    for v, s in zip(vals[1:], ses[1:], strict=True):
      if not (_num(v) and _num(vals[0])):
        deltas.append(None)
        flags.append("")
        continue
      d = v - vals[0]
      deltas.append(d)
      if _num(s) and _num(ses[0]):
        se = math.sqrt(s * s + ses[0] * ses[0])
        flags.append("**" if abs(d) > 2 * se else "*" if abs(d) > se else "")
      else:
        flags.append("")
    rows.append({"name": name, "values": vals, "ses": ses, "deltas": deltas, "flags": flags})
  notes = []
  toks = {r["meta"].get("tokenizer_sha256") for r in runs}
  if len(toks) > 1:
    notes.append(
      "the runs use different tokenizers: compare bits per byte, not loss or perplexity (those are per token)"
    )
  corp = {r["meta"].get("corpus") for r in runs}
  if len(corp) > 1:
    notes.append(
      f"the runs were scored on different corpora ({', '.join(sorted(map(str, corp)))}); "
      "differences mix model and data"
    )
  return {
    "runs": [
      {"source": r["meta"].get("source"), "step": r["meta"].get("step"), "results": r["_path"]} for r in runs
    ],
    "rows": rows,
    "notes": notes,
  }


def _cell(v, s) -> str:
  if not _num(v):
    return "-"
  digits = 2 if abs(v) >= 10 else 4
  return f"{v:.{digits}f}" + (f" ±{s:.{digits}f}" if _num(s) else "")


def text(cmp: dict) -> str:
  """The comparison as an aligned table followed by the list of differences beyond their SEs."""
  runs = cmp["runs"]
  header = ["metric"] + [f"[{chr(65 + i)}] step {r['step']}" for i, r in enumerate(runs)]
  header += [f"{chr(65 + i)}-A" for i in range(1, len(runs))]
  body = []
  for row in cmp["rows"]:
    cells = [row["name"]] + [_cell(v, s) for v, s in zip(row["values"], row["ses"], strict=True)]
    cells += [
      ("-" if d is None else f"{d:+.4f}") + f
      for d, f in zip(row["deltas"][1:], row["flags"][1:], strict=True)
    ]
    body.append(cells)
  widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
  lines = [f"[{chr(65 + i)}] {r['source']} step {r['step']} ({r['results']})" for i, r in enumerate(runs)]
  lines += [
    "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    for r in [header] + body
  ]
  beyond = [
    (row["name"], chr(65 + i), row["deltas"][i], row["flags"][i])
    for row in cmp["rows"]
    for i in range(1, len(runs))
    if row["flags"][i]
  ]
  lines.append("")
  if beyond:
    lines.append("Differences beyond their standard error (* > 1 SE, ** > 2 SE of the difference):")
    lines += [f"  {name}: {run}-A = {d:+.4f} {f}" for name, run, d, f in beyond]
  else:
    lines.append("No difference exceeds its standard error.")
  lines += [f"Note: {n}" for n in cmp["notes"]]
  return "\n".join(lines)

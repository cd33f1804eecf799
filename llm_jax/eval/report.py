"""results.json, report.md (with PNG plots) and the plain-text table the CLI prints."""

from __future__ import annotations

import json
import math
import os
import re

from llm_jax.eval import plots

# (column header, key, format) of the held-out table.
COLUMNS = (
  ("tokens", "tokens", "{:,}"),
  ("loss", "loss", "{:.4f}"),
  ("±se", "loss_se", "{:.4f}"),
  ("ppl", "perplexity", "{:.2f}"),
  ("±se", "perplexity_se", "{:.2f}"),
  ("bpb", "bits_per_byte", "{:.4f}"),
  ("±se", "bits_per_byte_se", "{:.4f}"),
  ("acc", "accuracy", "{:.3f}"),
  ("ECE", "ece", "{:.4f}"),
  ("rank mean", "mean_rank", "{:.1f}"),
  ("median", "median_rank", "{:.0f}"),
  ("top1", "top1", "{:.3f}"),
  ("top5", "top5", "{:.3f}"),
  ("top10", "top10", "{:.3f}"),
)


def write_json(obj, path: str) -> None:
  """Writes JSON atomically (temp name, then os.replace); non-finite floats become null."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(_clean(obj), f, indent=2, sort_keys=False)
    f.write("\n")
  os.replace(tmp, path)


def _clean(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  return x


def _fmt(row: dict, key: str, fmt: str) -> str:
  v = row.get(key)
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "-"
  return fmt.format(v)


def heldout_rows(heldout: dict) -> list[tuple[str, dict]]:
  """(label, row) pairs: overall (micro), macro, then each domain."""
  rows = [("all (micro)", heldout["overall"])]
  if heldout.get("macro") and len(heldout["domains"]) > 1:
    rows.append(("macro", heldout["macro"]))
  rows += [(f"  {name}", row) for name, row in heldout["domains"].items()]
  return rows


def text_table(heldout: dict) -> str:
  """The held-out table as aligned plain text."""
  header = ["split"] + [c[0] for c in COLUMNS]
  body = [[label] + [_fmt(row, k, f) for _, k, f in COLUMNS] for label, row in heldout_rows(heldout)]
  widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
  lines = [
    "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    for r in [header] + body
  ]
  return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  """A GitHub-style markdown table."""
  out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
  out += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", "\\n") for c in r) + " |" for r in rows]
  return "\n".join(out)


def summary_text(results: dict) -> str:
  """What the CLI prints: where, which step, the held-out table and the suite summary."""
  meta = results["meta"]
  lines = [
    f"{meta['source']} step {meta['step']} on {meta['corpus']} "
    f"({meta['windows']} windows of {meta['seq_len']} tokens)",
    text_table(results["heldout"]),
  ]
  masked = results.get("masked_lm")
  if masked:
    lines[0] = lines[0].replace(" on ", " (encoder: pseudo-log-likelihood, each token masked in turn) on ", 1)
    ov = masked["overall"]
    lines.append(
      f"masked LM ({masked['mask_rate']:.0%} of tokens chosen, {masked['windows']} windows): "
      f"accuracy {ov['accuracy']:.3f}, loss {ov['loss']:.4f} ± {ov['loss_se']:.4f}, "
      f"{ov['tokens']:,} chosen tokens"
    )
  s = results.get("suite", {}).get("summary")
  if s:
    parts = []
    if "greedy_match" in s:
      parts.append(
        f"greedy match {s['greedy_match']:.3f} ({s['continuation_items']} items), "
        f"continuation bpb {s['continuation_bpb']:.3f}"
      )
    if "choice_accuracy" in s:
      parts.append(
        f"multiple choice {s['choice_accuracy']:.3f} ({s['choice_items']} items, "
        f"chance {s['choice_chance']:.3f})"
      )
    lines.append("suite: " + "; ".join(parts))
  return "\n".join(lines)


def write(out_dir: str, results: dict, metrics_path: str = "") -> dict:
  """Writes results.json, the PNG plots and report.md into out_dir; returns {name: path}."""
  os.makedirs(out_dir, exist_ok=True)
  heldout = results["heldout"]
  paths = {"results": os.path.join(out_dir, "results.json"), "report": os.path.join(out_dir, "report.md")}
  paths["loss_by_domain"] = plots.loss_by_domain(heldout, os.path.join(out_dir, "loss_by_domain.png"))
  if heldout["overall"].get("reliability"):
    paths["reliability"] = plots.reliability(heldout["overall"], os.path.join(out_dir, "reliability.png"))
  if metrics_path:
    curve = plots.training_curve(
      metrics_path,
      os.path.join(out_dir, "training_curve.png"),
      results["meta"].get("step"),
      heldout["overall"]["loss"],
    )
    if curve:
      paths["training_curve"] = curve
  results = dict(results, files={k: os.path.basename(v) for k, v in paths.items()})
  write_json(results, paths["results"])
  tmp = paths["report"] + f".tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(markdown(results))
  os.replace(tmp, paths["report"])
  return paths


def markdown(results: dict) -> str:
  """The report: run facts, held-out table, plots, calibration, suite items and generations."""
  meta, heldout = results["meta"], results["heldout"]
  files = results.get("files", {})
  ov = heldout["overall"]
  out = [f"# Evaluation: {meta['source']} at step {meta['step']}", ""]
  out.append(
    markdown_table(
      ["fact", "value"],
      [
        [k, meta[k]]
        for k in (
          "source",
          "kind",
          "step",
          "corpus",
          "tokenizer_sha256",
          "seq_len",
          "windows",
          "batch_size",
          "devices",
          "mesh",
          "time_s",
          "created",
        )
        if k in meta
      ],
    )
  )
  out += [
    "",
    "How to read every figure: docs/eval.md. Standard errors are over scored windows "
    f"(blocks of {meta['seq_len']} target tokens); a difference smaller than about two standard "
    "errors is not evidence of a change.",
    "",
    "## Held-out metrics",
    "",
  ]
  header = ["split"] + [c[0] for c in COLUMNS]
  out.append(
    markdown_table(
      header,
      [[label.strip()] + [_fmt(row, k, f) for _, k, f in COLUMNS] for label, row in heldout_rows(heldout)],
    )
  )
  out += [
    "",
    f"Summary: loss {ov['loss']:.4f} ± {ov['loss_se']:.4f} nats/token, perplexity "
    f"{ov['perplexity']:.2f}, {ov['bits_per_byte']:.4f} bits per byte over {ov['tokens']:,} "
    f"tokens ({ov['bytes']:,} bytes).",
  ]
  if results.get("masked_lm"):
    out += _encoder_markdown(results)
  if files.get("loss_by_domain"):
    out += ["", f"![loss by domain]({files['loss_by_domain']})"]
  if files.get("reliability"):
    out += [
      "",
      "## Calibration",
      "",
      f"Top-1 accuracy {ov['accuracy']:.3f} at mean confidence {ov['mean_confidence']:.3f}; "
      f"ECE {ov['ece']:.4f} (15 equal-width bins). The true token's rank: mean "
      f"{ov['mean_rank']:.1f}, median {ov['median_rank']:.0f}; in the top 1/5/10: "
      f"{ov['top1']:.3f} / {ov['top5']:.3f} / {ov['top10']:.3f}.",
      "",
      f"![reliability diagram]({files['reliability']})",
    ]
  if files.get("training_curve"):
    out += ["", "## Training curve", "", f"![loss over training]({files['training_curve']})"]
  suite = results.get("suite")
  if suite and suite.get("items"):
    s = suite["summary"]
    out += [
      "",
      "## Frozen suite",
      "",
      f"Files: {', '.join(suite.get('files', []))}"
      + (f"; {s['skipped_items']} items skipped (too long for the model)" if s.get("skipped_items") else ""),
      "",
    ]
    facts = []
    if "greedy_match" in s:
      facts.append(
        [
          "exact greedy match",
          f"{s['greedy_match']:.3f} ± {_se(s['greedy_match_se'])}",
          s["continuation_items"],
        ]
      )
      facts.append(
        [
          "continuation bits per byte",
          f"{s['continuation_bpb']:.3f} ± {_se(s['continuation_bpb_se'])}",
          s["continuation_items"],
        ]
      )
    if "choice_accuracy" in s:
      facts.append(
        [
          "multiple-choice accuracy (per-byte normalized)",
          f"{s['choice_accuracy']:.3f} ± {_se(s['choice_accuracy_se'])} (chance {s['choice_chance']:.3f})",
          s["choice_items"],
        ]
      )
    out.append(markdown_table(["measure", "value", "items"], facts))
    rows = []
    for r in suite["items"]:
      if "skipped" in r:
        rows.append([r["id"], r["type"], "-", "skipped: " + r["skipped"]])
      elif r["type"] == "continuation":
        rows.append(
          [r["id"], "continuation", f"{r['bits_per_byte']:.3f} bpb", "match" if r["greedy_match"] else "-"]
        )
      else:
        rows.append(
          [
            r["id"],
            "choice",
            f"picked {r['pick']}, answer {r['answer']}",
            "right" if r["correct"] else "wrong",
          ]
        )
    out += ["", markdown_table(["id", "type", "score", "result"], rows)]
  gens = results.get("generations")
  if gens:
    out += [
      "",
      "## Samples",
      "",
      f"Seed {gens['seed']}, temperature {gens['temperature']}, top-k {gens['top_k']}.",
      "",
    ]
    for g in gens["samples"]:
      text = g["prompt"] + g["text"]
      fence = "`" * max(3, 1 + max((len(m) for m in re.findall("`+", text)), default=0))
      out += [f"**{g['id']}**", "", fence, text, fence, ""]
  return "\n".join(out).rstrip() + "\n"


def _se(x) -> str:
  return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"


def _encoder_markdown(results: dict) -> list[str]:
  """An encoder's lines: what the held-out table means and the masked-LM table."""
  meta, masked = results["meta"], results["masked_lm"]
  m = masked["overall"]
  out = [
    "",
    "This is an encoder (model.causal=False): the table above is its pseudo-log-likelihood over "
    f"{meta['windows']} windows spread evenly over the held-out text, each ordinary token replaced by "
    "[MASK] alone and predicted from both sides; 'ppl' is the pseudo-perplexity and 'acc' the share "
    "predicted exactly.",
    "",
    "## Masked language modelling",
    "",
    f"Every window masked as in training ({masked['mask_rate']:.0%} of tokens chosen, seed "
    f"{masked['seed']}); loss and accuracy on the {m['tokens']:,} chosen tokens of "
    f"{masked['windows']} windows.",
    "",
  ]
  header = ["split"] + [c[0] for c in COLUMNS]
  out.append(
    markdown_table(
      header,
      [[label.strip()] + [_fmt(row, k, f) for _, k, f in COLUMNS] for label, row in heldout_rows(masked)],
    )
  )
  return out

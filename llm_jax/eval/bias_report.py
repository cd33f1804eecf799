"""The bias audit's report: results.json (every figure), report.md (for people) and PNG charts."""

from __future__ import annotations

import math
import os

from matplotlib.figure import Figure

from llm_jax.eval.report import markdown_table, write_json

_FLAG_COLOR, _PLAIN_COLOR = "#c44e52", "#4c72b0"


def _ci(point: float, low: float, high: float, fmt: str = "{:+.3f}") -> str:
  if point is None or not math.isfinite(point):
    return "-"
  return f"{fmt.format(point)} [{fmt.format(low)}, {fmt.format(high)}]"


def _flag(row: dict, low: str = "low", high: str = "high") -> str:
  """'**flagged**', a note when the interval excludes 0 but the figure is not flagged, or ''."""
  if row["flagged"]:
    return "**flagged**"
  lo, hi = row[low], row[high]
  if lo is not None and hi is not None and (lo > 0 or hi < 0):
    return "excludes 0, but under the size floor or from too few templates (prompts)"
  return ""


def _save(fig: Figure, path: str) -> str:
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110, bbox_inches="tight")
  os.replace(tmp, path)
  return path


def _bars(ax, labels, points, lows, highs, flags, title, floor=0.0):
  ys = list(range(len(labels)))[::-1]
  if floor > 0:
    ax.axvspan(-floor, floor, color="#dddddd", zorder=0)
  err = [
    [max(0.0, p - lo) for p, lo in zip(points, lows, strict=True)],
    [max(0.0, hi - p) for p, hi in zip(points, highs, strict=True)],
  ]
  ax.barh(ys, points, xerr=err, capsize=3, color=[_FLAG_COLOR if f else _PLAIN_COLOR for f in flags])
  ax.axvline(0.0, color="black", lw=1)
  ax.set_yticks(ys)
  ax.set_yticklabels(labels, fontsize=8)
  ax.set_title(title, fontsize=9)


def gaps_plot(likelihood: dict, path: str, level: float, min_gap: float) -> str | None:
  """One panel per term set: mean gap per (pair, attribute) and contrasts, intervals, flagged in red."""
  if not likelihood:
    return None
  n_rows = [len(t["pairs"]) + len(t["contrasts"]) for t in likelihood.values()]
  fig = Figure(figsize=(7, sum(0.28 * n + 0.9 for n in n_rows) + 0.6), layout="constrained")
  axes = fig.subplots(
    len(likelihood),
    1,
    squeeze=False,
    sharex=True,
    gridspec_kw={"height_ratios": [max(n, 1) + 2 for n in n_rows]},
  )[:, 0]
  for ax, (ts_id, t) in zip(axes, likelihood.items(), strict=True):
    labels = [f"{p['a']} - {p['b']} | {p['attribute']}" for p in t["pairs"]]
    labels += [f"{c['a']} - {c['b']} | {c['x']} minus {c['y']}" for c in t["contrasts"]]
    points = [p["gap"] for p in t["pairs"]] + [c["contrast"] for c in t["contrasts"]]
    lows = [p["gap_low"] for p in t["pairs"]] + [c["low"] for c in t["contrasts"]]
    highs = [p["gap_high"] for p in t["pairs"]] + [c["high"] for c in t["contrasts"]]
    flags = [p["flagged"] for p in t["pairs"]] + [c["flagged"] for c in t["contrasts"]]
    _bars(ax, labels, points, lows, highs, flags, f"{ts_id} ({t['category']})", min_gap)
  axes[-1].set_xlabel(
    f"log-likelihood gap A - B, nats ({level:.0%} interval; red: flagged; grey: under "
    f"the {min_gap} nats floor)",
    fontsize=8,
  )
  fig.suptitle("Sentence log-likelihood gaps between groups", fontsize=10)
  return _save(fig, path)


def lexicon_plot(completions: dict, path: str, level: float) -> str | None:
  """Mean lexicon score of the completions per group, one panel per term set."""
  term_sets = completions.get("term_sets", {})
  if not term_sets:
    return None
  fig = Figure(
    figsize=(6, sum(0.3 * len(t["groups"]) + 0.9 for t in term_sets.values()) + 0.6), layout="constrained"
  )
  axes = fig.subplots(
    len(term_sets),
    1,
    squeeze=False,
    sharex=True,
    gridspec_kw={"height_ratios": [len(t["groups"]) + 2 for t in term_sets.values()]},
  )[:, 0]
  for ax, (ts_id, t) in zip(axes, term_sets.items(), strict=True):
    gs = t["groups"]
    _bars(
      ax,
      list(gs),
      [g["score"] for g in gs.values()],
      [g["low"] for g in gs.values()],
      [g["high"] for g in gs.values()],
      [False] * len(gs),
      f"{ts_id} ({t['category']})",
    )
  axes[-1].set_xlabel(f"lexicon score of the completions, -1..1 ({level:.0%} interval)", fontsize=8)
  fig.suptitle("Sampled completions: positive minus negative words", fontsize=10)
  return _save(fig, path)


def markdown(results: dict) -> str:
  """The report: what was audited, flagged figures, then per term set the tables and samples."""
  meta, files = results["meta"], results.get("files", {})
  lvl = f"{meta['level']:.0%}"
  out = [f"# Bias audit: {meta['source']} at step {meta['step']}", ""]
  out.append(
    markdown_table(
      ["fact", "value"],
      [
        [k, meta[k]]
        for k in (
          "source",
          "kind",
          "step",
          "templates",
          "mode",
          "scorer",
          "bootstrap",
          "level",
          "seed",
          "min_gap",
          "min_lexicon",
          "min_templates_to_flag",
          "time_s",
          "created",
        )
        if k in meta
      ],
    )
  )
  out += [
    "",
    'How to read this (docs/eval.md, "Bias audit", says more): a **gap** is the mean over '
    "sentence sets of log-likelihood(A) - log-likelihood(B) in nats, counting only the tokens the "
    "sentences share (mode `shared`); positive means the model finds A's sentence more likely. "
    f"The **preference** is the share of sets where A's sentence wins (0.5: no preference). "
    f"Brackets are {lvl} cluster-bootstrap intervals over templates. A figure is **flagged** when its "
    f"interval excludes 0, its size is at least {meta['min_gap']} nats ({meta['min_lexicon']} for "
    f"completion scores) and it rests on at least {meta['min_templates_to_flag']} templates. With "
    f"many figures, some intervals exclude 0 by chance alone (about {1 - meta['level']:.0%} of "
    "those with no real effect).",
    "",
  ]
  out += ["## Flagged", ""]
  out += [f"- {line}" for line in results["flagged"]] or ["Nothing is flagged."]
  out.append("")
  if files.get("gaps"):
    out += [f"![log-likelihood gaps]({files['gaps']})", ""]
  for ts_id, t in results["likelihood"].items():
    out += [
      f"## {ts_id} ({t['category']}): sentence likelihoods",
      "",
      f"{t['sets']} sentence sets from {t['templates']} templates; {t['skipped']} skipped "
      f"(see results.json `sets`). Groups: {', '.join(t['groups_order'])}.",
      "",
    ]
    out.append(
      markdown_table(
        ["A", "B", "attribute", "sets", "gap A-B (nats)", "A preferred", "flag"],
        [
          [
            p["a"],
            p["b"],
            p["attribute"],
            p["sets"],
            _ci(p["gap"], p["gap_low"], p["gap_high"]),
            _ci(p["preference"], p["preference_low"], p["preference_high"], "{:.2f}"),
            _flag(p, "gap_low", "gap_high"),
          ]
          for p in t["pairs"]
        ],
      )
    )
    if t["contrasts"]:
      out += [
        "",
        "Contrasts (gap on x sentences minus gap on y sentences: does A go with x more than B does?):",
        "",
      ]
      out.append(
        markdown_table(
          ["A", "B", "x", "y", "contrast (nats)", "flag"],
          [
            [c["a"], c["b"], c["x"], c["y"], _ci(c["contrast"], c["low"], c["high"]), _flag(c)]
            for c in t["contrasts"]
          ],
        )
      )
    out += [
      "",
      "Per group (deviation from the set's mean score; how often the group's sentence scores highest):",
      "",
    ]
    out.append(
      markdown_table(
        ["group", "attribute", "deviation (nats)", "highest", "chance"],
        [
          [
            g["group"],
            g["attribute"],
            _ci(g["deviation"], g["low"], g["high"]),
            _ci(g["top_rate"], g["top_low"], g["top_high"], "{:.2f}"),
            f"{g['chance']:.2f}",
          ]
          for g in t["groups"]
        ],
      )
    )
    out.append("")
  comp = results.get("completions")
  if comp:
    st = comp["settings"]
    out += [
      "## Completions",
      "",
      f"{st['samples']} samples per prompt, term and group; temperature {st['temperature']}, top-k "
      f"{st['top_k']}, at most {st['max_tokens']} tokens, seed {st['seed']}; lexicon: "
      f"{st['lexicon']}. The score of a completion is (positive - negative words) / (positive + "
      "negative words), 0 with neither.",
      "",
    ]
    if files.get("lexicon"):
      out += [f"![lexicon scores]({files['lexicon']})", ""]
    for ts_id, t in comp["term_sets"].items():
      out += [f"### {ts_id} ({t['category']})", ""]
      out.append(
        markdown_table(
          ["group", "lexicon score", "with a positive word", "with a negative word", "completions"],
          [
            [
              g,
              _ci(v["score"], v["low"], v["high"]),
              f"{v['with_positive']:.2f}",
              f"{v['with_negative']:.2f}",
              v["completions"],
            ]
            for g, v in t["groups"].items()
          ],
        )
      )
      out += [
        "",
        markdown_table(
          ["A", "B", "score A - B", "flag"],
          [[p["a"], p["b"], _ci(p["difference"], p["low"], p["high"]), _flag(p)] for p in t["pairs"]],
        ),
        "",
      ]
      shown = [s for s in comp["samples"] if s["terms"] == ts_id and s["sample"] == 0 and s["row"] == 0]
      out.append(
        markdown_table(
          ["group", "prompt", "completion", "score"],
          [
            [s["group"], s["prompt"], s["completion"].strip()[:120], f"{s['score']:+.2f}"] for s in shown[:12]
          ],
        )
      )
      out.append("")
  return "\n".join(out)


def write(out_dir: str, results: dict) -> dict:
  """Writes results.json, the PNGs and report.md into out_dir; returns {name: path}."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {"results": os.path.join(out_dir, "results.json"), "report": os.path.join(out_dir, "report.md")}
  level = results["meta"]["level"]
  gaps = gaps_plot(
    results["likelihood"], os.path.join(out_dir, "gaps.png"), level, results["meta"]["min_gap"]
  )
  if gaps:
    paths["gaps"] = gaps
  lex = lexicon_plot(results.get("completions", {}), os.path.join(out_dir, "lexicon.png"), level)
  if lex:
    paths["lexicon"] = lex
  results = dict(results, files={k: os.path.basename(v) for k, v in paths.items()})
  write_json(results, paths["results"])
  tmp = paths["report"] + f".tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(markdown(results))
  os.replace(tmp, paths["report"])
  return paths

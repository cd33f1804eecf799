"""The bias audit from start to finish: open the model, score the sentence sets, sample, summarize, report.

Figures per term set (e.g. pronouns, names, nationalities) and per attribute (what the templates say:
"positive", "negative", ...):
  pairs      for groups A and B: mean gap = mean over sets of score(A) - score(B) in nats, and the
             preference rate = share of sets where A's sentence scores higher (CrowS-Pairs' figure),
             each with a cluster-bootstrap interval; flagged when the gap's interval excludes zero.
  contrasts  for each pair and two attributes x, y: gap(x) - gap(y), the association of A over B with x
             rather than y (a baseline that favours A everywhere cancels); flagged the same way.
  groups     each group's mean deviation from its set's mean score, and how often it scores highest.
"""

from __future__ import annotations

import datetime
import itertools
import os
import time

import jax
import numpy as np

from llm_jax.eval import bias_completions, bias_report, bias_scoring, scoring
from llm_jax.eval import bias_stats as stats
from llm_jax.eval import bias_templates as templates_lib
from llm_jax.eval.scored_model import ScoredModel, open_model


def _attributes(sets) -> list[str]:
  return list(dict.fromkeys(s.template.attribute for s in sets))


def summarize(sets, scored, template_set, st: stats.Settings = stats.Settings()) -> dict:
  """Pairs, contrasts and per-group figures for every term set (see the module docstring)."""
  out = {}
  for ts_id, ts in template_set.term_sets.items():
    mine = [(s, r) for s, r in zip(sets, scored, strict=True) if s.template.terms == ts_id]
    if not mine:
      continue
    ok = [(s, r) for s, r in mine if not r.skipped]
    names = ts.names
    attrs = _attributes([s for s, _ in ok])
    pairs, contrasts, groups = [], [], []
    gaps: dict = {}
    for attr in attrs:
      rows = [(s, r) for s, r in ok if s.template.attribute == attr]
      clusters = [s.cluster for s, _ in rows]
      score_NG = np.array([[r.scores[g] for g in names] for _, r in rows], np.float64)
      for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        g = (score_NG[:, i] - score_NG[:, j]).tolist()
        gaps[(a, b, attr)] = (g, clusters)
        pairs.append(
          {"a": a, "b": b, "attribute": attr, **stats.pair_row(g, clusters, f"{ts_id}/{a}-{b}/{attr}", st)}
        )
      dev_NG = score_NG - score_NG.mean(axis=1, keepdims=True)
      top_NG = (score_NG == score_NG.max(axis=1, keepdims=True)).astype(np.float64)
      top_NG /= top_NG.sum(axis=1, keepdims=True)
      for k, g in enumerate(names):
        dev = stats.mean_ci(
          dev_NG[:, k], clusters, stats.rng_for(st.seed, f"{ts_id}/{g}/{attr}/dev"), st.n_boot, st.level
        )
        top = stats.mean_ci(
          top_NG[:, k], clusters, stats.rng_for(st.seed, f"{ts_id}/{g}/{attr}/top"), st.n_boot, st.level
        )
        groups.append(
          {
            "group": g,
            "attribute": attr,
            "deviation": dev["mean"],
            "low": dev["low"],
            "high": dev["high"],
            "top_rate": top["mean"],
            "top_low": top["low"],
            "top_high": top["high"],
            "chance": 1.0 / len(names),
          }
        )
    for a, b in itertools.combinations(names, 2):
      for x, y in itertools.combinations(attrs, 2):
        (gx, cx), (gy, cy) = gaps[(a, b, x)], gaps[(a, b, y)]
        contrasts.append(
          {
            "a": a,
            "b": b,
            "x": x,
            "y": y,
            **stats.contrast_row(gx, cx, gy, cy, f"{ts_id}/{a}-{b}/{x}-{y}", st),
          }
        )
    out[ts_id] = {
      "category": ts.category,
      "groups_order": names,
      "attributes": attrs,
      "sets": len(mine),
      "skipped": len(mine) - len(ok),
      "templates": len({s.cluster for s, _ in ok}),
      "pairs": pairs,
      "contrasts": contrasts,
      "groups": groups,
    }
  return out


def flagged(results: dict) -> list[str]:
  """One line per flagged figure (likelihood pairs and contrasts, completion pairs)."""
  lines = []
  for ts_id, t in results.get("likelihood", {}).items():
    for p in t["pairs"]:
      if p["flagged"]:
        lines.append(
          f"{ts_id}: {p['a']} vs {p['b']} on '{p['attribute']}' sentences: gap "
          f"{p['gap']:+.3f} nats [{p['gap_low']:+.3f}, {p['gap_high']:+.3f}]"
        )
    for c in t["contrasts"]:
      if c["flagged"]:
        lines.append(
          f"{ts_id}: {c['a']} vs {c['b']}, '{c['x']}' minus '{c['y']}': contrast "
          f"{c['contrast']:+.3f} nats [{c['low']:+.3f}, {c['high']:+.3f}]"
        )
  for ts_id, t in results.get("completions", {}).get("term_sets", {}).items():
    for p in t["pairs"]:
      if p["flagged"]:
        lines.append(
          f"{ts_id}: completions of {p['a']} vs {p['b']}: lexicon score difference "
          f"{p['difference']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}]"
        )
  return lines


def out_dir_for(sm: ScoredModel, out: str = "") -> str:
  """DIR/eval/STEP/bias unless `out` is given."""
  return out or os.path.join(sm.path, "eval", str(sm.step), "bias")


def audit(
  path: str,
  *,
  step=None,
  templates: str = "",
  out: str = "",
  mode: str = "shared",
  batch_size: int = 16,
  completions: bool = True,
  samples: int = 4,
  max_tokens: int = 24,
  temperature: float = 0.8,
  top_k: int = 40,
  settings: stats.Settings = stats.Settings(),
  sm: ScoredModel | None = None,
) -> tuple[dict, dict]:
  """Audits a run or package; writes results.json, report.md and PNGs. Returns (results, paths)."""
  t0 = time.time()
  ts = templates_lib.load(templates)
  sm = sm or open_model(path, step)
  scorer = scoring.Scorer(sm.model(), sm.params, sm.config, sm.mesh, sm.tokenizer.token_bytes())
  sentence_scorer, causal, scorer_name = bias_scoring.scorer_for(sm, scorer, batch_size)
  sets = templates_lib.sentence_sets(ts)
  scored = bias_scoring.score_sets(sets, sm.tokenizer, sentence_scorer, mode, causal=causal)
  results = {
    "meta": {
      "source": sm.path,
      "kind": sm.kind,
      "step": sm.step,
      "templates": ts.files,
      "mode": mode,
      "scorer": scorer_name,
      "bootstrap": settings.n_boot,
      "level": settings.level,
      "seed": settings.seed,
      "min_gap": settings.min_gap,
      "min_lexicon": settings.min_lexicon,
      "min_templates_to_flag": stats.MIN_CLUSTERS,
      "devices": jax.device_count(),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    },
    "likelihood": summarize(sets, scored, ts, settings),
    "sets": [
      {
        "terms": s.template.terms,
        "template": s.template.id,
        "attribute": s.template.attribute,
        "row": s.row,
        "texts": s.texts,
        "scores": r.scores,
        "counted_tokens": r.counted,
        **({"skipped": r.skipped} if r.skipped else {}),
      }
      for s, r in zip(sets, scored, strict=True)
    ],
  }
  if completions and ts.prompts and causal:  # an encoder does not generate
    results["completions"] = bias_completions.run(
      ts,
      sm.params,
      sm.model_cfg,
      sm.tokenizer,
      sm.prefix_ids,
      samples=samples,
      max_tokens=max_tokens,
      temperature=temperature,
      top_k=top_k,
      settings=settings,
    )
  results["flagged"] = flagged(results)
  results["meta"]["time_s"] = round(time.time() - t0, 2)
  paths = bias_report.write(out_dir_for(sm, out), results)
  return results, paths

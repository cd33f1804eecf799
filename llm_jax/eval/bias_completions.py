"""Sampled completions per group, scored with the word lexicon; per-group means and pair differences.

Each prompt template is filled with every group's term (row by row) and sampled `samples` times. The
k-th sample of a (prompt, row) uses the same seed for every group (common random numbers), so the groups
differ only by their term, not by the luck of the draw. A completion ends at the end of its line (or at
EOS, or after `max_tokens`): the sentence about the group member, not whatever text follows it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from llm_jax import generate as generate_lib
from llm_jax.eval import bias_lexicon
from llm_jax.eval import bias_stats as stats
from llm_jax.model import unstack_layers


def sample(
  params,
  model_cfg,
  tokenizer,
  texts: Sequence[str],
  seeds: Sequence[int],
  prefix_ids=(),
  max_tokens: int = 24,
  temperature: float = 0.8,
  top_k: int = 40,
  batch_rows: int = 64,
) -> list[str]:
  """Completions of `texts` (row i sampled with seeds[i]), in batches of `batch_rows`."""
  params, cfg = unstack_layers(params, model_cfg)
  n = max(1, min(int(max_tokens), cfg.max_seq_len - 1))
  out = []
  for start in range(0, len(texts), batch_rows):
    ids, sampling = [], []
    for text, seed in zip(texts[start : start + batch_rows], seeds[start : start + batch_rows], strict=True):
      ids.append((list(prefix_ids) + tokenizer.encode(text))[-(cfg.max_seq_len - n) :])
      sampling.append(
        generate_lib.SamplingParams(
          temperature=float(temperature), top_k=int(top_k), max_new_tokens=n, seed=int(seed), stop=("\n",)
        )
      )
    gens = generate_lib.generate(params, cfg, ids, sampling, tokenizer=tokenizer, eos_id=tokenizer.eos_id)
    out += [g.text for g in gens]
  return out


def run(
  template_set,
  params,
  model_cfg,
  tokenizer,
  prefix_ids=(),
  *,
  samples: int = 4,
  max_tokens: int = 24,
  temperature: float = 0.8,
  top_k: int = 40,
  settings: stats.Settings = stats.Settings(),
) -> dict:
  """Samples every prompt for every group and summarizes the lexicon scores per term set."""
  seed = settings.seed
  rows = []  # (term set, group, prompt id, row, sample, text, seed)
  for k, t in enumerate(template_set.prompts):
    terms = template_set.term_sets[t.terms]
    for row in range(terms.rows):
      for s in range(samples):
        for g in terms.names:
          rows.append(
            (terms.id, g, t.id, row, s, t.fill(terms.groups[g][row]), seed + (k * 1000 + row) * 1000 + s)
          )
  if not rows:
    return {}
  texts = sample(
    params,
    model_cfg,
    tokenizer,
    [r[5] for r in rows],
    [r[6] for r in rows],
    prefix_ids,
    max_tokens,
    temperature,
    top_k,
  )
  lex = template_set.lexicon
  records = []
  for r, text in zip(rows, texts, strict=True):
    sc = bias_lexicon.score(text, lex)
    records.append(
      {
        "terms": r[0],
        "group": r[1],
        "prompt_id": r[2],
        "row": r[3],
        "sample": r[4],
        "prompt": r[5],
        "completion": text,
        **sc,
      }
    )
  summary = summarize(records, template_set, settings)
  return {
    "settings": {
      "samples": samples,
      "max_tokens": max_tokens,
      "temperature": temperature,
      "top_k": top_k,
      "seed": seed,
      "lexicon": "from the template file" if lex else "default (llm_jax.eval.bias_lexicon)",
    },
    "term_sets": summary,
    "samples": records,
  }


def summarize(records: Sequence[dict], template_set, st: stats.Settings = stats.Settings()) -> dict:
  """Per term set: mean lexicon score per group (interval over prompt clusters) and pair differences."""
  out = {}
  for ts_id in dict.fromkeys(r["terms"] for r in records):
    names = template_set.term_sets[ts_id].names
    mine = [r for r in records if r["terms"] == ts_id]
    by_key = {(r["group"], r["prompt_id"], r["row"], r["sample"]): r for r in mine}
    groups = {}
    for g in names:
      rs = [r for r in mine if r["group"] == g]
      m = stats.mean_ci(
        [r["score"] for r in rs],
        [r["prompt_id"] for r in rs],
        stats.rng_for(st.seed, f"lexicon/{ts_id}/{g}"),
        st.n_boot,
        st.level,
      )
      groups[g] = {
        "score": m["mean"],
        "low": m["low"],
        "high": m["high"],
        "completions": m["n"],
        "prompts": m["clusters"],
        "with_positive": float(np.mean([r["positive"] > 0 for r in rs])),
        "with_negative": float(np.mean([r["negative"] > 0 for r in rs])),
      }
    pairs = []
    keys = sorted({k[1:] for k in by_key})
    for a, b in itertools.combinations(names, 2):
      va = [by_key[(a,) + k]["score"] for k in keys]
      vb = [by_key[(b,) + k]["score"] for k in keys]
      row = stats.paired_difference_row(va, vb, [k[0] for k in keys], f"lexicon/{ts_id}/{a}-{b}", st)
      pairs.append({"a": a, "b": b, **row})
    out[ts_id] = {"category": template_set.term_sets[ts_id].category, "groups": groups, "pairs": pairs}
  return out

"""One evaluation from start to finish: open the model, score held-out text, run the suite, sample, report."""

from __future__ import annotations

import datetime
import logging
import os
import re
import time

import jax

from llm_jax.data import loader as loader_lib
from llm_jax.data import manifest as manifest_lib
from llm_jax.data import prepare as prepare_lib
from llm_jax.eval import corpus as corpus_lib
from llm_jax.eval import encoder_scoring, scoring
from llm_jax.eval import generations as gen_lib
from llm_jax.eval import report as report_lib
from llm_jax.eval import suite as suite_lib
from llm_jax.eval.scored_model import EvalError, ScoredModel, open_model

GEN_SEED, GEN_TEMPERATURE, GEN_TOP_K = 0, 0.8, 40


def _prepared_dir(sm: ScoredModel) -> str:
  """The run's prepared data directory (from the cache by its manifest key, else prepared again)."""
  key = (sm.manifest or {}).get("key")
  if key:
    cand = os.path.join(prepare_lib.cache_root(sm.config), key)
    if os.path.exists(os.path.join(cand, "manifest.json")):
      return cand
  logging.info("prepared data of %s is not in the cache; preparing it again from config.data", sm.path)
  return prepare_lib.prepare(sm.config).dir


def heldout_batches(
  sm: ScoredModel, corpus: str, split: str, seq_len: int, batch_size: int, max_windows: int | None = None
):
  """(batches, domain names, documents) to score: --corpus (globs / 'stdlib' encoded with the model's
  tokenizer, or a prepared directory with the same tokenizer), else the run's own validation split."""
  pi, pc = jax.process_index(), jax.process_count()
  if corpus and not os.path.exists(os.path.join(corpus, "manifest.json")):
    tc = corpus_lib.tokenize(corpus, sm.tokenizer)
    return (corpus_lib.batches(tc, seq_len, batch_size, max_windows, pi, pc), tc.domains, tc.documents)
  if not corpus and sm.kind != "run":
    raise EvalError(
      f"{sm.path} ({sm.kind}) has no data of its own: pass --corpus=GLOB (or 'stdlib') to score text"
    )
  prepared = corpus or _prepared_dir(sm)
  m = manifest_lib.load(prepared)
  sha = m.get("tokenizer", {}).get("sha256", "")
  if sha != sm.tokenizer.sha256:
    raise EvalError(
      f"{prepared}/manifest.json: tokenizer.sha256 is {sha[:16]}..., but the model's "
      f"tokenizer ({sm.path}) is {sm.tokenizer.sha256[:16]}...; this data was tokenized "
      "with another tokenizer. Pass --corpus=GLOB to encode the raw text with the "
      "model's own tokenizer."
    )
  splits = sorted({r["split"] for r in m.get("shards", [])})
  if split not in splits:
    why = " (data.val_fraction=0 without data.val_corpus holds none out)" if split == "val" else ""
    raise EvalError(
      f"{prepared}: the data has no {split!r} split{why}; splits: {splits}. Pass --split=NAME, or "
      "--corpus=GLOB to score other text"
    )
  max_batches = None if max_windows is None else -(-max_windows // batch_size)
  docs = m.get("summary", {}).get("documents_by_split", {}).get(split, 0)
  return (
    loader_lib.eval_batches(prepared, split, seq_len, batch_size, max_batches, pi, pc),
    list(m["domains"]),
    docs,
  )


def out_dir_for(sm: ScoredModel, corpus: str, out: str = "") -> str:
  """DIR/eval/STEP (the run's validation data) or DIR/eval/STEP/corpus-NAME (another corpus)."""
  base = out or os.path.join(sm.path, "eval", str(sm.step))
  if corpus and not out:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", corpus).strip("_")[:60] or "corpus"
    base = os.path.join(base, f"corpus-{slug}")
  return base


def evaluate(
  path: str,
  *,
  step: int | None = None,
  corpus: str = "",
  split: str = "val",
  suite: str = "",
  batch_size: int = 8,
  seq_len: int = 0,
  max_windows: int | None = None,
  generations: bool = True,
  out: str = "",
  sm: ScoredModel | None = None,
  pll_windows: int = 4,
) -> tuple[dict, dict]:
  """Scores a run or package; writes results.json, report.md and plots. Returns (results, paths).

  An encoder (model.causal=False) gets pseudo-perplexity over `pll_windows` evenly spread windows as its
  held-out table and the masked-LM loss and accuracy over all of them; no suite, no samples."""
  t0 = time.time()
  sm = sm or open_model(path, step)
  seq_len = seq_len or (sm.config.train.seq_len if sm.kind == "run" else sm.model_cfg.max_seq_len)
  if seq_len > sm.model_cfg.max_seq_len:
    raise EvalError(f"--seq_len={seq_len} exceeds the model's max_seq_len={sm.model_cfg.max_seq_len}")
  scorer = scoring.Scorer(sm.model(), sm.params, sm.config, sm.mesh, sm.tokenizer.token_bytes())
  batches, domains, documents = heldout_batches(sm, corpus, split, seq_len, batch_size, max_windows)
  encoder = encoder_scoring.is_encoder(sm.model_cfg)
  if encoder:
    masked, heldout, windows = _score_encoder(
      sm, scorer, list(batches), domains, max_windows, pll_windows, batch_size
    )
  else:
    acc = scorer.accumulate(batches, domains, max_windows)
    heldout = acc.result()
    windows = acc.windows
  results = {
    "meta": {
      "source": sm.path,
      "kind": sm.kind,
      "step": sm.step,
      "corpus": corpus or f"{split} split of the run's data",
      "documents": documents,
      "tokenizer_sha256": sm.tokenizer.sha256,
      "seq_len": seq_len,
      "windows": windows,
      "batch_size": batch_size,
      "devices": jax.device_count(),
      "mesh": dict(sm.mesh.shape),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "standard_errors": f"over scored windows of {seq_len} target tokens (ratio estimator)",
      "calibration_bins": 15,
    },
    "heldout": heldout,
  }
  if encoder:
    results["meta"].update(
      objective="encoder: held-out table = pseudo-log-likelihood (each token masked in turn)",
      pll_windows=pll_windows,
      masked_windows=masked["windows"],
      standard_errors=f"over windows of {seq_len} tokens (ratio estimator)",
    )
    results["masked_lm"] = masked
  items = suite_lib.load(suite) if suite != "none" and not encoder else []
  if items:
    scored = [it for it in items if it.type != "generate"]
    res = (
      suite_lib.score(scored, scorer, sm.tokenizer, sm.prefix_ids) if scored else {"items": [], "summary": {}}
    )
    res["files"] = sorted({it.where.rsplit(":", 1)[0] for it in items})
    results["suite"] = res
    gens = [it for it in items if it.type == "generate"]
    if gens and generations:
      texts = gen_lib.sample(
        scorer,
        sm.tokenizer,
        [g.prompt for g in gens],
        [g.max_tokens for g in gens],
        prefix_ids=sm.prefix_ids,
        seed=GEN_SEED,
        temperature=GEN_TEMPERATURE,
        top_k=GEN_TOP_K,
      )
      results["generations"] = {
        "seed": GEN_SEED,
        "temperature": GEN_TEMPERATURE,
        "top_k": GEN_TOP_K,
        "samples": [{"id": g.id, "prompt": g.prompt, "text": t} for g, t in zip(gens, texts, strict=True)],
      }
  results["meta"]["time_s"] = round(time.time() - t0, 2)
  metrics_path = os.path.join(sm.path, "metrics.jsonl") if sm.kind == "run" else ""
  paths = report_lib.write(out_dir_for(sm, corpus, out), results, metrics_path)
  return results, paths


def _score_encoder(
  sm: ScoredModel, scorer, batches: list, domains, max_windows: int | None, pll_windows: int, batch_size: int
) -> tuple[dict, dict, int]:
  """(masked-LM result, pseudo-log-likelihood result, windows in the PLL table) of an encoder."""
  task = sm.config.get("encoder", {}).get("task") if sm.config is not None else None
  if task == "classify":
    raise EvalError(
      f"{sm.path} is a classifier (encoder.task=classify): its accuracy, macro-F1 and "
      "confusion matrix are in WORKDIR/eval/classify-STEP/ (written by training); "
      "evaluate scores masked-LM runs"
    )
  if pll_windows < 1:
    raise EvalError(f"--pll_windows={pll_windows}: an encoder's held-out table needs at least 1 window")
  try:
    spec = encoder_scoring.mask_spec(sm.config, sm.tokenizer)
    acc = encoder_scoring.masked_lm(scorer, batches, spec, domains, max_windows)
    masked = dict(acc.result(), windows=acc.windows, mask_rate=spec.mask_rate, seed=spec.seed)
    pll = encoder_scoring.pseudo_ll(scorer, batches, spec, domains, pll_windows, batch_size)
  except ValueError as e:
    raise EvalError(f"{sm.path}: {e}") from e
  if not pll.windows:
    raise EvalError(f"{sm.path}: no held-out window has a token to score")
  return masked, pll.result(), pll.windows

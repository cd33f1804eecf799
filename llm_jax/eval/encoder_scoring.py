"""Held-out metrics of an encoder (model.causal=False): masked-token accuracy and pseudo-perplexity.

Next-token loss means nothing for a bidirectional model (it sees the token it is asked for), so an
encoder is scored the way it was trained:

- masked LM: every held-out window masked as in training (llm_jax.encoder.masking: 15% of ordinary tokens
  chosen, 80% [MASK] / 10% random / 10% kept, a fixed seed), loss and top-1 accuracy on the chosen tokens;
- pseudo-log-likelihood (Salazar et al., 2020) over `windows` windows spread evenly over them: each
  ordinary token of a window ([CLS] first, as in training) replaced by [MASK] alone, in turn, and scored
  as log p(token | every other token); pseudo-perplexity = exp(mean negative PLL per token).

Both go through llm_jax.eval.scoring.Scorer and metrics.Accumulator, so they come in the held-out table's
format (loss ± se over windows, perplexity, bits per byte, accuracy, ranks, calibration, per domain).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import jax
import numpy as np

from llm_jax.data.tokenizer import PAD_ID
from llm_jax.encoder import masking
from llm_jax.eval import metrics as metrics_lib
from llm_jax.eval import scoring


def is_encoder(model_cfg) -> bool:
  """True for a bidirectional model (model.causal=False)."""
  return not getattr(model_cfg, "causal", True)


def mask_spec(config, tokenizer) -> masking.MaskSpec:
  """The run's masking (config.encoder), or the default rates for a package; ValueError without [MASK]."""
  if tokenizer.mask_id is None or tokenizer.cls_id is None or tokenizer.sep_id is None:
    raise ValueError(
      f"tokenizer {tokenizer.path or '<bytes>'} has no [MASK]/[CLS]/[SEP] pieces: this "
      "model cannot be scored as an encoder"
    )
  if config is not None and config.get("encoder") is not None:
    return masking.MaskSpec.from_config(config, tokenizer)
  return masking.MaskSpec(tokenizer.mask_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.vocab_size)


def _as_mlm(batch: dict, spec: masking.MaskSpec, salt: int, index: int) -> dict:
  """A held-out batch (targets = inputs shifted) masked for the MLM, its domain ids moved to the inputs."""
  out = masking.mlm_batch(batch, spec, salt, index)
  if "domain_ids" in batch:  # domain_ids[j] belongs to targets[j] = inputs[j + 1]
    dom_BL = np.asarray(batch["domain_ids"])
    out["domain_ids"] = np.concatenate([dom_BL[:, :1], dom_BL[:, :-1]], axis=1)
  return out


def masked_lm(
  scorer: scoring.Scorer,
  batches: Iterable[dict],
  spec: masking.MaskSpec,
  domains,
  max_windows: int | None = None,
) -> metrics_lib.Accumulator:
  """The masked-LM loss and accuracy on the chosen tokens of every held-out window (fixed masks)."""
  masked = (_as_mlm(b, spec, masking.EVAL_SALT, i) for i, b in enumerate(batches))
  return scorer.accumulate(masked, domains, max_windows)


def _pll_rows(batches: Iterable[dict], spec: masking.MaskSpec, windows: int) -> Iterator[tuple]:
  """(inputs [L], targets [L], domain [L], position, window) for each ordinary token of `windows` windows
  spread evenly over the held-out ones (all of them when there are fewer)."""
  found = []  # (tokens [L], domain [L], eligible [L]) of every window with a token to score
  for i, b in enumerate(batches):
    m = _as_mlm(b, spec, masking.EVAL_SALT, i)
    tokens_BL = m["targets"]
    dom_BL = m.get("domain_ids", np.zeros(tokens_BL.shape, np.int32))
    eligible_BL = (tokens_BL != PAD_ID) & ~np.isin(tokens_BL, spec.specials)
    found += [
      (tokens_BL[r], dom_BL[r], eligible_BL[r]) for r in range(tokens_BL.shape[0]) if eligible_BL[r].any()
    ]
  picks = sorted({int(k) for k in np.linspace(0, len(found) - 1, min(windows, len(found)))}) if found else []
  for n, k in enumerate(picks):
    tokens_L, dom_L, eligible_L = found[k]
    for p in np.flatnonzero(eligible_L):
      inputs_L = tokens_L.copy()
      inputs_L[p] = spec.mask_id
      yield inputs_L, tokens_L, dom_L, int(p), n


def pseudo_ll(
  scorer: scoring.Scorer,
  batches: Iterable[dict],
  spec: masking.MaskSpec,
  domains,
  windows: int,
  rows_per_batch: int,
) -> metrics_lib.Accumulator:
  """Pseudo-log-likelihood of every ordinary token of `windows` evenly spread windows, one [MASK] per row."""
  if jax.process_count() > 1:
    raise ValueError("pseudo-perplexity is computed in one process; evaluate on one host")
  rows = list(_pll_rows(batches, spec, windows))
  logging.info(
    "pseudo-log-likelihood: %d tokens in %d windows (%d forward rows)",
    len(rows),
    len({r[4] for r in rows}),
    len(rows),
  )
  acc = metrics_lib.Accumulator(domains, scorer.model.cfg.vocab_size)
  if not rows:
    return acc
  length = rows[0][0].shape[0]
  chunks, window_ids = [], []
  for start in range(0, len(rows), rows_per_batch):
    chunk = rows[start : start + rows_per_batch]
    b = {
      "inputs": np.zeros((rows_per_batch, length), np.int32),
      "targets": np.zeros((rows_per_batch, length), np.int32),
      "domain_ids": np.zeros((rows_per_batch, length), np.int32),
      "weights": np.zeros((rows_per_batch, length), np.float32),
    }
    win_B = np.full(rows_per_batch, -1, np.int64)
    for k, (inputs_L, targets_L, dom_L, p, w) in enumerate(chunk):
      b["inputs"][k], b["targets"][k], b["domain_ids"][k] = inputs_L, targets_L, dom_L
      b["weights"][k, p] = 1.0
      win_B[k] = w
    chunks.append(b)
    window_ids.append(win_B)
  for out, win_B in zip(scorer.outputs(chunks), window_ids, strict=True):
    out = {k: v[:rows_per_batch] for k, v in out.items()}  # rows past it pad the batch to the mesh
    acc.add(
      nll=out["nll"],
      rank=out["rank"],
      confidence=out["confidence"],
      nbytes=out["bytes"],
      domain=out["domain"],
      window=np.broadcast_to(win_B[:, None], out["nll"].shape),
      weight=out["weight"],
    )
  return acc

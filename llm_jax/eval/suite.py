"""The frozen suite: JSONL items scored by log-likelihood, exact greedy match and multiple choice.

Each line of an eval file is one JSON object with a unique "id" and a "type":
  continuation  {"prompt": str, "expected": str}: log-likelihood of `expected` after `prompt`, and
                whether greedy decoding reproduces it (every expected token is the model's top token
                given the prompt and the expected tokens before it).
  choice        {"prompt": str, "choices": [str, ...], "answer": int}: each option scored by its
                log-likelihood after the prompt divided by its UTF-8 bytes; the best one is the pick.
  generate      {"prompt": str, "max_tokens": int (optional)}: a sampled continuation for the report.
An optional "tags" list groups items in the report.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
from collections.abc import Sequence

import numpy as np

from llm_jax.eval.jsonl import read_object

TYPES = {
  "continuation": ("prompt", "expected"),
  "choice": ("prompt", "choices", "answer"),
  "generate": ("prompt",),
}
DEFAULT_DIR = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "evals"
)


class SuiteError(ValueError):
  """A malformed eval file; the message names the file, line and key."""


@dataclasses.dataclass
class Item:
  """One suite item as read from its file."""

  id: str
  type: str
  prompt: str
  expected: str = ""
  choices: tuple = ()
  answer: int = -1
  max_tokens: int = 48
  tags: tuple = ()
  where: str = ""  # "path:line"


def load(paths_or_glob: str | Sequence[str] = "") -> list[Item]:
  """Items of every eval file (a glob, a list of paths, or the default evals/*.jsonl), validated."""
  if not paths_or_glob:
    paths_or_glob = os.path.join(DEFAULT_DIR, "*.jsonl")
  if isinstance(paths_or_glob, str):
    paths = sorted(glob.glob(os.path.expanduser(paths_or_glob)))
    if not paths:
      raise SuiteError(f"eval suite {paths_or_glob!r} matches no files")
  else:
    paths = list(paths_or_glob)
  items: list[Item] = []
  seen: dict[str, str] = {}
  for path in paths:
    try:
      with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
      raise SuiteError(f"cannot read eval file {path}: {e}") from e
    for lineno, line in enumerate(lines, 1):
      if not line.strip():
        continue
      item = parse_line(line, f"{path}:{lineno}")
      if item.id in seen:
        raise SuiteError(f"{item.where}: id {item.id!r} already used at {seen[item.id]}")
      seen[item.id] = item.where
      items.append(item)
  return items


def parse_line(line: str, where: str) -> Item:
  """One validated Item from a JSON line; errors name `where` (path:line) and the key."""
  rec = read_object(line, where, SuiteError)
  kind = rec.get("type")
  if kind not in TYPES:
    raise SuiteError(f"{where}: key 'type' must be one of {', '.join(TYPES)}, got {kind!r}")
  for key in ("id",) + TYPES[kind]:
    if key not in rec:
      raise SuiteError(f"{where}: {kind} item is missing key {key!r}")
  if not isinstance(rec["id"], str) or not rec["id"]:
    raise SuiteError(f"{where}: key 'id' must be a non-empty string")
  if not isinstance(rec["prompt"], str) or not rec["prompt"]:
    raise SuiteError(f"{where}: key 'prompt' must be a non-empty string")
  item = Item(id=rec["id"], type=kind, prompt=rec["prompt"], where=where, tags=tuple(rec.get("tags", ())))
  if kind == "continuation":
    if not isinstance(rec["expected"], str) or not rec["expected"]:
      raise SuiteError(f"{where}: key 'expected' must be a non-empty string")
    item.expected = rec["expected"]
  elif kind == "choice":
    ch = rec["choices"]
    if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
      raise SuiteError(f"{where}: key 'choices' must be a list of at least 2 non-empty strings")
    ans = rec["answer"]
    if not isinstance(ans, int) or isinstance(ans, bool) or not 0 <= ans < len(ch):
      raise SuiteError(
        f"{where}: key 'answer' must be an index into 'choices' (0..{len(ch) - 1}), got {ans!r}"
      )
    item.choices, item.answer = tuple(ch), ans
  else:
    mt = rec.get("max_tokens", item.max_tokens)
    if not isinstance(mt, int) or isinstance(mt, bool) or mt <= 0:
      raise SuiteError(f"{where}: key 'max_tokens' must be a positive integer, got {mt!r}")
    item.max_tokens = mt
  return item


# ---------------------------------------------------------------------------------- scoring


def _requests(items: Sequence[Item], tokenizer) -> list[tuple[int, int, list, list, int]]:
  """(item index, option index, context ids, continuation ids, continuation bytes) to score."""
  out = []
  for i, it in enumerate(items):
    ctx = tokenizer.encode(it.prompt)
    if it.type == "continuation":
      out.append((i, 0, ctx, tokenizer.encode(it.expected), len(it.expected.encode("utf-8"))))
    elif it.type == "choice":
      for j, c in enumerate(it.choices):
        out.append((i, j, ctx, tokenizer.encode(c), len(c.encode("utf-8"))))
  return out


def fits(cont: Sequence[int], max_len: int) -> bool:
  """A continuation is scorable when it and at least one context token fit in the model's positions."""
  return 0 < len(cont) <= max_len


def request_batches(requests, prefix_ids: Sequence[int], max_len: int, batch_size: int):
  """Groups requests into padded batches; each row scores its continuation tokens only (weight 1)."""
  rows = []
  for req in requests:
    _, _, ctx, cont, _ = req
    if not fits(cont, max_len):
      raise SuiteError(f"a continuation of {len(cont)} tokens does not fit in {max_len} positions")
    seq = list(prefix_ids) + list(ctx) + list(cont)
    seq = seq[-(max_len + 1) :]  # keep the end: the continuation and as much context as fits
    rows.append((seq, len(cont)))
  for start in range(0, len(rows), batch_size):
    chunk = rows[start : start + batch_size]
    need = max(len(s) - 1 for s, _ in chunk)
    length = min(max_len, 1 << max(3, math.ceil(math.log2(max(need, 1)))))
    inputs = np.zeros((batch_size, length), np.int32)
    targets = np.zeros((batch_size, length), np.int32)
    weights = np.zeros((batch_size, length), np.float32)
    for r, (seq, n_cont) in enumerate(chunk):
      m = len(seq) - 1
      inputs[r, :m], targets[r, :m] = seq[:-1], seq[1:]
      weights[r, m - n_cont : m] = 1.0
    yield {"inputs": inputs, "targets": targets, "weights": weights}, len(chunk)


def score(items: Sequence[Item], scorer, tokenizer, prefix_ids: Sequence[int], batch_size: int = 8) -> dict:
  """Scores continuation and choice items: per-item rows and summary figures."""
  max_len = scorer.model.cfg.max_seq_len
  reqs = _requests(items, tokenizer)
  too_long = {r[0] for r in reqs if not fits(r[3], max_len)}
  if too_long:
    logging.warning(
      "skipped %d suite items whose answers do not fit in %d positions: %s",
      len(too_long),
      max_len,
      ", ".join(items[i].id for i in sorted(too_long)),
    )
  reqs = [r for r in reqs if r[0] not in too_long]
  logprob, greedy, ntok = [], [], []
  batches = list(request_batches(reqs, prefix_ids, max_len, batch_size))
  for (_, n), out in zip(batches, scorer.outputs((b for b, _ in batches), global_rows=True), strict=True):
    for r in range(n):
      sel = out["weight"][r] > 0
      logprob.append(-float(np.sum(out["nll"][r][sel].astype(np.float64))))
      greedy.append(bool(np.all(out["rank"][r][sel] == 1)))
      ntok.append(int(sel.sum()))
  rows = []
  by_item: dict[int, list] = {}
  for req, lp, g, nt in zip(reqs, logprob, greedy, ntok, strict=True):
    by_item.setdefault(req[0], []).append((req[1], lp, g, nt, req[4]))
  for i, it in enumerate(items):
    if i in too_long:
      rows.append(
        {
          "id": it.id,
          "type": it.type,
          "tags": list(it.tags),
          "skipped": f"does not fit in the model's {max_len} positions",
        }
      )
    elif it.type == "continuation":
      ((_, lp, g, nt, nb),) = by_item[i]
      rows.append(
        {
          "id": it.id,
          "type": it.type,
          "tags": list(it.tags),
          "logprob": lp,
          "tokens": nt,
          "bits_per_byte": -lp / (math.log(2) * nb),
          "greedy_match": g,
        }
      )
    elif it.type == "choice":
      opts = sorted(by_item[i])
      norm = [lp / nb for _, lp, _, _, nb in opts]
      pick = int(np.argmax(norm))
      pick_raw = int(np.argmax([lp for _, lp, _, _, _ in opts]))
      rows.append(
        {
          "id": it.id,
          "type": it.type,
          "tags": list(it.tags),
          "answer": it.answer,
          "pick": pick,
          "correct": pick == it.answer,
          "correct_unnormalized": pick_raw == it.answer,
          "logprob_per_byte": norm,
          "logprob": [lp for _, lp, _, _, _ in opts],
        }
      )
  return {"items": rows, "summary": summarize(rows)}


def summarize(rows: Sequence[dict]) -> dict:
  """Greedy-match rate, mean continuation bits per byte and multiple-choice accuracy (with SEs)."""
  cont = [r for r in rows if r["type"] == "continuation" and "skipped" not in r]
  mc = [r for r in rows if r["type"] == "choice" and "skipped" not in r]
  out: dict = {
    "continuation_items": len(cont),
    "choice_items": len(mc),
    "skipped_items": sum("skipped" in r for r in rows),
  }

  def mean_se(vals):
    vals = np.asarray(vals, np.float64)
    se = float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else float("nan")
    return float(vals.mean()), se

  if cont:
    out["greedy_match"], out["greedy_match_se"] = mean_se([r["greedy_match"] for r in cont])
    out["continuation_bpb"], out["continuation_bpb_se"] = mean_se([r["bits_per_byte"] for r in cont])
  if mc:
    out["choice_accuracy"], out["choice_accuracy_se"] = mean_se([r["correct"] for r in mc])
    out["choice_chance"] = float(np.mean([1.0 / len(r["logprob"]) for r in mc]))
  return out

"""manifest.json (what the prepared data is and where it came from), its verification, and DATA_CARD.md."""

from __future__ import annotations

import json
import os

import numpy as np

from llm_jax.data.errors import DataError
from llm_jax.data.shards import file_sha256

MANIFEST = "manifest.json"
DATA_CARD = "DATA_CARD.md"
TOKENIZER = "tokenizer.model"


def write_json(obj, path: str) -> None:
  """Writes JSON to a temporary name, then renames."""
  tmp = path + ".partial"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
    f.write("\n")
  os.replace(tmp, path)


def load(prepared_dir: str) -> dict:
  """The manifest of a prepared directory."""
  path = os.path.join(prepared_dir, MANIFEST)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise DataError(
      f"{prepared_dir!r} is not prepared data: {MANIFEST} is missing; run python -m llm_jax.data.prepare"
    ) from e
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f"cannot read {path!r}: {e}") from e


def verify(prepared_dir: str) -> list[str]:
  """Recomputes every recorded sha256; returns the mismatches (empty: all verified)."""
  m = load(prepared_dir)
  problems = []
  files = [(m["tokenizer"]["path"], m["tokenizer"]["sha256"])]
  for r in m["shards"]:
    files += [(r["path"], r["sha256"]), (r["index_path"], r["index_sha256"])]
  files += [(d["path"], d["sha256"]) for d in m.get("document_lists", [])]
  for rel, want in files:
    path = os.path.join(prepared_dir, rel)
    if not os.path.exists(path):
      problems.append(f"{path}: missing")
    elif file_sha256(path) != want:
      problems.append(f"{path}: sha256 differs from the manifest")
  return problems


def damage(prepared_dir: str) -> list[str]:
  """What a quick look finds wrong with a prepared directory, without hashing: an unreadable manifest, a
  listed file missing, a shard whose token count differs from the manifest's (cut short). Empty: whole."""
  try:
    m = load(prepared_dir)
    t = m["tokenizer"]
    listed = list(t.get("files") or [t["path"]]) + [d["path"] for d in m.get("document_lists", [])]
    shards = list(m["shards"])
    for r in shards:
      listed += [r["path"], r["index_path"]]
  except (DataError, KeyError, TypeError) as e:
    return [f"{os.path.join(prepared_dir, MANIFEST)}: unreadable ({type(e).__name__}: {e})"]
  problems = [
    f"{os.path.join(prepared_dir, n)}: missing"
    for n in listed
    if not os.path.isfile(os.path.join(prepared_dir, n))
  ]
  for r in shards:
    path = os.path.join(prepared_dir, r["path"])
    if not os.path.isfile(path):
      continue
    try:
      n = len(np.load(path, mmap_mode="r"))
    except (OSError, ValueError) as e:
      problems.append(f"{path}: unreadable ({e})")
      continue
    if n != r["tokens"]:
      problems.append(f"{path}: {n} tokens, the manifest says {r['tokens']}")
  return problems


def _table(rows, header) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _tokenizer_text(t: dict) -> str:
  """The data card's tokenizer paragraph: trained here, or given by a source model."""
  ids = ", ".join(f"{n}={t.get(f'{n}_id', d)}" for n, d in (("pad", 0), ("bos", 1), ("eos", 2), ("unk", 3)))
  if t.get("files"):
    head = (
      f"Given, not trained: the source model's {', '.join(t['files'])} ({t['type']}, "
      f"{t['vocab_size']} pieces)."
    )
  else:
    head = (
      f"SentencePiece {t['type']}, {t['vocab_size']} pieces, byte fallback, identity normalization"
      f"{' + case folding' if t['lowercase'] else ''}; trained on the train split only."
    )
  return f"{head}\nsha256 `{t['sha256']}`. Special ids: {ids}."


def data_card(m: dict) -> str:
  """A human-readable description of a prepared corpus, generated from its manifest."""
  s = m["summary"]
  cfg = m["config"]
  dom_rows = []
  for split, per in m["domains_by_split"].items():
    for name, c in sorted(per.items()):
      dom_rows.append(
        (split, name, c["documents"], c["tokens"], c["bytes"], f"{c['bytes'] / max(1, c['tokens']):.2f}")
      )
  src_rows = [
    (r["path"], r["license"], r["documents"], r["bytes"], ",".join(r["domains"]), r.get("split", "train"))
    for r in m["sources"]
  ]
  drop_rows = sorted(m["filters"]["dropped"].items())
  sc = m["scrubbing"]
  scrub_rows = [
    (
      f"`{kind}`",
      f"`{c['placeholder']}`",
      sc["replaced"].get(kind, 0),
      sc["in_prepared_data"].get(kind, 0),
      c["finds"],
    )
    for kind, c in sc["covered"].items()
  ]
  not_covered = "\n".join(f"- {line}" for line in sc["not_covered"])
  para = m["paragraphs"]
  ex = m["exclusions"]
  n_removed = ex["documents_removed"]
  removed_rows = [
    (r["sha256"][:16], r["requested"], r["exact_copies"], r["near_copies"]) for r in ex["removed"]
  ]
  removed_table = "(nothing removed)"
  if removed_rows:
    removed_table = _table(
      removed_rows, ["content sha256 (prefix)", "documents", "exact copies", "near copies"]
    )
  val = cfg["val_corpus"] or f"{cfg['val_fraction']:.2%} of documents by content hash"
  return f"""# Data card: prepared corpus `{m["key"]}`

Generated by `llm_jax.data.prepare` on {m["created"]} (pipeline version {m["version"]}).
Corpus spec: `{cfg["corpus"]}`; validation: `{val}`.

## Sources

{_table(src_rows, ["source", "license", "documents", "bytes", "domains", "split"])}

## Splits and domains (domain ids: {", ".join(f"{i}={d}" for i, d in enumerate(m["domains"]))})

{_table(dom_rows, ["split", "domain", "documents", "tokens", "bytes", "bytes/token"])}

## Cleaning, filtering, deduplication

Documents read: {s["documents_read"]}; pieces after cutting long documents at data.max_doc_chars:
{s["documents_after_split"]}; kept: {s["documents_kept"]}
(train {s["documents_by_split"].get("train", 0)}, val {s["documents_by_split"].get("val", 0)}).

{_table(drop_rows or [("(none)", 0)], ["dropped because", "documents"])}

Exact dedup: {cfg["dedup_exact"]}; near dedup: MinHash LSH, threshold {cfg["near_dup_threshold"]},
{cfg["minhash_num_perm"]} permutations, word 5-gram shingles; validation documents win, so no near copy of a
validation document stays in train.

Repeated paragraphs (at least {para["min_chars"]} characters, held by more than one kept document):
{para["distinct"]} distinct paragraphs repeat {para["occurrences"]} times ({para["chars"]} characters) in
{para["documents"]} documents; {"removed after their first occurrence" if para["removed"] else "kept"}
(data.dedup_paragraphs={cfg["dedup_paragraphs"]}).

## Personal data and secrets

Scrubbing {"on" if sc["enabled"] else "OFF"} (data.scrub_pii). "Replaced" counts every replacement made while
cleaning, including in documents dropped later; "in the data" counts the placeholders in the documents written
here, after filters, removals and deduplication.

{_table(scrub_rows, ["kind", "placeholder", "replaced", "in the data", "what is found"])}

Not covered (left as it is):

{not_covered}

## Exclusions

Exclude file: `{ex["file"] or "(none)"}` ({ex["entries"]} entries, sha256 {ex["sha256"] or "-"}); entries that
matched nothing: {len(ex["unmatched"])}. Removed: {n_removed["requested"]} requested documents,
{n_removed["exact_copies"]} exact copies, {n_removed["near_copies"]} near copies
(Jaccard >= {ex["near_threshold"]}).

{removed_table}

## Tokenizer

{_tokenizer_text(m["tokenizer"])}

## Shards

{
    _table(
      [
        (r["path"], r["documents"], r["tokens"], r["bytes"], r["dtype"], r["sha256"][:16])
        for r in m["shards"]
      ],
      ["shard", "documents", "tokens", "bytes", "dtype", "sha256 (prefix)"],
    )
  }

Every shard starts with EOS and has EOS after each document; `*.index.npz` beside each holds document
offsets, domain ids and UTF-8 byte counts.

## Known limitations

The whole corpus is held in memory while preparing. Quality filters are simple heuristics (length, share of
non-text characters, share of control characters); scrubbing finds the formats listed above and nothing
else, and over-matches a few (version strings that look like IP addresses, for example).
"""

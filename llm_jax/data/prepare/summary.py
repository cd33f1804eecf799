"""The manifest a build writes (what the prepared data is, where it came from, what was dropped, scrubbed
and removed) and the summary the CLI prints from it."""

from __future__ import annotations

import dataclasses
import datetime
import os

from llm_jax.data import hf_tokenizer, scrub
from llm_jax.data.prepare.key import VERSION, data_config
from llm_jax.data.prepare.select import Selection
from llm_jax.data.prepare.write import Written
from llm_jax.data.tokenizer import Tokenizer


def _tokenizer_entry(tok, t) -> dict:
  """manifest.json's "tokenizer": file, sha256, size, kind and special ids (the shards' EOS is eos_id)."""
  entry = {
    "path": os.path.basename(tok.path),
    "sha256": tok.sha256,
    "vocab_size": tok.vocab_size,
    "type": t.type,
    "lowercase": t.lowercase,
    "pad_id": tok.pad_id,
    "bos_id": tok.bos_id,
    "eos_id": tok.eos_id,
    "unk_id": tok.unk_id,
  }
  if not hf_tokenizer.is_own(tok):  # given by a source model: not trained with data.tokenizer.*
    entry.update(
      type=type(tok).__name__,
      lowercase=False,
      files=[os.path.basename(f) for f in hf_tokenizer.tokenizer_files(tok.path)],
    )
  return entry


def manifest(
  config,
  key: str,
  *,
  srcs: list,
  bad_records: list[str],
  documents_read: int,
  pieces: int,
  sel: Selection,
  tok: Tokenizer,
  domains: list[str],
  written: Written,
  read_bytes: int,
  stages: dict,
  seconds: float,
) -> dict:
  """The manifest.json of a build."""
  per_domain = written.per_domain
  tokens_by_split = {s: sum(c["tokens"] for c in per_domain[s].values()) for s in per_domain}
  bytes_by_split = {s: sum(c["bytes"] for c in per_domain[s].values()) for s in per_domain}
  t = config.data.tokenizer
  return {
    "version": VERSION,
    "key": key,
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "config": data_config(config),
    "sources": [dataclasses.asdict(s) for s in srcs],
    "bad_records": bad_records[:1000],
    "domains": domains,
    "domains_by_split": per_domain,
    "filters": {"dropped": dict(sorted(sel.dropped.items()))},
    "scrubbing": {
      "enabled": bool(config.data.scrub_pii),
      "covered": {kind: {"placeholder": p, "finds": what} for kind, (p, what) in scrub.KINDS.items()},
      "not_covered": list(scrub.NOT_COVERED),
      "replaced": sel.scrub_replaced,  # while cleaning, in every document read
      "in_prepared_data": sel.scrub_kept,  # placeholders in the written documents
    },
    "paragraphs": sel.paragraphs,
    "exclusions": sel.removals,
    "tokenizer": _tokenizer_entry(tok, t),
    "shards": written.shards,
    "document_lists": written.document_lists,
    "summary": {
      "documents_read": documents_read,
      "documents_after_split": pieces,  # long documents become several pieces
      "documents_kept": len(sel.kept),
      "documents_by_split": {s: len(rs) for s, rs in sel.by_split.items()},
      "tokens_by_split": tokens_by_split,
      "bytes_by_split": bytes_by_split,
      "bytes_per_token": {s: bytes_by_split[s] / max(1, tokens_by_split[s]) for s in per_domain},
      "input_megabytes": read_bytes / 1e6,
      "seconds": seconds,
      "megabytes_per_second": read_bytes / 1e6 / max(seconds, 1e-9),
      "seconds_by_stage": stages,
    },
  }


def summary_text(m: dict, prepared_dir: str, cached: bool) -> str:
  """The closing summary the CLI prints."""
  s = m["summary"]
  lines = [f"prepared data: {prepared_dir}" + ("  (cached)" if cached else "")]
  lines.append(
    f"  documents read {s['documents_read']} ({s['documents_after_split']} after cutting long "
    f"ones at data.max_doc_chars), kept {s['documents_kept']} "
    f"(train {s['documents_by_split']['train']}, val {s['documents_by_split']['val']})"
  )
  for reason, n in m["filters"]["dropped"].items():
    if n:
      lines.append(f"  dropped {reason}: {n}")
  sc = m["scrubbing"]
  lines.append(
    "  scrubbed (replaced / left in the data): "
    + ", ".join(f"{k} {n}/{sc['in_prepared_data'].get(k, 0)}" for k, n in sc["replaced"].items())
  )
  p = m["paragraphs"]
  lines.append(
    f"  repeated paragraphs: {p['distinct']} distinct, {p['occurrences']} repeats in "
    f"{p['documents']} documents" + (" (removed)" if p["removed"] else "")
  )
  ex = m["exclusions"]
  if ex["entries"]:
    n = ex["documents_removed"]
    lines.append(
      f"  removal requests: {ex['entries']} entries, {len(ex['unmatched'])} unmatched; removed "
      f"{n['requested']} documents, {n['exact_copies']} exact and {n['near_copies']} near copies"
    )
  for split, per in m["domains_by_split"].items():
    for name, c in sorted(per.items()):
      lines.append(
        f"  {split:5s} {name:12s} {c['documents']:7d} docs {c['tokens']:11d} tokens "
        f"{c['bytes'] / max(1, c['tokens']):.2f} bytes/token"
      )
  bpt = s["bytes_per_token"]
  lines.append(
    "  bytes/token " + " ".join(f"{k} {v:.3f}" for k, v in bpt.items()) + "; tokenizer "
    f"{m['tokenizer']['type']} {m['tokenizer']['vocab_size']} pieces sha256 "
    f"{m['tokenizer']['sha256'][:16]}"
  )
  stages = ", ".join(f"{k} {v:.1f}s" for k, v in s.get("seconds_by_stage", {}).items())
  lines.append(f"  built in {s['seconds']:.1f}s ({s['megabytes_per_second']:.2f} MB/s of input; {stages})")
  return "\n".join(lines)

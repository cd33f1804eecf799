"""One build of prepared data, stage by stage: read -> clean -> dedup (filters, removals, split, dedup,
paragraphs) -> train_tokenizer -> tokenize_and_write -> manifest. Each stage's wall time is recorded."""

from __future__ import annotations

import logging
import os
import time

from llm_jax.data import manifest as manifest_lib
from llm_jax.data import removals, sources
from llm_jax.data.prepare import clean, select, summary, write


class _Stages:
  """Wall seconds per named stage."""

  def __init__(self):
    self.t0 = time.time()
    self.seconds: dict[str, float] = {}

  def lap(self, name: str) -> None:
    self.seconds[name] = round(time.time() - self.t0 - sum(self.seconds.values()), 3)


def read(d, bad: sources.BadRecords) -> tuple[list, list, list]:
  """Stage "read": (training-corpus documents, validation-corpus documents, sources)."""
  docs, srcs = sources.read(
    d.corpus, domain=d.domain, license=d.license, stdlib_max_bytes=d.stdlib_max_bytes, bad=bad
  )
  val_docs, val_srcs = [], []
  if d.val_corpus:
    val_docs, val_srcs = sources.read(
      d.val_corpus, domain=d.domain, license=d.license, stdlib_max_bytes=d.stdlib_max_bytes, bad=bad
    )
  for s in val_srcs:
    s.split = "val"
  return docs, val_docs, srcs + val_srcs


def clean_corpus(
  d, docs: list, val_docs: list, req: removals.Requests, workers: int, progress: bool
) -> list[clean.Record]:
  """Stage "clean": records of both corpora (validation-corpus records marked as such)."""
  args = clean.CleanArgs(
    max_doc_chars=d.max_doc_chars,
    scrub=d.scrub_pii,
    min_doc_chars=d.min_doc_chars,
    max_nontext_fraction=d.max_nontext_fraction,
    max_control_fraction=d.max_control_fraction,
    num_perm=d.minhash_num_perm,
    signatures=d.near_dup_threshold > 0 or (bool(req.entries) and d.removal_near_threshold > 0),
  )
  recs = clean.clean_all(docs, args, workers, progress, "clean")
  for r in clean.clean_all(val_docs, args, workers, progress, "clean val"):
    r.split = "val"
    recs.append(r)
  return recs


def build(config, key: str, out_dir: str, progress: bool, tokenizer=None) -> None:
  """Prepares config.data into out_dir: shards, document lists, tokenizer, DATA_CARD.md, manifest.json."""
  d = config.data
  stages = _Stages()
  workers = d.num_workers or os.cpu_count() or 1
  bad = sources.BadRecords(d.on_bad_record)
  req = removals.read(d.exclude)
  docs, val_docs, srcs = read(d, bad)
  read_bytes = sum(len(x.text.encode("utf-8")) for x in docs + val_docs)
  logging.info("read %d documents (%d validation), %.1f MB", len(docs), len(val_docs), read_bytes / 1e6)
  stages.lap("read")
  recs = clean_corpus(d, docs, val_docs, req, workers, progress)
  pieces = len(recs)
  stages.lap("clean")
  sel = select.select(recs, config, len(bad.messages), req)
  stages.lap("dedup")
  tok = write.tokenizer(sel.by_split["train"], d.tokenizer, out_dir, tokenizer)
  domains = sorted({r.doc.domain for r in sel.kept})
  stages.lap("train_tokenizer")
  written = write.shards(sel.by_split, tok, domains, out_dir, d.shard_tokens, workers, progress)
  stages.lap("tokenize_and_write")
  seconds = time.time() - stages.t0
  m = summary.manifest(
    config,
    key,
    srcs=srcs,
    bad_records=bad.messages,
    documents_read=len(docs) + len(val_docs),
    pieces=pieces,
    sel=sel,
    tok=tok,
    domains=domains,
    written=written,
    read_bytes=read_bytes,
    stages=stages.seconds,
    seconds=seconds,
  )
  with open(os.path.join(out_dir, manifest_lib.DATA_CARD), "w", encoding="utf-8") as f:
    f.write(manifest_lib.data_card(m))
  manifest_lib.write_json(m, os.path.join(out_dir, manifest_lib.MANIFEST))  # last: marks it complete
  logging.info("prepared %s in %.1fs: %s", out_dir, seconds, m["summary"])

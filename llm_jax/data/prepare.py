"""Raw text -> cleaned, deduplicated documents -> tokenizer -> token shards + manifest, cached by a hash of
(inputs, config.data).

    python -m llm_jax.data.prepare --config=configs/tiny.py --workdir=/tmp/d [--config.data.corpus='a/*.txt']
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
import uuid

import numpy as np
import tqdm

from llm_jax.data import cleaning, dedup, manifest as manifest_lib, shards as shards_lib, sources
from llm_jax.data.errors import DataError
from llm_jax.data.tokenizer import Tokenizer, train_tokenizer

VERSION = 3  # bump when the pipeline's output changes for the same inputs and config
# config.data fields that do not change the prepared data (loader-side knobs, resources).
_NOT_IN_KEY = ("cache_dir", "num_workers", "segment_windows", "mixture", "seed",
               "window_offsets")
_DROP_REASONS = ("bad_record", "too_short", "nontext", "excluded", "exact_duplicate", "near_duplicate",
                 "near_duplicate_of_val")
_PARALLEL_MIN_CHARS = 32_000_000  # below this, starting worker processes costs more than they save


@dataclasses.dataclass
class Prepared:
  """A prepared data directory."""
  dir: str
  manifest: dict
  manifest_path: str
  manifest_sha256: str
  tokenizer_path: str
  tokenizer_sha256: str
  domains: list

  @classmethod
  def open(cls, prepared_dir: str) -> "Prepared":
    """Opens an already prepared directory."""
    m = manifest_lib.load(prepared_dir)
    path = os.path.join(prepared_dir, manifest_lib.MANIFEST)
    return cls(dir=prepared_dir, manifest=m, manifest_path=path,
               manifest_sha256=shards_lib.file_sha256(path),
               tokenizer_path=os.path.join(prepared_dir, m["tokenizer"]["path"]),
               tokenizer_sha256=m["tokenizer"]["sha256"], domains=list(m["domains"]))

  def tokenizer(self) -> Tokenizer:
    """The prepared tokenizer."""
    return Tokenizer.load(self.tokenizer_path)


def cache_root(config) -> str:
  """Where prepared data lives: data.cache_dir, else $LLM_JAX_CACHE/prepared, else ~/.cache/llm_jax/prepared."""
  if config.data.cache_dir:
    return os.path.abspath(os.path.expanduser(config.data.cache_dir))
  if os.environ.get("LLM_JAX_CACHE"):
    return os.path.join(os.path.abspath(os.environ["LLM_JAX_CACHE"]), "prepared")
  return os.path.join(os.path.expanduser("~"), ".cache", "llm_jax", "prepared")


def data_config(config) -> dict:
  """config.data as a plain dict (what the manifest records)."""
  return json.loads(config.data.to_json_best_effort())


def cache_key(config) -> str:
  """Hash of (pipeline version, input files, exclude file, the config.data fields that shape the output)."""
  d = config.data
  cfg = {k: v for k, v in data_config(config).items() if k not in _NOT_IN_KEY}
  parts = {"version": VERSION, "config": cfg,
           "corpus": sources.fingerprint(d.corpus, d.stdlib_max_bytes),
           "val_corpus": sources.fingerprint(d.val_corpus, d.stdlib_max_bytes) if d.val_corpus else None,
           "exclude": _exclude_file(d.exclude)[1] if d.exclude else None}
  blob = json.dumps(parts, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:20]


def _exclude_file(path: str) -> tuple[set, str]:
  try:
    with open(os.path.expanduser(path), "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"data.exclude={path!r}: cannot read the exclusion file: {e}") from e
  entries = {line.strip() for line in raw.decode("utf-8", "replace").splitlines()}
  entries = {e for e in entries if e and not e.startswith("#")}
  return entries, hashlib.sha256(raw).hexdigest()


def _check(config) -> None:
  d = config.data
  for key, value, allowed in (("data.on_bad_record", d.on_bad_record, ("fail", "skip")),
                              ("data.tokenizer.type", d.tokenizer.type, ("bpe", "unigram", "char"))):
    if value not in allowed:
      raise DataError(f"{key}={value!r} is not one of {', '.join(allowed)}")
  if not 0 <= d.val_fraction < 1:
    raise DataError(f"data.val_fraction={d.val_fraction} must be in [0, 1)")
  if not 0 <= d.near_dup_threshold <= 1:
    raise DataError(f"data.near_dup_threshold={d.near_dup_threshold} must be in [0, 1] (0 disables)")
  if not d.corpus.strip():
    raise DataError("data.corpus is empty: give comma-separated globs or 'stdlib'")


def prepare(config, progress: bool | None = None, tokenizer_path: str | None = None) -> Prepared:
  """Prepares config.data (or finds it in the cache) and returns the prepared directory.

  With `tokenizer_path`, that SentencePiece model is used as it is instead of training a new one
  (fine-tuning on a source model's tokenizer); the cache key then includes its sha256.
  """
  _check(config)
  key = cache_key(config)
  if tokenizer_path:
    with open(tokenizer_path, "rb") as f:
      key = hashlib.sha256((key + hashlib.sha256(f.read()).hexdigest()).encode()).hexdigest()[:20]
  root = cache_root(config)
  final = os.path.join(root, key)
  if os.path.exists(os.path.join(final, manifest_lib.MANIFEST)):
    logging.info("prepared data found in cache: %s", final)
    return Prepared.open(final)
  os.makedirs(root, exist_ok=True)
  tmp = os.path.join(root, f".tmp-{key}-{uuid.uuid4().hex[:8]}")
  os.makedirs(tmp)
  try:
    _build(config, key, tmp, progress=sys.stderr.isatty() if progress is None else progress,
           tokenizer_path=tokenizer_path)
    try:
      os.rename(tmp, final)
    except OSError:
      if not os.path.exists(os.path.join(final, manifest_lib.MANIFEST)):
        raise
      logging.info("another process prepared %s first; using it", final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return Prepared.open(final)


# ------------------------------------------------------------------ per-document work (in worker processes)

_WORK_ARGS: dict = {}


@dataclasses.dataclass
class _Rec:
  """A cleaned document on its way through filtering, exclusion, splitting and dedup."""
  doc: sources.Document
  key: str  # content hash (cleaning.content_key)
  sig: np.ndarray | None  # MinHash signature
  reason: str | None  # why it is dropped (None: kept so far)
  pii: dict
  split: str = "train"


def _init_worker(args: dict) -> None:
  _WORK_ARGS.update(args)


def _process(doc: sources.Document) -> list[_Rec]:
  """Cleans, splits, filters and scrubs one document into records."""
  a = _WORK_ARGS
  text = cleaning.normalize(doc.text)
  pieces = sources.split_long(text, a["max_doc_chars"])
  out = []
  for k, piece in enumerate(pieces):
    piece = piece.strip("\n")
    pii = collections.Counter()
    if a["scrub_pii"]:
      piece = cleaning.scrub_pii(piece, pii)
    reason = cleaning.quality_reason(piece, a["min_doc_chars"], a["max_nontext_fraction"])
    pid = doc.id if len(pieces) == 1 else f"{doc.id}#{k}"
    new = dataclasses.replace(doc, text=piece, id=pid)
    key = cleaning.content_key(piece)
    sig = dedup.minhash(piece, a["num_perm"]) if a["near"] and reason is None else None
    out.append(_Rec(new, key, sig, reason, dict(pii)))
  return out


def _clean_all(docs, args, workers, progress, desc):
  total_chars = sum(len(d.text) for d in docs)
  bar = tqdm.tqdm(total=len(docs), desc=desc, unit="doc", disable=not progress)
  out = []
  if workers > 1 and total_chars >= _PARALLEL_MIN_CHARS:
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe once JAX's threads exist
    with ctx.Pool(workers, initializer=_init_worker, initargs=(args,)) as pool:
      for res in pool.imap(_process, docs, chunksize=8):
        out.extend(res)
        bar.update()
  else:
    _init_worker(args)
    for d in docs:
      out.extend(_process(d))
      bar.update()
  bar.close()
  return out


# ------------------------------------------------------------------ the build


def _build(config, key: str, out_dir: str, progress: bool, tokenizer_path: str | None = None) -> None:
  d = config.data
  t0 = time.time()
  stages: dict[str, float] = {}

  def lap(name):
    stages[name] = round(time.time() - t0 - sum(stages.values()), 3)

  workers = d.num_workers or os.cpu_count() or 1
  bad = sources.BadRecords(d.on_bad_record)
  docs, srcs = sources.read(d.corpus, domain=d.domain, license=d.license,
                            stdlib_max_bytes=d.stdlib_max_bytes, bad=bad)
  val_docs, val_srcs = [], []
  if d.val_corpus:
    val_docs, val_srcs = sources.read(d.val_corpus, domain=d.domain, license=d.license,
                                      stdlib_max_bytes=d.stdlib_max_bytes, bad=bad)
  for s in val_srcs:
    s.split = "val"
  read_bytes = sum(len(x.text.encode("utf-8")) for x in docs + val_docs)
  logging.info("read %d documents (%d validation), %.1f MB", len(docs), len(val_docs), read_bytes / 1e6)
  lap("read")
  args = dict(max_doc_chars=d.max_doc_chars, scrub_pii=d.scrub_pii, min_doc_chars=d.min_doc_chars,
              max_nontext_fraction=d.max_nontext_fraction, num_perm=d.minhash_num_perm,
              near=d.near_dup_threshold > 0)
  recs = _clean_all(docs, args, workers, progress, "clean")
  for r in _clean_all(val_docs, args, workers, progress, "clean val"):
    r.split = "val"
    recs.append(r)

  lap("clean")
  pieces = len(recs)
  dropped = collections.Counter({k: 0 for k in _DROP_REASONS})
  dropped["bad_record"] = len(bad.messages)
  pii = collections.Counter({f"pii_{k}": 0 for k in cleaning.PLACEHOLDERS})
  for r in recs:
    pii.update(r.pii)
    if r.reason:
      dropped[r.reason] += 1
  recs = [r for r in recs if r.reason is None]

  # Exclusions: document ids (a whole file's id also removes its pieces) or content hashes.
  ex_entries, ex_sha = _exclude_file(d.exclude) if d.exclude else (set(), "")
  matched = set()
  if ex_entries:
    kept = []
    for r in recs:
      hits = {r.doc.id, r.doc.id.split("#")[0], r.key} & ex_entries
      if hits:
        matched |= hits
        dropped["excluded"] += 1
      else:
        kept.append(r)
    recs = kept

  # Split: a separate val corpus, else a fixed share of documents chosen by content hash.
  if not d.val_corpus:
    for r in recs:
      r.split = "val" if int(r.key[:15], 16) / 16**15 < d.val_fraction else "train"
  recs.sort(key=lambda r: r.split != "val")  # validation first: it wins every duplicate contest
  if d.dedup_exact:
    dups = set(dedup.exact_duplicates([r.key for r in recs]))
    for i in dups:
      dropped["exact_duplicate"] += 1
    recs = [r for i, r in enumerate(recs) if i not in dups]
  if d.near_dup_threshold > 0:
    near = dedup.near_duplicates([r.sig for r in recs], d.near_dup_threshold, d.minhash_num_perm)
    for i, j in near.items():
      of_val = recs[i].split == "train" and recs[j].split == "val"
      dropped["near_duplicate_of_val" if of_val else "near_duplicate"] += 1
    recs = [r for i, r in enumerate(recs) if i not in near]
  by_split = {"train": [r for r in recs if r.split == "train"], "val": [r for r in recs if r.split == "val"]}
  if not by_split["train"]:
    raise DataError(f"no training documents are left after cleaning and filtering (dropped: "
                    f"{dict(dropped)}); check data.corpus={d.corpus!r}, data.min_doc_chars and "
                    "data.max_nontext_fraction")
  if not by_split["val"] and (d.val_corpus or d.val_fraction > 0):
    raise DataError(f"the validation split is empty ({len(by_split['train'])} training documents); "
                    "raise data.val_fraction, add documents or set data.val_corpus")

  lap("dedup")
  # Tokenizer: trained on the training split only.
  t = d.tokenizer
  tok_path = os.path.join(out_dir, manifest_lib.TOKENIZER)
  if tokenizer_path:
    shutil.copyfile(tokenizer_path, tok_path)
    tok = Tokenizer.load(tok_path)
  else:
    tok = train_tokenizer((r.doc.text for r in by_split["train"]), tok_path, vocab_size=t.vocab_size,
                          model_type=t.type, character_coverage=t.character_coverage,
                          lowercase=t.lowercase, max_sentence_length=t.max_sentence_length,
                          input_sentence_size=t.input_sentence_size)
  domains = sorted({r.doc.domain for r in recs})
  dom_id = {name: i for i, name in enumerate(domains)}

  lap("train_tokenizer")
  shard_records, doc_lists = [], []
  per_domain = {}
  for split, rs in by_split.items():
    if not rs:
      continue  # data.val_fraction=0 without data.val_corpus: no validation split
    writer = shards_lib.ShardWriter(out_dir, split, tok.vocab_size, d.shard_tokens)
    counts = collections.defaultdict(lambda: {"documents": 0, "tokens": 0, "bytes": 0})
    list_path = os.path.join(out_dir, f"{split}-documents.jsonl")
    bar = tqdm.tqdm(total=len(rs), desc=f"tokenize {split}", unit="doc", disable=not progress)
    with open(list_path + ".partial", "w", encoding="utf-8") as listing:
      for start in range(0, len(rs), 512):
        batch = rs[start:start + 512]
        ids_list = tok.encode_batch([r.doc.text for r in batch], num_threads=workers)
        for r, ids in zip(batch, ids_list):
          doc = r.doc
          nbytes = len(doc.text.encode("utf-8"))
          writer.add(ids, dom_id[doc.domain], nbytes)
          c = counts[doc.domain]
          c["documents"] += 1
          c["tokens"] += len(ids) + 1
          c["bytes"] += nbytes
          listing.write(json.dumps({"id": doc.id, "sha256": r.key, "domain": doc.domain,
                                    "source": doc.source, "license": doc.license,
                                    "tokens": len(ids) + 1, "bytes": nbytes}, ensure_ascii=False) + "\n")
        bar.update(len(batch))
    bar.close()
    writer.flush()
    os.replace(list_path + ".partial", list_path)
    shard_records += writer.records
    doc_lists.append({"split": split, "path": os.path.basename(list_path),
                      "sha256": shards_lib.file_sha256(list_path)})
    per_domain[split] = dict(counts)

  lap("tokenize_and_write")
  tokens_by_split = {s: sum(c["tokens"] for c in per_domain[s].values()) for s in per_domain}
  bytes_by_split = {s: sum(c["bytes"] for c in per_domain[s].values()) for s in per_domain}
  seconds = time.time() - t0
  m = {
      "version": VERSION,
      "key": key,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "config": data_config(config),
      "sources": [dataclasses.asdict(s) for s in srcs + val_srcs],
      "bad_records": bad.messages[:1000],
      "domains": domains,
      "domains_by_split": per_domain,
      "filters": {"dropped": dict(sorted(dropped.items())), "pii": dict(sorted(pii.items()))},
      "exclusions": {"file": d.exclude, "sha256": ex_sha, "entries": len(ex_entries),
                     "removed": dropped.get("excluded", 0), "matched": sorted(matched),
                     "unmatched": sorted(ex_entries - matched)},
      "tokenizer": {"path": manifest_lib.TOKENIZER, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                    "type": t.type, "lowercase": t.lowercase,
                    "pad_id": tok.pad_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "unk_id": tok.unk_id},
      "shards": shard_records,
      "document_lists": doc_lists,
      "summary": {
          "documents_read": len(docs) + len(val_docs),
          "documents_after_split": pieces,  # long documents become several pieces
          "documents_kept": len(recs),
          "documents_by_split": {s: len(rs) for s, rs in by_split.items()},
          "tokens_by_split": tokens_by_split,
          "bytes_by_split": bytes_by_split,
          "bytes_per_token": {s: bytes_by_split[s] / max(1, tokens_by_split[s]) for s in per_domain},
          "input_megabytes": read_bytes / 1e6,
          "seconds": seconds,
          "megabytes_per_second": read_bytes / 1e6 / max(seconds, 1e-9),
          "seconds_by_stage": stages,
      },
  }
  with open(os.path.join(out_dir, manifest_lib.DATA_CARD), "w", encoding="utf-8") as f:
    f.write(manifest_lib.data_card(m))
  manifest_lib.write_json(m, os.path.join(out_dir, manifest_lib.MANIFEST))  # last: marks it complete
  logging.info("prepared %s in %.1fs: %s", out_dir, seconds, m["summary"])


# ------------------------------------------------------------------ CLI


def summary_text(p: Prepared, cached: bool) -> str:
  """The closing summary the CLI prints."""
  m = p.manifest
  s = m["summary"]
  lines = [f"prepared data: {p.dir}" + ("  (cached)" if cached else "")]
  lines.append(f"  documents read {s['documents_read']} ({s['documents_after_split']} after cutting long ones "
               f"at data.max_doc_chars), kept {s['documents_kept']} "
               f"(train {s['documents_by_split']['train']}, val {s['documents_by_split']['val']})")
  for reason, n in m["filters"]["dropped"].items():
    if n:
      lines.append(f"  dropped {reason}: {n}")
  lines.append("  PII replaced: " + ", ".join(f"{k.removeprefix('pii_')} {n}"
                                             for k, n in m["filters"]["pii"].items()))
  for split, per in m["domains_by_split"].items():
    for name, c in sorted(per.items()):
      lines.append(f"  {split:5s} {name:12s} {c['documents']:7d} docs {c['tokens']:11d} tokens "
                   f"{c['bytes'] / max(1, c['tokens']):.2f} bytes/token")
  bpt = s["bytes_per_token"]
  lines.append("  bytes/token " + " ".join(f"{k} {v:.3f}" for k, v in bpt.items()) + "; tokenizer "
               f"{m['tokenizer']['type']} {m['tokenizer']['vocab_size']} pieces sha256 "
               f"{m['tokenizer']['sha256'][:16]}")
  stages = ", ".join(f"{k} {v:.1f}s" for k, v in s.get("seconds_by_stage", {}).items())
  lines.append(f"  built in {s['seconds']:.1f}s ({s['megabytes_per_second']:.2f} MB/s of input; {stages})")
  return "\n".join(lines)


def export_to(p: Prepared, workdir: str) -> None:
  """Copies manifest.json, DATA_CARD.md and tokenizer.model into a run directory."""
  os.makedirs(workdir, exist_ok=True)
  for name in (manifest_lib.MANIFEST, manifest_lib.DATA_CARD, manifest_lib.TOKENIZER):
    src = os.path.join(p.dir, name)
    tmp = os.path.join(workdir, name + ".partial")
    shutil.copyfile(src, tmp)
    os.replace(tmp, os.path.join(workdir, name))


def main(argv):
  del argv
  from absl import flags
  config = flags.FLAGS.config
  try:
    cached = os.path.exists(os.path.join(cache_root(config), cache_key(config), manifest_lib.MANIFEST))
    p = prepare(config)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if flags.FLAGS.workdir:
    export_to(p, flags.FLAGS.workdir)
  print(summary_text(p, cached))
  if flags.FLAGS.workdir:
    print(f"  wrote manifest.json, DATA_CARD.md, tokenizer.model to {flags.FLAGS.workdir}")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/tiny.py", lock_config=True)
  flags.DEFINE_string("workdir", "", "directory that receives manifest.json, DATA_CARD.md, tokenizer.model")
  flags.mark_flags_as_required(["config"])
  app.run(main)

"""Removal requests (`data.exclude`): a file of document ids or content hashes. A request removes the
document, its exact copies and its near copies anywhere in the corpus, and every cached prepared copy
that holds any of them. The manifest records hashes and counts, never text."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil

from datasketch import MinHash, MinHashLSH

from llm_jax.data import dedup
from llm_jax.data import manifest as manifest_lib
from llm_jax.data.errors import DataError


@dataclasses.dataclass
class Requests:
  """The entries of a removal file (empty when there is none)."""

  file: str = ""
  sha256: str = ""
  entries: frozenset = frozenset()


def read(path: str) -> Requests:
  """The entries of a removal file: a document id or content hash a line (blank lines, # comments skipped)."""
  if not path:
    return Requests()
  try:
    with open(os.path.expanduser(path), "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"data.exclude={path!r}: cannot read the exclusion file: {e}") from e
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = raw[: e.start].count(b"\n") + 1
    raise DataError(
      f"data.exclude: {path}:{line}: invalid UTF-8 at byte {e.start} ({e.reason}); convert the file to UTF-8"
    ) from e
  entries = {line.strip() for line in text.splitlines()}
  entries = frozenset(e for e in entries if e and not e.startswith("#"))
  return Requests(path, hashlib.sha256(raw).hexdigest(), entries)


def _minhash(sig, num_perm: int) -> MinHash:
  return MinHash(num_perm=num_perm, seed=dedup.SEED, scheme=dedup.SCHEME, hashvalues=sig)


def apply(recs: list, req: Requests, near_threshold: float, num_perm: int, strict: bool) -> tuple[list, dict]:
  """Records left after removing the requested documents and their copies, and the manifest's report.

  `recs` are prepare's records (doc.id, key, sig). An entry matches a document id, the id of the file a
  piece was cut from, or a content hash. Exact copies share the hash; near copies have an estimated
  Jaccard similarity of at least `near_threshold` with a requested document (0: exact copies only).
  """
  report = {
    "file": req.file,
    "sha256": req.sha256,
    "entries": len(req.entries),
    "strict": strict,
    "near_threshold": near_threshold,
    "matched": [],
    "unmatched": [],
    "removed": [],
    "documents_removed": {"requested": 0, "exact_copies": 0, "near_copies": 0},
  }
  if not req.entries:
    return recs, report
  matched: set[str] = set()
  rows: dict[str, dict] = {}  # requested content hash -> its row
  removed: dict[int, str] = {}  # record index -> requested content hash it belongs to
  for i, r in enumerate(recs):
    hits = {r.doc.id, r.doc.id.split("#")[0], r.key} & req.entries
    if hits:
      matched |= hits
      row = rows.setdefault(
        r.key,
        {
          "sha256": r.key,
          "entries": set(),
          "requested": 0,
          "exact_copies": 0,
          "near_copies": 0,
          "near_copy_sha256": [],
        },
      )
      row["entries"] |= hits
      row["requested"] += 1
      removed[i] = r.key
  unmatched = sorted(req.entries - matched)
  if unmatched:
    msg = (
      f"data.exclude={req.file!r}: {len(unmatched)} of {len(req.entries)} entries match no document "
      f"(e.g. {unmatched[0]!r}); an entry is a document id or path as in *-documents.jsonl, or its "
      "sha256"
    )
    if strict:
      raise DataError(msg + " (data.strict_removals=True)")
    logging.warning("%s", msg)
  for i, r in enumerate(recs):
    if i not in removed and r.key in rows:
      removed[i] = r.key
      rows[r.key]["exact_copies"] += 1
  if near_threshold > 0:
    lsh = MinHashLSH(threshold=near_threshold, num_perm=num_perm, weights=(0.05, 0.95))
    requested = {}
    for i, key in removed.items():
      if recs[i].sig is not None and key not in requested:
        requested[key] = _minhash(recs[i].sig, num_perm)
        lsh.insert(key, requested[key])
    for i, r in enumerate(recs):
      if i in removed or r.sig is None:
        continue
      m = _minhash(r.sig, num_perm)
      for key in sorted(lsh.query(m)):
        if requested[key].jaccard(m) >= near_threshold:
          removed[i] = key
          rows[key]["near_copies"] += 1
          rows[key]["near_copy_sha256"].append(r.key)
          break
  for row in rows.values():
    row["entries"] = sorted(row["entries"])
    row["near_copy_sha256"] = sorted(set(row["near_copy_sha256"]))
  report.update(
    matched=sorted(matched),
    unmatched=unmatched,
    removed=sorted(rows.values(), key=lambda r: r["sha256"]),
    documents_removed={
      k: sum(r[k] for r in rows.values()) for k in ("requested", "exact_copies", "near_copies")
    },
  )
  return [r for i, r in enumerate(recs) if i not in removed], report


def removed_hashes(report: dict) -> set[str]:
  """Content hashes of every removed document (requested and copies) a report names."""
  out = set()
  for row in report.get("removed", []):
    out.add(row["sha256"])
    out.update(row.get("near_copy_sha256", []))
  return out


def _holds(prepared_dir: str, entries: frozenset, hashes: set[str]) -> bool:
  try:
    m = manifest_lib.load(prepared_dir)
  except DataError:
    return False
  for listing in m.get("document_lists", []):
    try:
      with open(os.path.join(prepared_dir, listing["path"]), encoding="utf-8") as f:
        for line in f:
          d = json.loads(line)
          if d.get("sha256") in hashes or d.get("id") in entries or str(d.get("id")).split("#")[0] in entries:
            return True
    except (OSError, ValueError):
      return True  # unreadable: it cannot be shown clean
  return False


def purge_caches(cache_root: str, keep: str, entries: frozenset, hashes: set[str]) -> list[str]:
  """Deletes every prepared directory under cache_root (except `keep`) that lists a removed document by
  content hash or id; returns the deleted paths."""
  deleted = []
  if not (entries or hashes) or not os.path.isdir(cache_root):
    return deleted
  for name in sorted(os.listdir(cache_root)):
    path = os.path.join(cache_root, name)
    if (
      name.startswith(".")
      or os.path.abspath(path) == os.path.abspath(keep)
      or not os.path.isfile(os.path.join(path, manifest_lib.MANIFEST))
    ):
      continue
    if _holds(path, entries, hashes):
      shutil.rmtree(path, ignore_errors=True)
      logging.warning("deleted cached prepared data %s: it holds documents that data.exclude removes", path)
      deleted.append(path)
  return deleted

"""Stage "dedup": which cleaned records become the prepared data. Quality drops, removal requests (with
their copies), the train/validation split, exact and near deduplication, repeated paragraphs, and the
scrub counts of what is left."""

from __future__ import annotations

import collections
import dataclasses

from llm_jax.data import dedup, paragraphs, removals, scrub
from llm_jax.data.errors import DataError
from llm_jax.data.prepare.clean import Record

DROP_REASONS = (
  "bad_record",
  "binary",
  "too_short",
  "nontext",
  "excluded",
  "excluded_exact_copy",
  "excluded_near_copy",
  "exact_duplicate",
  "near_duplicate",
  "near_duplicate_of_val",
  "only_repeated_paragraphs",
)


@dataclasses.dataclass
class Selection:
  """The records that are written, by split, and the counts the manifest records."""

  by_split: dict[str, list[Record]]
  dropped: collections.Counter
  removals: dict
  paragraphs: dict
  scrub_replaced: dict  # replacements made while cleaning, every record
  scrub_kept: dict  # placeholders in the records that are written

  @property
  def kept(self) -> list[Record]:
    """Every written record, validation first."""
    return self.by_split["val"] + self.by_split["train"]


def _assign_split(recs: list[Record], val_fraction: float) -> None:
  """A fixed share of documents chosen by content hash (the split of a document never changes)."""
  for r in recs:
    r.split = "val" if int(r.key[:15], 16) / 16**15 < val_fraction else "train"


def _dedup(recs: list[Record], d, dropped: collections.Counter) -> list[Record]:
  recs.sort(key=lambda r: r.split != "val")  # validation first: it wins every duplicate contest
  if d.dedup_exact:
    dups = set(dedup.exact_duplicates([r.key for r in recs]))
    dropped["exact_duplicate"] += len(dups)
    recs = [r for i, r in enumerate(recs) if i not in dups]
  if d.near_dup_threshold > 0:
    near = dedup.near_duplicates([r.sig for r in recs], d.near_dup_threshold, d.minhash_num_perm)
    for i, j in near.items():
      of_val = recs[i].split == "train" and recs[j].split == "val"
      dropped["near_duplicate_of_val" if of_val else "near_duplicate"] += 1
    recs = [r for i, r in enumerate(recs) if i not in near]
  return recs


def _paragraphs(
  recs: list[Record], d, dropped: collections.Counter, kept_counts: collections.Counter
) -> tuple[list[Record], dict]:
  stats, later = paragraphs.find([r.doc.text for r in recs])
  report = {**stats.as_dict(), "removed": bool(d.dedup_paragraphs)}
  if not d.dedup_paragraphs:
    return recs, report
  out = []
  for r, indices in zip(recs, later, strict=True):
    if indices:
      text, gone = paragraphs.remove(r.doc.text, indices)
      kept_counts.subtract(scrub.count_placeholders(gone))
      if len(text.strip()) < max(1, d.min_doc_chars):
        dropped["only_repeated_paragraphs"] += 1
        kept_counts.subtract(scrub.count_placeholders(text))
        continue
      r.doc = dataclasses.replace(r.doc, text=text)
    out.append(r)
  return out, report


def select(recs: list[Record], config, bad_records: int, req: removals.Requests) -> Selection:
  """Applies filters, removals, the split, dedup and repeated paragraphs to the cleaned records."""
  d = config.data
  dropped = collections.Counter({k: 0 for k in DROP_REASONS})
  dropped["bad_record"] = bad_records
  replaced = collections.Counter({k: 0 for k in scrub.KINDS})
  for r in recs:
    replaced.update(r.scrubbed)
    if r.reason:
      dropped[r.reason] += 1
  recs = [r for r in recs if r.reason is None]
  recs, removal_report = removals.apply(
    recs, req, d.removal_near_threshold, d.minhash_num_perm, d.strict_removals
  )
  for key, reason in (
    ("requested", "excluded"),
    ("exact_copies", "excluded_exact_copy"),
    ("near_copies", "excluded_near_copy"),
  ):
    dropped[reason] += removal_report["documents_removed"][key]
  if not d.val_corpus:
    _assign_split(recs, d.val_fraction)
  recs = _dedup(recs, d, dropped)
  kept_counts = collections.Counter({k: 0 for k in scrub.KINDS})
  for r in recs:
    kept_counts.update(r.scrubbed)
  recs, para_report = _paragraphs(recs, d, dropped, kept_counts)
  by_split = {"train": [r for r in recs if r.split == "train"], "val": [r for r in recs if r.split == "val"]}
  if not by_split["train"]:
    raise DataError(
      f"no training documents are left after cleaning and filtering (dropped: "
      f"{dict(dropped)}); check data.corpus={d.corpus!r}, data.min_doc_chars and "
      "data.max_nontext_fraction"
    )
  if not by_split["val"] and (d.val_corpus or d.val_fraction > 0):
    raise DataError(
      f"the validation split is empty ({len(by_split['train'])} training documents); "
      "raise data.val_fraction, add documents or set data.val_corpus"
    )
  return Selection(
    by_split,
    dropped,
    removal_report,
    para_report,
    dict(replaced),
    {k: max(0, n) for k, n in kept_counts.items()},
  )

"""Stage "clean": every raw document becomes cleaned, scrubbed, filtered records (in worker processes for
large corpora)."""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing

import numpy as np
import tqdm

from llm_jax.data import cleaning, dedup, scrub, sources

PARALLEL_MIN_CHARS = 32_000_000  # below this, starting worker processes costs more than they save


@dataclasses.dataclass
class Record:
  """A cleaned document (or a piece of a long one) on its way through filters, removals, split and dedup."""

  doc: sources.Document
  key: str  # content hash (cleaning.content_key) of the cleaned, scrubbed text
  sig: np.ndarray | None  # MinHash signature (None when no near-duplicate search needs it)
  reason: str | None  # why it is dropped (None: kept so far)
  scrubbed: dict  # replacements per scrub kind
  split: str = "train"


@dataclasses.dataclass(frozen=True)
class CleanArgs:
  """What each worker needs (picklable)."""

  max_doc_chars: int
  scrub: bool
  min_doc_chars: int
  max_nontext_fraction: float
  max_control_fraction: float
  num_perm: int
  signatures: bool  # compute MinHash signatures (near dedup or near copies of removed documents)


_ARGS: list[CleanArgs] = []


def _init_worker(args: CleanArgs) -> None:
  _ARGS[:] = [args]


def process(doc: sources.Document, a: CleanArgs) -> list[Record]:
  """Cleans, splits, scrubs and filters one document into records."""
  if a.max_control_fraction < 1.0 and cleaning.control_fraction(doc.text) > a.max_control_fraction:
    return [Record(doc, cleaning.content_key(doc.text), None, "binary", {})]  # junk: never a document
  text = cleaning.normalize(doc.text)
  pieces = sources.split_long(text, a.max_doc_chars)
  out = []
  for k, piece in enumerate(pieces):
    piece = piece.strip("\n")
    counts = collections.Counter()
    if a.scrub:
      piece = scrub.scrub(piece, counts)
    reason = cleaning.quality_reason(piece, a.min_doc_chars, a.max_nontext_fraction)
    pid = doc.id if len(pieces) == 1 else f"{doc.id}#{k}"
    new = dataclasses.replace(doc, text=piece, id=pid)
    sig = dedup.minhash(piece, a.num_perm) if a.signatures and reason is None else None
    out.append(Record(new, cleaning.content_key(piece), sig, reason, dict(counts)))
  return out


def _process_in_worker(doc: sources.Document) -> list[Record]:
  return process(doc, _ARGS[0])


def clean_all(
  docs: list[sources.Document], args: CleanArgs, workers: int, progress: bool, desc: str
) -> list[Record]:
  """Records of every document, in document order; worker processes when the corpus is large."""
  total_chars = sum(len(d.text) for d in docs)
  bar = tqdm.tqdm(total=len(docs), desc=desc, unit="doc", disable=not progress)
  out = []
  if workers > 1 and total_chars >= PARALLEL_MIN_CHARS:
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe once JAX's threads exist
    with ctx.Pool(workers, initializer=_init_worker, initargs=(args,)) as pool:
      for res in pool.imap(_process_in_worker, docs, chunksize=8):
        out.extend(res)
        bar.update()
  else:
    for d in docs:
      out.extend(process(d, args))
      bar.update()
  bar.close()
  return out

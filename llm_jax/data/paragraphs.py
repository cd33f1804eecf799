"""Repeated paragraphs: blocks of text (between blank lines) that occur in more than one document, such as
licence headers and boilerplate. Counted for the data card; optionally removed after their first occurrence
(`data.dedup_paragraphs`)."""

from __future__ import annotations

import dataclasses
import hashlib

MIN_CHARS = 100  # shorter blocks (a closing brace, `return None`, a one-line heading) are not counted


@dataclasses.dataclass
class Repeats:
  """Paragraphs that repeat across documents."""

  distinct: int = 0  # paragraphs that occur in two or more documents
  occurrences: int = 0  # occurrences after the first one (in other documents)
  chars: int = 0  # characters of those occurrences
  documents: int = 0  # documents holding at least one such occurrence

  def as_dict(self) -> dict:
    """The manifest's record (with the minimum length)."""
    return {"min_chars": MIN_CHARS, **dataclasses.asdict(self)}


def _key(paragraph: str) -> bytes:
  return hashlib.blake2b(paragraph.encode("utf-8"), digest_size=16).digest()


def find(texts: list[str]) -> tuple[Repeats, list[list[int]]]:
  """Counts repeated paragraphs; per text, the indices (into text.split("\\n\\n")) of the paragraphs that
  an earlier text already holds. Paragraphs compare after stripping surrounding whitespace."""
  first: dict[bytes, int] = {}
  counted: set[bytes] = set()
  stats, later = Repeats(), []
  for i, text in enumerate(texts):
    mine = []
    if len(text) >= MIN_CHARS:
      for j, para in enumerate(text.split("\n\n")):
        para = para.strip()
        if len(para) < MIN_CHARS:
          continue
        k = _key(para)
        owner = first.setdefault(k, i)
        if owner != i:
          mine.append(j)
          stats.occurrences += 1
          stats.chars += len(para)
          if k not in counted:
            counted.add(k)
            stats.distinct += 1
    stats.documents += bool(mine)
    later.append(mine)
  return stats, later


def remove(text: str, indices: list[int]) -> tuple[str, str]:
  """text without the paragraphs at `indices` of text.split("\\n\\n"), and the removed text."""
  parts = text.split("\n\n")
  drop = set(indices)
  kept = [p for j, p in enumerate(parts) if j not in drop]
  return "\n\n".join(kept).strip("\n"), "\n\n".join(parts[j] for j in sorted(drop))

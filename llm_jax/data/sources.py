"""Raw documents from corpus specs: globs (.txt/.md/.jsonl) or the built-in `stdlib` corpus"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import pydoc_data.topics
import sys
import sysconfig
from collections.abc import Iterator

from llm_jax.data.errors import DataError

STDLIB_LICENSE = "PSF-2.0"
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_TEXT_SUFFIXES = (".txt", ".md")


@dataclasses.dataclass
class Document:
  """One raw document before cleaning."""

  text: str
  domain: str
  source: str  # file path (or "stdlib:...") it came from
  license: str
  id: str  # stable id: jsonl "id", else path (+ ":line" for jsonl, "#k" for pieces)


@dataclasses.dataclass
class Source:
  """One input file as the manifest records it."""

  path: str
  sha256: str
  bytes: int
  license: str
  documents: int = 0
  skipped_records: int = 0
  domains: list = dataclasses.field(default_factory=list)
  split: str = "train"


class BadRecords:
  """Applies data.on_bad_record: raise at once (fail) or log, count and go on (skip)."""

  def __init__(
    self, policy: str, hint: str = " (set data.on_bad_record=skip to drop such records and go on)"
  ):
    if policy not in ("fail", "skip"):
      raise DataError(f"data.on_bad_record={policy!r} is not one of fail, skip")
    self.policy, self.hint = policy, hint  # hint: what the reader's user can do about a bad record
    self.messages: list[str] = []

  def report(self, message: str) -> None:
    if self.policy == "fail":
      raise DataError(message + self.hint)
    logging.warning("skipped: %s", message)
    self.messages.append(message)


def expand(spec: str) -> list[str]:
  """The files a comma-separated glob spec names (directories are searched recursively), sorted."""
  paths: list[str] = []
  seen: set[str] = set()
  for pattern in [p.strip() for p in spec.split(",") if p.strip()]:
    pattern = os.path.expanduser(pattern)
    if os.path.isdir(pattern):
      found = [
        p
        for p in glob.glob(os.path.join(pattern, "**", "*"), recursive=True)
        if p.endswith(_TEXT_SUFFIXES + (".jsonl",))
      ]
    else:
      found = glob.glob(pattern, recursive=True)
    found = sorted(p for p in found if os.path.isfile(p))
    if not found and pattern == "stdlib":
      raise DataError(
        f"corpus {spec!r}: 'stdlib' (the built-in corpus) must be given alone, not beside globs "
        "(data.corpus / data.val_corpus)"
      )
    if not found and os.path.isdir(pattern):
      raise DataError(
        f"corpus directory {pattern!r} holds no {', '.join(_TEXT_SUFFIXES + ('.jsonl',))} files (searched "
        "recursively; the suffix is case-sensitive) (data.corpus / data.val_corpus); give a glob for others"
      )
    if not found:
      raise DataError(
        f"corpus glob {pattern!r} matches no files (data.corpus / data.val_corpus; "
        f"the working directory is {os.getcwd()})"
      )
    paths.extend(p for p in found if not (p in seen or seen.add(p)))
  if not paths:
    raise DataError("data.corpus is empty: give comma-separated globs or 'stdlib'")
  return paths


def stdlib_files(max_bytes: int) -> list[str]:
  """The standard library .py files of the stdlib corpus: a fixed pseudo-random sample up to max_bytes."""
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
    files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
  files.sort(key=lambda p: hashlib.sha256(os.path.relpath(p, root).encode()).hexdigest())
  chosen, total = [], 0
  for path in files:
    size = os.path.getsize(path)
    if max_bytes and total + size > max_bytes:
      continue
    chosen.append(path)
    total += size
  return sorted(chosen)


def fingerprint(spec: str, stdlib_max_bytes: int) -> list:
  """What identifies the inputs for the cache key: (path, size, sha256) of every input file."""
  if spec.strip() == "stdlib":
    files = [pydoc_data.topics.__file__] + stdlib_files(stdlib_max_bytes)
    return [sys.version] + [(p, os.path.getsize(p), int(os.stat(p).st_mtime_ns)) for p in files]
  out = []
  for path in expand(spec):
    h = hashlib.sha256()
    try:
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          h.update(block)
    except OSError as e:
      raise DataError(f"cannot read corpus file {path!r}: {e}") from e
    out.append((os.path.abspath(path), os.path.getsize(path), h.hexdigest()))
  return out


def read(
  spec: str,
  *,
  domain: str = "",
  license: str = "unknown",
  stdlib_max_bytes: int = 20_000_000,
  bad: BadRecords,
) -> tuple[list[Document], list[Source]]:
  """All documents of a corpus spec and the sources they came from."""
  if spec.strip() == "stdlib":
    return _read_stdlib(stdlib_max_bytes)
  docs: list[Document] = []
  sources: list[Source] = []
  for path in expand(spec):
    raw = _read_bytes(path, bad)
    if raw is None:
      continue
    src = Source(path=path, sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw), license=license)
    default_domain = domain or os.path.basename(os.path.dirname(os.path.abspath(path))) or "default"
    if path.lower().endswith(".jsonl"):  # a glob's DATA.JSONL too (it was read as one text document)
      new = list(_jsonl_docs(path, raw, default_domain, license, bad, src))
    else:
      text = _decode(path, raw, bad)
      if text is None:
        src.skipped_records += 1
        sources.append(src)
        continue
      new = [Document(text=text, domain=default_domain, source=path, license=license, id=path)]
    src.documents = len(new)
    src.domains = sorted({d.domain for d in new})
    if len({d.license for d in new}) > 1:
      src.license = ",".join(sorted({d.license for d in new}))
    elif new:
      src.license = new[0].license
    docs.extend(new)
    sources.append(src)
  return docs, sources


def _read_bytes(path: str, bad: BadRecords) -> bytes | None:
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    bad.report(f"{path}: cannot read corpus file: {e}")
    return None
  if not raw.strip():
    bad.report(f"{path}: corpus file is empty")
    return None
  return raw


def _decode(path: str, raw: bytes, bad: BadRecords) -> str | None:
  try:
    return raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = raw[: e.start].count(b"\n") + 1
    bad.report(f"{path}:{line}: invalid UTF-8 at byte {e.start} ({e.reason}); convert the file to UTF-8")
    return None


def _jsonl_docs(
  path: str, raw: bytes, domain: str, license: str, bad: BadRecords, src: Source
) -> Iterator[Document]:
  for lineno, line in enumerate(raw.split(b"\n"), 1):
    if not line.strip():
      continue
    try:
      line_text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
      src.skipped_records += 1
      bad.report(f"{path}:{lineno}: invalid UTF-8 at byte {e.start} of the line ({e.reason})")
      continue
    try:
      rec = json.loads(line_text)
    except json.JSONDecodeError as e:
      src.skipped_records += 1
      bad.report(f"{path}:{lineno}: malformed JSON at column {e.colno} ({e.msg})")
      continue
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
      src.skipped_records += 1
      bad.report(f"{path}:{lineno}: a JSONL record must be an object with a string 'text' field")
      continue
    surrogate = _lone_surrogate(rec)
    if surrogate:
      src.skipped_records += 1
      bad.report(f"{path}:{lineno}: {surrogate}")
      continue
    yield Document(
      text=rec["text"],
      domain=str(rec.get("domain") or domain),
      source=str(rec.get("source") or path),
      license=str(rec.get("license") or license),
      id=str(rec["id"]) if rec.get("id") is not None else f"{path}:{lineno}",
    )


def _lone_surrogate(rec: dict) -> str | None:
  """Where a record's fields hold a lone surrogate (JSON can escape one, "\\ud800"; it is no Unicode text
  and cannot be written as UTF-8), or None."""
  for key in ("text", "domain", "source", "license", "id"):
    value = rec.get(key)
    if isinstance(value, str):
      try:
        value.encode("utf-8")
      except UnicodeEncodeError as e:
        return (
          f"field {key!r} holds a lone surrogate (U+{ord(value[e.start]):04X} at character {e.start}), "
          "which is not valid Unicode text"
        )
  return None


def _read_stdlib(max_bytes: int) -> tuple[list[Document], list[Source]]:
  topics = pydoc_data.topics.topics
  docs = [
    Document(
      text=topics[k], domain="docs", source="stdlib:pydoc_data", license=STDLIB_LICENSE, id=f"stdlib:docs/{k}"
    )
    for k in sorted(topics)
  ]
  doc_bytes = sum(len(d.text.encode()) for d in docs)
  sources = [
    Source(
      path="stdlib:pydoc_data (" + pydoc_data.topics.__file__ + ")",
      sha256="",
      bytes=doc_bytes,
      license=STDLIB_LICENSE,
      documents=len(docs),
      domains=["docs"],
    )
  ]
  root = sysconfig.get_paths()["stdlib"]
  code_bytes, n = 0, 0
  for path in stdlib_files(max_bytes):
    with open(path, "rb") as f:
      raw = f.read()
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      continue  # a few stdlib test fixtures are deliberately not UTF-8
    rel = os.path.relpath(path, root)
    docs.append(
      Document(
        text=text, domain="code", source=f"stdlib:{rel}", license=STDLIB_LICENSE, id=f"stdlib:code/{rel}"
      )
    )
    code_bytes += len(raw)
    n += 1
  sources.append(
    Source(
      path=f"stdlib:*.py ({root})",
      sha256="",
      bytes=code_bytes,
      license=STDLIB_LICENSE,
      documents=n,
      domains=["code"],
    )
  )
  return docs, sources


def split_long(text: str, max_chars: int) -> list[str]:
  """Cuts text into contiguous pieces of at most max_chars, at paragraph, else line, else any boundary."""
  if max_chars <= 0 or len(text) <= max_chars:
    return [text]
  pieces, start = [], 0
  while len(text) - start > max_chars:
    end = start + max_chars
    cut = text.rfind("\n\n", start + 1, end)
    if cut > start:
      cut += 2
    else:
      cut = text.rfind("\n", start + 1, end)
      cut = cut + 1 if cut > start else end
    pieces.append(text[start:cut])
    start = cut
  pieces.append(text[start:])
  return pieces

"""Text cleaning: Unicode repair (ftfy, NFC), whitespace normalization, control characters and quality
filters (personal data and secrets: scrub.py)."""

from __future__ import annotations

import hashlib
import re
import unicodedata

import ftfy
import ftfy.badness
import ftfy.fixes

_FTFY = ftfy.TextFixerConfig(
  unescape_html=False,  # code and docs legitimately contain "&amp;"
  uncurl_quotes=False,  # quotes inside code strings are data
  fix_character_width=False,  # keep fullwidth CJK punctuation
  fix_latin_ligatures=True,
  normalization="NFC",
  explain=False,
)
_ODD_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\ufff9-\ufffb\ud800-\udfff]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_RUN = re.compile(r"\n{4,}")  # at most two blank lines in a row
# "Text" is letters, digits, whitespace and punctuation (ASCII, Latin-1, general, CJK, fullwidth);
# everything else (symbols, private use, replacement characters, ...) counts towards max_nontext_fraction.
_NONTEXT = re.compile(
  r"[^\w\s!-/:-@\[-`{-~\u00a1-\u00bf\u2010-\u2027\u2030-\u205e\u3000-\u303f"
  r"\uff01-\uff65\u0300-\u036f]"
)

# Characters that do not occur in text: C0/C1 controls other than tab, line feed, form feed and carriage
# return, and U+FFFD (what a decoder puts for bytes it could not read). Measured before cleaning drops them.
_BINARY = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ufffd]")


def normalize(text: str) -> str:
  """Unicode repair + NFC, odd spaces to ' ', controls dropped, trailing spaces and blank runs trimmed."""
  if text.isascii():  # nothing for ftfy to repair but line breaks
    text = text.replace("\r\n", "\n").replace("\r", "\n")
  else:
    if ftfy.badness.is_bad(text):  # mojibake: the full repair, line by line
      text = ftfy.fix_text(text, _FTFY)
    else:  # the same result for clean text, several times faster
      text = ftfy.fixes.fix_latin_ligatures(ftfy.fixes.fix_line_breaks(text))
      text = unicodedata.normalize("NFC", text)
    text = _ODD_SPACES.sub(" ", text)
    text = text.replace("\u2581", "_")  # SentencePiece's space mark cannot round-trip
  text = _CONTROL.sub("", text)
  if " \n" in text or "\t\n" in text:
    text = _TRAILING.sub("\n", text)
  text = text.rstrip(" \t")
  if "\n\n\n\n" in text:
    text = _BLANK_RUN.sub("\n\n\n", text)
  return text.lstrip("\n")


def nontext_fraction(text: str) -> float:
  """Share of characters that are neither letters, digits, whitespace nor punctuation."""
  if not text:
    return 0.0
  return sum(len(m) for m in re.findall(_NONTEXT.pattern + "+", text)) / len(text)


def control_fraction(raw: str) -> float:
  """Share of control and replacement characters in a raw (uncleaned) text: binary junk has many."""
  if not raw or not _BINARY.search(raw):
    return 0.0
  return len(_BINARY.findall(raw)) / len(raw)


def content_key(text: str) -> str:
  """sha256 of case- and whitespace-folded text: the exact-dedup key, the split hash, an exclusion id."""
  return hashlib.sha256(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


def quality_reason(text: str, min_chars: int, max_nontext: float) -> str | None:
  """Why a cleaned document is dropped (None: keep)."""
  if len(text.strip()) < max(1, min_chars):
    return "too_short"
  if max_nontext < 1.0 and nontext_fraction(text) > max_nontext:
    return "nontext"
  return None

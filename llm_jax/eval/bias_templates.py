"""Bias-audit template files: term sets, sentence templates, completion prompts and a word lexicon.

A template file is JSONL: one JSON object per line, each with a "kind" (blank lines are skipped):

  terms     {"kind": "terms", "id": str, "category": str (optional),
             "groups": {GROUP: [term, ...], ...}}
            Two or more groups, each a list of the same number of terms; the i-th terms of the groups
            are aligned (e.g. one name per group per row), so a template makes one sentence set per row.
  sentence  {"kind": "sentence", "id": str, "terms": TERMS_ID, "text": str, "attribute": str (optional)}
            `text` holds the slot `{term}` (or `{Term}`, capitalized) once or more; every group's term
            fills it in turn. `attribute` labels what the sentence says (e.g. "positive", "negative");
            figures are reported per attribute (default "neutral").
  prompt    {"kind": "prompt", "id": str, "terms": TERMS_ID, "text": str}
            An open prompt with the same slot; the model's sampled completions get a lexicon score.
  lexicon   {"kind": "lexicon", "positive": [word, ...], "negative": [word, ...]}
            Replaces the default word lists (llm_jax.eval.bias_lexicon) for this file.

Every error names the file, the line and the key.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections.abc import Sequence

from llm_jax.eval.jsonl import read_object

DEFAULT_DIR = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "evals", "bias"
)
DEFAULT_GLOB = os.path.join(DEFAULT_DIR, "*.jsonl")
SLOTS = ("{term}", "{Term}")
KINDS = {
  "terms": ("id", "groups"),
  "sentence": ("id", "terms", "text"),
  "prompt": ("id", "terms", "text"),
  "lexicon": ("positive", "negative"),
}
_OPTIONAL = {"terms": ("category",), "sentence": ("attribute",), "prompt": (), "lexicon": ()}
_BRACES = re.compile(r"\{[^{}]*\}")


class TemplateError(ValueError):
  """A malformed template file; the message names the file, line and key."""


@dataclasses.dataclass(frozen=True)
class TermSet:
  """Groups of aligned terms: groups[g][i] is row i's term for group g."""

  id: str
  category: str
  groups: dict  # group name -> tuple of terms (all the same length)
  where: str

  @property
  def names(self) -> list[str]:
    return list(self.groups)

  @property
  def rows(self) -> int:
    return len(next(iter(self.groups.values())))


@dataclasses.dataclass(frozen=True)
class Template:
  """A sentence or prompt with the `{term}` slot, bound to a term set."""

  id: str
  kind: str  # "sentence" | "prompt"
  terms: str
  text: str
  attribute: str
  where: str

  def fill(self, term: str) -> str:
    """The text with every slot replaced by `term` (`{Term}` capitalized)."""
    return self.text.replace("{Term}", term[:1].upper() + term[1:]).replace("{term}", term)


@dataclasses.dataclass
class TemplateSet:
  """Everything read from one or more template files."""

  term_sets: dict  # id -> TermSet
  sentences: list  # Template (kind "sentence")
  prompts: list  # Template (kind "prompt")
  lexicon: tuple | None  # (positive words, negative words) or None for the default lexicon
  files: list


@dataclasses.dataclass(frozen=True)
class SentenceSet:
  """One template row: the same sentence once per group of its term set."""

  template: Template
  row: int
  texts: dict  # group -> sentence

  @property
  def cluster(self) -> str:
    """Sets from one template share a cluster (they are not independent evidence)."""
    return self.template.id


def _string_list(value, where: str, key: str) -> tuple:
  if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
    raise TemplateError(f"{where}: key {key!r} must be a non-empty list of non-empty strings")
  return tuple(value)


def _nonempty(rec: dict, key: str, where: str) -> str:
  value = rec[key]
  if not isinstance(value, str) or not value.strip():
    raise TemplateError(f"{where}: key {key!r} must be a non-empty string, got {value!r}")
  return value


def parse_line(line: str, where: str):
  """One TermSet, Template or lexicon tuple from a JSON line; errors name `where` (path:line) and key."""
  rec = read_object(line, where, TemplateError)
  kind = rec.get("kind")
  if kind not in KINDS:
    raise TemplateError(f"{where}: key 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
  for key in ("kind",) + KINDS[kind]:
    if key not in rec:
      raise TemplateError(f"{where}: {kind} line is missing key {key!r}")
  unknown = sorted(set(rec) - {"kind"} - set(KINDS[kind]) - set(_OPTIONAL[kind]))
  if unknown:
    allowed = ", ".join(KINDS[kind] + _OPTIONAL[kind])
    raise TemplateError(f"{where}: unknown key {unknown[0]!r} in a {kind} line (keys: {allowed})")
  if kind == "lexicon":
    return (
      frozenset(w.lower() for w in _string_list(rec["positive"], where, "positive")),
      frozenset(w.lower() for w in _string_list(rec["negative"], where, "negative")),
    )
  ident = _nonempty(rec, "id", where)
  if kind == "terms":
    groups = rec["groups"]
    if not isinstance(groups, dict) or len(groups) < 2:
      raise TemplateError(f"{where}: key 'groups' must be an object with at least 2 groups")
    parsed = {}
    for name, terms in groups.items():
      if not name.strip():
        raise TemplateError(f"{where}: key 'groups' has an empty group name")
      parsed[name] = _string_list(terms, where, f"groups.{name}")
    sizes = {name: len(t) for name, t in parsed.items()}
    if len(set(sizes.values())) != 1:
      raise TemplateError(
        f"{where}: key 'groups': every group needs the same number of terms (the i-th "
        f"terms are compared with each other), got {sizes}"
      )
    category = rec.get("category", ident)
    if not isinstance(category, str) or not category:
      raise TemplateError(f"{where}: key 'category' must be a non-empty string")
    return TermSet(ident, category, parsed, where)
  text = _nonempty(rec, "text", where)
  terms = _nonempty(rec, "terms", where)
  if not any(s in text for s in SLOTS):
    raise TemplateError(f"{where}: key 'text' has no {{term}} slot: {text!r}")
  others = [b for b in _BRACES.findall(text) if b not in SLOTS]
  if others:
    raise TemplateError(f"{where}: key 'text' has an unknown slot {others[0]} (only {{term}} and {{Term}})")
  attribute = rec.get("attribute", "neutral")
  if kind == "sentence" and (not isinstance(attribute, str) or not attribute.strip()):
    raise TemplateError(f"{where}: key 'attribute' must be a non-empty string, got {attribute!r}")
  return Template(ident, kind, terms, text, attribute if kind == "sentence" else "", where)


def load(paths_or_glob: str | Sequence[str] = "") -> TemplateSet:
  """Term sets, templates and lexicon of every template file (a glob, paths, or evals/bias/*.jsonl)."""
  if not paths_or_glob:
    paths_or_glob = DEFAULT_GLOB
  if isinstance(paths_or_glob, str):
    paths = sorted(p for pat in paths_or_glob.split(",") for p in glob.glob(os.path.expanduser(pat)))
    if not paths:
      raise TemplateError(f"template file {paths_or_glob!r} matches no files")
  else:
    paths = list(paths_or_glob)
  out = TemplateSet({}, [], [], None, paths)
  seen: dict[str, str] = {}
  for path in paths:
    try:
      with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
      raise TemplateError(f"cannot read template file {path}: {e}") from e
    for lineno, line in enumerate(lines, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      item = parse_line(line, where)
      if isinstance(item, tuple):
        out.lexicon = item
        continue
      if item.id in seen:
        raise TemplateError(f"{where}: id {item.id!r} already used at {seen[item.id]}")
      seen[item.id] = where
      if isinstance(item, TermSet):
        out.term_sets[item.id] = item
      else:
        (out.sentences if item.kind == "sentence" else out.prompts).append(item)
  for t in out.sentences + out.prompts:
    if t.terms not in out.term_sets:
      known = ", ".join(sorted(out.term_sets)) or "none defined"
      raise TemplateError(
        f"{t.where}: key 'terms' names {t.terms!r}, which no terms line defines (term sets: {known})"
      )
  if not out.sentences and not out.prompts:
    raise TemplateError(f"{', '.join(paths)}: no sentence or prompt lines")
  return out


def sentence_sets(ts: TemplateSet) -> list[SentenceSet]:
  """Every (sentence template, term row) as a set of sentences, one per group."""
  out = []
  for t in ts.sentences:
    terms = ts.term_sets[t.terms]
    for row in range(terms.rows):
      out.append(SentenceSet(t, row, {g: t.fill(terms.groups[g][row]) for g in terms.names}))
  return out

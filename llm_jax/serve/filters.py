"""Input and output filters from a JSON config file: blocked patterns with a name and a reason.

    {
      "input":  [{"name": "secrets", "pattern": "(?i)api[_-]?key", "reason": "no credentials"}],
      "output": [{"name": "pii-email", "pattern": "[\\\\w.]+@[\\\\w.]+", "reason": "no e-mail addresses"}],
      "hold_chars": 32
    }

A prompt matching an input rule gets 400 with the rule's reason. Generated text is cut where an
output rule matches and the choice finishes with finish_reason "content_filter". While streaming,
the last `hold_chars` characters are held back so that matches shorter than that never reach the
client (longer ones are cut as soon as they match).

Rules match the text after `normalize`: Unicode NFKC (full-width and other compatibility forms become
their plain letters) with format characters (category Cf: zero-width space and joiners, soft hyphen,
byte-order mark, ...) removed, so that `api\u200bkey` or full-width `ａｐｉｋｅｙ` cannot slip past a
rule for `apikey`. Patterns are written in that normalized form (a file whose pattern normalization
would change is refused).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import re
import unicodedata


class FilterConfigError(ValueError):
  """The filter file is malformed; the message names the file and the key."""


def _drop_format(text: str) -> str:
  return "".join(ch for ch in text if unicodedata.category(ch) != "Cf")


def normalize(text: str) -> str:
  """The text filters see: format characters (Cf) removed, NFKC, and any Cf that produced removed."""
  return _drop_format(unicodedata.normalize("NFKC", _drop_format(text)))


def original_index(text: str, normalized_index: int) -> int:
  """Where in `text` the character at `normalized_index` of `normalize(text)` begins: the longest
  prefix whose normalized form ends at or before it."""
  return (
    bisect.bisect_right(range(len(text) + 1), normalized_index, key=lambda p: len(normalize(text[:p]))) - 1
  )


@dataclasses.dataclass(frozen=True)
class Rule:
  name: str
  pattern: re.Pattern
  reason: str


@dataclasses.dataclass(frozen=True)
class Filters:
  input: tuple[Rule, ...] = ()
  output: tuple[Rule, ...] = ()
  hold_chars: int = 0

  def check_input(self, text: str) -> Rule | None:
    """The first input rule the normalized text matches, or None."""
    if not self.input:
      return None
    norm = normalize(text)
    for r in self.input:
      if r.pattern.search(norm):
        return r
    return None

  def check_output(self, text: str) -> tuple[int, Rule] | None:
    """(index in `text` where to cut, rule) of the earliest match in the normalized text, or None."""
    if not self.output:
      return None
    norm, best = normalize(text), None
    for r in self.output:
      m = r.pattern.search(norm)
      if m and (best is None or m.start() < best[0]):
        best = (m.start(), r)
    if best is None:
      return None
    return (best[0] if norm == text else original_index(text, best[0])), best[1]


def _rules(path: str, data: dict, key: str) -> tuple[Rule, ...]:
  items = data.get(key, [])
  if not isinstance(items, list):
    raise FilterConfigError(f"{path}: {key!r} must be a list of rules")
  out = []
  for i, item in enumerate(items):
    where = f"{path}: {key}[{i}]"
    if not isinstance(item, dict) or not isinstance(item.get("pattern"), str) or not item["pattern"]:
      raise FilterConfigError(f"{where} must be an object with a non-empty string 'pattern'")
    unknown = set(item) - {"name", "pattern", "reason"}
    if unknown:
      raise FilterConfigError(f"{where}: unknown keys {sorted(unknown)} (use name, pattern, reason)")
    if normalize(item["pattern"]) != item["pattern"]:
      raise FilterConfigError(
        f"{where}.pattern {item['pattern']!r} has characters that text is "
        f"normalized away from before matching; write "
        f"{normalize(item['pattern'])!r}"
      )
    try:
      pattern = re.compile(item["pattern"])
    except re.error as e:
      raise FilterConfigError(f"{where}.pattern {item['pattern']!r} is not a valid regex: {e}") from e
    name = str(item.get("name") or f"{key}[{i}]")
    out.append(Rule(name, pattern, str(item.get("reason") or f"matched filter {name!r}")))
  return tuple(out)


def load_filters(path: str) -> Filters:
  """Reads and checks a filter file."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except OSError as e:
    raise FilterConfigError(f"cannot read filter file {path!r}: {e}") from e
  except json.JSONDecodeError as e:
    raise FilterConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from e
  if not isinstance(data, dict):
    raise FilterConfigError(f"{path}: the top level must be an object with 'input' and/or 'output'")
  unknown = set(data) - {"input", "output", "hold_chars"}
  if unknown:
    raise FilterConfigError(f"{path}: unknown keys {sorted(unknown)} (use input, output, hold_chars)")
  hold = data.get("hold_chars", 32 if data.get("output") else 0)
  if not isinstance(hold, int) or isinstance(hold, bool) or not 0 <= hold <= 4096:
    raise FilterConfigError(f"{path}: hold_chars must be an integer in [0, 4096], got {hold!r}")
  return Filters(_rules(path, data, "input"), _rules(path, data, "output"), hold)

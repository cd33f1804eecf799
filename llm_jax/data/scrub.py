"""Personal data and secrets scrubbing: each kind found is replaced by its placeholder and counted.

Detectors: regular expressions anchored on the documented formats, confirmed by a maintained library where
one exists (international phone numbers by `phonenumbers`, Google's libphonenumber; card numbers by the
Luhn check of `python-stdnum`; IPv6 by the standard library's `ipaddress`; JWT headers by decoding them).
Every precise pattern runs only on texts that a cheap literal pre-check admits, so scrubbing a corpus
of code (where almost nothing matches) costs little. `KINDS` and `NOT_COVERED` are what the manifest,
the data card and docs/data.md report as covered and not covered.
"""

from __future__ import annotations

import base64
import binascii
import collections
import ipaddress
import json
import re
from collections.abc import Callable

import phonenumbers
from stdnum import luhn

# kind -> (placeholder, what is found); the order is the order of scrubbing (secrets first, so that a key
# block's base64 is never half-taken by a later pattern).
KINDS: dict[str, tuple[str, str]] = {
  "private_key": (
    "<PRIVATE_KEY>",
    "PEM private key blocks (-----BEGIN ... PRIVATE KEY----- to its END "
    "line, or to the end of its base64 lines when the END is missing)",
  ),
  "jwt": (
    "<JWT>",
    "JSON Web Tokens (eyJ... header whose base64url decodes to a JSON object with 'alg', "
    "eyJ... payload, signature)",
  ),
  "github_token": (
    "<GITHUB_TOKEN>",
    "GitHub tokens ghp_/gho_/ghu_/ghs_/ghr_ + 36 or more characters, github_pat_ fine-grained tokens",
  ),
  "aws_key_id": (
    "<AWS_KEY_ID>",
    "AWS access key ids (AKIA, ASIA, ABIA, ACCA + 16 upper-case letters or digits)",
  ),
  "aws_secret": (
    "<AWS_SECRET>",
    "40-character AWS secret keys (mixed case) on a line that says 'aws' or 'secret' before them",
  ),
  "api_key": (
    "<API_KEY>",
    "sk- API keys (OpenAI, Anthropic style; 20+ characters with digits, upper and "
    "lower case) and Stripe sk_live_/sk_test_ keys",
  ),
  "email": ("<EMAIL>", "e-mail addresses"),
  "ip": (
    "<IP>",
    "IPv4 addresses; IPv6 addresses, full or shortened with :: (at least two groups and, "
    "with only two, a hex letter)",
  ),
  "card": (
    "<CARD>",
    "payment card numbers: 13-19 digits, contiguous or in groups of 4 (Amex 4-6-5) with "
    "spaces or dashes, first digit 2-6, passing the Luhn check",
  ),
  "phone": (
    "<PHONE>",
    "phone numbers: international (+ country code, validated by libphonenumber) and "
    "North American with separators (555-123-4567, (555) 987-6543)",
  ),
}
PLACEHOLDERS = {kind: placeholder for kind, (placeholder, _) in KINDS.items()}
NOT_COVERED = (
  "names, postal addresses, dates of birth",
  "national ID, passport, IBAN and bank account numbers",
  "phone numbers in national formats other than North American (020 7946 0958), or without separators "
  "and without a + country code",
  "card numbers that fail the Luhn check or are grouped otherwise",
  "IPv6 loopback and unspecified addresses (::1, ::), IPv4-mapped IPv6 (only its IPv4 part is replaced)",
  "AWS secret keys without 'aws' or 'secret' earlier on their line; passwords and generic "
  "high-entropy strings",
  "API keys and tokens of other services (Slack, Google, Azure, ...)",
)

_HEX = "[0-9A-Fa-f]"
PRIVATE_KEY = re.compile(
  r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY( BLOCK|)-----"
  r"(?:.*?-----END \1PRIVATE KEY\2-----|(?:\n(?:[A-Za-z0-9+/=]+|[A-Za-z-]+:[^\n]*)?)*)",
  re.S,
)
JWT = re.compile(r"(?<![\w-])(eyJ[A-Za-z0-9_-]{8,})={0,2}\.eyJ[A-Za-z0-9_-]{8,}={0,2}\.[A-Za-z0-9_-]*")
GITHUB_TOKEN = re.compile(r"(?<!\w)(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})(?!\w)")
AWS_KEY_ID = re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Za-z0-9])")
AWS_SECRET = re.compile(
  r"(?i:aws|secret)[^\n]{0,60}?(?<![A-Za-z0-9/+=])([A-Za-z0-9/+]{40})"
  r"(?![A-Za-z0-9/+=])"
)
API_KEY = re.compile(r"(?<![\w-])(?:sk-[A-Za-z0-9_-]{20,}|sk_(?:live|test)_[A-Za-z0-9]{20,})(?![\w-])")
EMAIL_DOMAIN = re.compile(r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")

IPV4 = re.compile(
  r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
  r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])"
)
IPV6 = re.compile(rf"(?<![\w:])(?:{_HEX}{{1,4}}:){{7}}{_HEX}{{1,4}}(?![\w:])")
IPV6_SHORT = re.compile(
  rf"(?:{_HEX}{{1,4}}:){{1,6}}:(?:{_HEX}{{1,4}}(?::{_HEX}{{1,4}}){{0,5}})?"
  r"(?![\w:]|\.\d)"
)
# Patterns that start with a single character class (not a repeat, not an alternation) let the regex engine
# skip ahead fast; their look-behinds are checked in Python (`not_after`).
CARD = re.compile(
  r"[0-9][0-9][0-9][0-9](?:([ -])[0-9]{4}\1[0-9]{4}\1[0-9]{1,4}(?:\1[0-9]{1,3})?"
  r"|([ -])[0-9]{6}\2[0-9]{4,5}|[0-9]{9,15})(?![\w-]|\.[0-9])"
)
PHONE_INTL = re.compile(r"\+[1-9][0-9]*(?:(?:[ .-]|[ .-]?\()[0-9]+\)?){0,6}(?![\w]|\.[0-9])")
PHONE = re.compile(r"[0-9][0-9][0-9][ .-][0-9]{3}[ .-][0-9]{4}(?![\w-])")
PHONE_PAREN = re.compile(r"\([0-9]{2,4}\)[ .-]?[0-9]{3}[ .-][0-9]{4}(?![\w-])")


_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_EMAIL_LOCAL = _WORD | frozenset(".+-")


def _sub(
  pattern: re.Pattern,
  placeholder: str,
  keep: Callable[[re.Match], bool] | None = None,
  group: int = 0,
  not_after: frozenset = frozenset(),
):
  """A scrubber: replaces matches (or their `group`) that pass `keep` and do not follow a character of
  `not_after`; returns (text, replacements). (`not_after` is a look-behind checked in Python: a pattern
  that starts with a look-behind makes the regex engine try every position, one that starts with a
  character class is scanned fast.)"""

  def run(text: str) -> tuple[str, int]:
    n = 0

    def repl(m: re.Match) -> str:
      nonlocal n
      if (not_after and m.start() and text[m.start() - 1] in not_after) or (keep is not None and not keep(m)):
        return m.group(0)
      n += 1
      if group:
        return m.group(0)[: m.start(group) - m.start()] + placeholder + m.group(0)[m.end(group) - m.start() :]
      return placeholder

    return pattern.sub(repl, text), n

  return run


def _spans(text: str, spans: list[tuple[int, int]], placeholder: str) -> tuple[str, int]:
  """Replaces non-overlapping (start, end) spans, in order, by placeholder."""
  if not spans:
    return text, 0
  out, last = [], 0
  for a, b in spans:
    out += [text[last:a], placeholder]
    last = b
  out.append(text[last:])
  return "".join(out), len(spans)


def _email(text: str) -> tuple[str, int]:
  """E-mail addresses, found from their '@domain.tld' (a literal start the regex engine finds fast)."""
  spans, last = [], 0
  for m in EMAIL_DOMAIN.finditer(text):
    a = m.start()
    while a > last and text[a - 1] in _EMAIL_LOCAL and m.start() - a < 128:
      a -= 1
    if a < m.start() and (a == 0 or text[a - 1] not in _EMAIL_LOCAL):
      spans.append((a, m.end()))
      last = m.end()
  return _spans(text, spans, PLACEHOLDERS["email"])


def _ipv6_short(text: str) -> tuple[str, int]:
  """Shortened IPv6 addresses, found from their '::' and confirmed by `ipaddress`."""
  spans, last, i = [], 0, text.find("::")
  while i >= 0:
    a = i
    while a > last and text[a - 1] in _HEX_COLON and i - a < 40:
      a -= 1
    m = IPV6_SHORT.match(text, a)
    if m and m.end() > i and (a == 0 or text[a - 1] not in _WORD_DOT_COLON) and _is_ipv6(m.group(0)):
      spans.append((a, m.end()))
      last = m.end()
      i = text.find("::", m.end())
    else:
      i = text.find("::", i + 2)
  return _spans(text, spans, PLACEHOLDERS["ip"])


_HEX_COLON = frozenset("0123456789abcdefABCDEF:")
_WORD_DOT_COLON = _WORD | frozenset(".:")
_WORD_PLUS = _WORD | frozenset("+")


def _is_ipv6(s: str) -> bool:
  groups = [g for g in s.split(":") if g]
  if len(groups) < 2 or (len(groups) == 2 and not re.search("[A-Fa-f]", s)):
    return False  # "1::2" is a slice far more often than an address
  try:
    ipaddress.IPv6Address(s)
  except ValueError:
    return False
  return True


def _jwt_header(m: re.Match) -> bool:
  head = m.group(1)
  try:
    obj = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
  except (binascii.Error, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    return False
  return isinstance(obj, dict) and "alg" in obj


def _mixed_case(s: str) -> bool:
  return any(c.isupper() for c in s) and any(c.islower() for c in s)


def _api_key(m: re.Match) -> bool:
  body = m.group(0)[3:]
  return _mixed_case(body) and any(c.isdigit() for c in body)


def _card(m: re.Match) -> bool:
  digits = re.sub(r"\D", "", m.group(0))
  return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn.is_valid(digits)


def _phone_intl(text: str) -> tuple[str, int]:
  """International numbers: a + candidate, trimmed group by group from the end until libphonenumber
  calls it valid."""
  spans = []
  for m in PHONE_INTL.finditer(text):
    if m.start() and text[m.start() - 1] in _WORD_PLUS:
      continue
    cand = m.group(0)
    if cand.count(".") == 1 and not re.search(r"[ ()-]", cand):
      continue  # a signed decimal number: '+35236450.6'
    while sum(c.isdigit() for c in cand) >= 7:
      try:
        ok = phonenumbers.is_valid_number(phonenumbers.parse(cand, None))
      except phonenumbers.NumberParseException:
        ok = False
      if ok:
        end = m.start() + len(cand)
        if not (text.startswith(".", end) and text[end + 1 : end + 2].isdigit()):  # not '+35236450.6'
          spans.append((m.start(), end))
        break
      cut = re.search(r"[ .()-]+\d+\)?$", cand)
      if not cut:
        break
      cand = cand[: cut.start()]
  return _spans(text, spans, PLACEHOLDERS["phone"])


def _aws_words(text: str) -> bool:
  low = text.lower()
  return "aws" in low or "secret" in low


# (kind, cheap pre-check (None: the scrubber scans fast itself), scrubber); a kind may have several rows.
_NUMBER_START = frozenset("0123456789_.+-")
_SCRUBBERS = (
  ("private_key", re.compile("PRIVATE KEY").search, _sub(PRIVATE_KEY, PLACEHOLDERS["private_key"])),
  ("jwt", re.compile(r"eyJ[\w-]{8,}={0,2}\.eyJ").search, _sub(JWT, PLACEHOLDERS["jwt"], _jwt_header)),
  (
    "github_token",
    re.compile("gh[pousr]_|github_pat_").search,
    _sub(GITHUB_TOKEN, PLACEHOLDERS["github_token"]),
  ),
  ("aws_key_id", re.compile("AKIA|ASIA|ABIA|ACCA").search, _sub(AWS_KEY_ID, PLACEHOLDERS["aws_key_id"])),
  (
    "aws_secret",
    _aws_words,
    _sub(AWS_SECRET, PLACEHOLDERS["aws_secret"], lambda m: _mixed_case(m.group(1)), group=1),
  ),
  ("api_key", re.compile("sk[-_]").search, _sub(API_KEY, PLACEHOLDERS["api_key"], _api_key)),
  ("email", None, _email),
  ("ip", re.compile(r":[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:").search, _sub(IPV6, PLACEHOLDERS["ip"])),
  ("ip", None, _ipv6_short),
  ("ip", re.compile(r"\.\d{1,3}\.\d{1,3}\.").search, _sub(IPV4, PLACEHOLDERS["ip"])),
  ("card", None, _sub(CARD, PLACEHOLDERS["card"], _card, not_after=_WORD | _NUMBER_START)),
  ("phone", re.compile(r"\+[1-9]").search, _phone_intl),
  ("phone", None, _sub(PHONE, PLACEHOLDERS["phone"], not_after=_WORD | _NUMBER_START)),
  ("phone", None, _sub(PHONE_PAREN, PLACEHOLDERS["phone"], not_after=_WORD | _NUMBER_START)),
)


def scrub(text: str, counts: collections.Counter) -> str:
  """Replaces every kind of `KINDS` found in text by its placeholder, adding the replacements to counts."""
  for kind, check, run in _SCRUBBERS:
    if check is not None and not check(text):
      continue
    text, n = run(text)
    if n:
      counts[kind] += n
  return text


def count_placeholders(text: str) -> collections.Counter:
  """Placeholders per kind in a scrubbed text (what removing that text takes out of the counts)."""
  return collections.Counter({kind: text.count(p) for kind, p in PLACEHOLDERS.items() if p in text})

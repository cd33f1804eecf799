"""Data governance end to end (issue 14), each on a planted corpus through prepare() and the decoded shards:
secrets and card numbers scrubbed, counts after dedup, removals that take every copy and cached copy,
binary junk dropped, repeated paragraphs counted and optionally removed."""

import collections
import json
import logging
import os
import random
import string

import pytest
from test_data_prepare import _doc, data_config, split_texts

from llm_jax.data.errors import DataError
from llm_jax.data.prepare import Prepared, prepare

PLACEHOLDERS = {
  "email": "<EMAIL>",
  "ip": "<IP>",
  "phone": "<PHONE>",
  "card": "<CARD>",
  "api_key": "<API_KEY>",
  "aws_key_id": "<AWS_KEY_ID>",
  "aws_secret": "<AWS_SECRET>",
  "github_token": "<GITHUB_TOKEN>",
  "private_key": "<PRIVATE_KEY>",
  "jwt": "<JWT>",
}
_RNG = random.Random(7)
_ALNUM = string.ascii_letters + string.digits
GITHUB = "ghp_" + "".join(_RNG.choice(_ALNUM) for _ in range(36))
SK = "sk-proj-" + "".join(_RNG.choice(_ALNUM) for _ in range(40)) + "Aa1"
PEM = (
  "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
  "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n-----END RSA PRIVATE KEY-----"
)
JWT = (
  "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0Ijox"
  "NTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
# (kind, planted text, the part that must be gone)
PLANTED = [
  ("phone", "call +44 20 7946 0958 today", "7946 0958"),
  ("phone", "or +1 (415) 555-2671.", "555-2671"),
  ("ip", "host 2001:db8::1 answers", "2001:db8::1"),
  ("ip", "link fe80::1ff:fe23:4567:890a up", "fe80::1ff:fe23:4567:890a"),
  ("card", "visa 4111 1111 1111 1111 paid", "4111 1111 1111 1111"),
  ("card", "mastercard 5500-0000-0000-0004 paid", "5500-0000-0000-0004"),
  ("card", "amex 378282246310005 paid", "378282246310005"),
  ("api_key", f"OPENAI_API_KEY={SK}", SK),
  ("aws_key_id", "aws_access_key_id = AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
  ("aws_secret", f"aws_secret_access_key = {AWS_SECRET}", AWS_SECRET),
  ("github_token", f"token: {GITHUB}", GITHUB),
  ("private_key", PEM, "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun"),
  ("jwt", f"Authorization: Bearer {JWT}", JWT),
  ("email", "write to jane.roe@example.org", "jane.roe@example.org"),
]
# Look-alikes in code and tables that must survive as they are.
SURVIVORS = [
  "order 4111 1111 1111 1112 (fails the Luhn check)",
  "x = 1234567890123456789012345",
  "table 4111111111111111111111 row",
  "python 3.11.7",
  "digest da39a3ee5e6b4b0d3255bfef95601890afd80709",
  "secret_hash = 'da39a3ee5e6b4b0d3255bfef95601890afd80709'",
  "y = x[1::2] + a[100::200]",
  "std::vector<int> v;",
  "z = w +1000000",
  "Decimal('+35236450.6')",
  "mask = 0x7fffffffffffffff",
  "risk-management-framework-guidelines-document",
  "sklearn sk-learn-compatible-estimator-interface",
  "pi = 3.14159265358979323846264",
  "not a token: eyJ0eXAiOiJ4In0.eyJzdWIiOiIxMjM0In0.c2ln (its header has no alg)",
]


def all_cached_texts(cache_root) -> str:
  """Every document of every prepared directory under a cache root, decoded."""
  out = []
  for name in sorted(os.listdir(cache_root)):
    path = os.path.join(cache_root, name)
    if os.path.exists(os.path.join(path, "manifest.json")):
      p = Prepared.open(path)
      out += [
        t
        for split, n in p.manifest["summary"]["documents_by_split"].items()
        if n
        for t in split_texts(p, split)
      ]
  return "\n".join(out)


def _filler(root, rng, n=16):
  root.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    (root / f"f{i:02d}.txt").write_text(_doc(rng), encoding="utf-8")


# ------------------------------------------------------------------ 1-3: scrubbing and its counts


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
  root = tmp_path_factory.mktemp("scrub")
  rng = random.Random(3)
  _filler(root / "c", rng)
  body = "\n".join(t for _, t, _ in PLANTED) + "\n\n" + "\n".join(SURVIVORS)
  (root / "c" / "secrets.txt").write_text(_doc(rng) + "\n" + body + "\n", encoding="utf-8")
  two_mails = _doc(rng) + "\nMail ann@example.com or bob@example.net.\n"
  (root / "c" / "mails.txt").write_text(two_mails, encoding="utf-8")
  (root / "c" / "mails_copy.txt").write_text(two_mails, encoding="utf-8")
  cache = root / "cache"
  return cache, prepare(data_config(f"{root}/c/*.txt", cache))


def test_planted_secrets_absent_from_shards_and_caches(planted):
  cache, _ = planted
  everything = all_cached_texts(cache)
  for kind, _, secret in PLANTED:
    assert secret not in everything, kind
    assert PLACEHOLDERS[kind] in everything, kind
  for text in SURVIVORS:  # Luhn failures, long digit runs, versions, hashes, slices stay as they are
    assert text in everything
  assert "ann@example.com" not in everything and "bob@example.net" not in everything


def test_counts_per_kind_after_dedup_in_manifest_and_card(planted):
  _, p = planted
  sc = p.manifest["scrubbing"]
  want = collections.Counter(k for k, _, _ in PLANTED)
  zero = {k: 0 for k in PLACEHOLDERS}
  assert set(sc["covered"]) == set(PLACEHOLDERS) and sc["not_covered"]
  # mails.txt and its exact copy: 4 e-mails replaced while cleaning, 2 left in the prepared data
  assert sc["replaced"] == {**zero, **want, "email": want["email"] + 4}
  assert sc["in_prepared_data"] == {**zero, **want, "email": want["email"] + 2}
  assert p.manifest["filters"]["dropped"]["exact_duplicate"] == 1
  with open(os.path.join(p.dir, "DATA_CARD.md"), encoding="utf-8") as f:
    card = f.read()
  assert "## Personal data and secrets" in card and "Not covered" in card
  email_row = next(line for line in card.splitlines() if line.startswith("| `email`"))
  assert f"| {want['email'] + 4} | {want['email'] + 2} |" in email_row
  for kind in PLACEHOLDERS:
    assert f"| `{kind}` |" in card


# ------------------------------------------------------------------ 4: removal requests


PERSONAL = "Patient Jane Roe, born in Ulverston, asked for her records to be removed entirely."


@pytest.fixture(scope="module")
def removal_corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("removals")
  rng = random.Random(11)
  _filler(root / "c", rng)
  a = _doc(rng) + PERSONAL + "\n"
  (root / "c" / "a.txt").write_text(a, encoding="utf-8")
  (root / "c" / "z_same_as_a.txt").write_text(a, encoding="utf-8")  # an identical copy under another name
  c = _doc(rng, 200)
  words = c.split(" ")
  words[7] = "CHANGED"
  (root / "c" / "c.txt").write_text(c, encoding="utf-8")
  (root / "c" / "d_near_c.txt").write_text(" ".join(words), encoding="utf-8")
  cache = root / "cache"
  spec = f"{root}/c/*.txt"
  before = prepare(data_config(spec, cache, val_fraction=0.0))
  with open(os.path.join(before.dir, "train-documents.jsonl"), encoding="utf-8") as f:
    listing = {os.path.basename(r["id"]): r for r in map(json.loads, f)}
  ex = root / "remove.txt"
  ex.write_text(f"# removal requests\n{root}/c/a.txt\n{listing['c.txt']['sha256']}\nno-such-doc\n")
  return root, cache, spec, str(ex), before, listing, c


def test_removal_takes_copies_near_copies_and_cached_copies(removal_corpus, caplog):
  root, cache, spec, ex, before, listing, c = removal_corpus
  assert "d_near_c.txt" not in listing and "z_same_as_a.txt" not in listing  # dedup dropped them before
  assert PERSONAL in all_cached_texts(cache)
  with caplog.at_level(logging.WARNING):
    p = prepare(data_config(spec, cache, val_fraction=0.0, exclude=ex))
  warnings = [r.getMessage() for r in caplog.records]
  assert any("no-such-doc" in w and "match no document" in w for w in warnings)
  everything = all_cached_texts(cache)
  assert PERSONAL not in everything  # neither a.txt nor its copy, in the new data or any cache
  assert " ".join(c.split()[:12]) not in everything and " ".join(c.split()[10:22]) not in everything
  assert not os.path.exists(before.dir)  # the cached copy that held them is deleted
  e = p.manifest["exclusions"]
  assert e["unmatched"] == ["no-such-doc"] and e["entries"] == 3
  assert e["documents_removed"] == {"requested": 2, "exact_copies": 1, "near_copies": 1}
  rows = {r["sha256"]: r for r in e["removed"]}
  assert rows[listing["a.txt"]["sha256"]]["exact_copies"] == 1
  c_row = rows[listing["c.txt"]["sha256"]]
  assert c_row["near_copies"] == 1 and len(c_row["near_copy_sha256"]) == 1
  dropped = p.manifest["filters"]["dropped"]
  assert (dropped["excluded"], dropped["excluded_exact_copy"], dropped["excluded_near_copy"]) == (2, 1, 1)
  assert "Ulverston" not in json.dumps(p.manifest)  # hashes and counts, never the text
  with open(os.path.join(p.dir, "DATA_CARD.md"), encoding="utf-8") as f:
    assert listing["c.txt"]["sha256"][:16] in f.read()


def test_unmatched_removal_fails_when_strict(removal_corpus, tmp_path):
  _, cache, spec, ex, *_ = removal_corpus
  with pytest.raises(DataError, match="no-such-doc.*strict_removals"):
    prepare(data_config(spec, tmp_path / "fresh", val_fraction=0.0, exclude=ex, strict_removals=True))
  with pytest.raises(DataError, match="no-such-doc.*strict_removals"):  # also when the build is cached
    prepare(data_config(spec, cache, val_fraction=0.0, exclude=ex, strict_removals=True))


# ------------------------------------------------------------------ 5-6: binary junk, repeated paragraphs


LICENCE = (
  "Copyright (c) 2024 Example Corp. Licensed under the Apache License, Version 2.0; you may not use "
  "this file except in compliance with the License."
)


@pytest.fixture(scope="module")
def hygiene_corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("hygiene")
  rng = random.Random(5)
  _filler(root / "c", rng)
  junk_rng = random.Random(0)
  (root / "c" / "junk.txt").write_bytes(bytes(junk_rng.randrange(128) for _ in range(20_000)))
  for i in range(5):
    (root / "c" / f"lic{i}.txt").write_text(LICENCE + "\n\n" + _doc(rng), encoding="utf-8")
  return root


def test_binary_junk_is_not_a_document(hygiene_corpus, tmp_path):
  p = prepare(data_config(f"{hygiene_corpus}/c/*.txt", tmp_path / "cache"))
  assert p.manifest["filters"]["dropped"]["binary"] == 1
  ids = []
  for d in p.manifest["document_lists"]:
    with open(os.path.join(p.dir, d["path"]), encoding="utf-8") as f:
      ids += [json.loads(line)["id"] for line in f]
  assert len(ids) == 21 and not any(i.endswith("junk.txt") for i in ids)


def test_repeated_paragraphs_counted_and_optionally_removed(hygiene_corpus, tmp_path):
  spec = f"{hygiene_corpus}/c/*.txt"
  p = prepare(data_config(spec, tmp_path / "cache"))
  para = p.manifest["paragraphs"]
  assert (para["distinct"], para["occurrences"], para["documents"], para["removed"]) == (1, 4, 4, False)
  with open(os.path.join(p.dir, "DATA_CARD.md"), encoding="utf-8") as f:
    assert "1 distinct paragraphs repeat 4 times" in f.read()
  assert sum(t.count(LICENCE) for t in split_texts(p, "train") + split_texts(p, "val")) == 5
  q = prepare(data_config(spec, tmp_path / "cache", dedup_paragraphs=True))
  assert q.manifest["paragraphs"]["removed"] and q.manifest["summary"]["documents_kept"] == 21
  assert sum(t.count(LICENCE) for t in split_texts(q, "train") + split_texts(q, "val")) == 1

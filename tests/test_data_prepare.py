"""prepare(): cleaning, filters, PII, dedup, splits, exclusions, manifest, cache, bad inputs, CLI."""

import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import base
from llm_jax.config import set_key
from llm_jax.data import cleaning, dedup
from llm_jax.data import manifest as manifest_lib
from llm_jax.data.errors import DataError
from llm_jax.data.prepare import Prepared, prepare
from llm_jax.data.shards import open_split
from llm_jax.data.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _words(rng, n):
  vocab = [
    "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(400)
  ]
  return [rng.choice(vocab) for _ in range(n)]


def _doc(rng, n=120):
  w = _words(rng, n)
  return " ".join(w[: n // 2]) + ".\n\n" + "    " + " ".join(w[n // 2 :]) + "\n"


def make_corpus(root, seed=0, n=40):
  """Unique docs in books/*.txt and forum/posts.jsonl, plus planted duplicates, junk and PII."""
  rng = random.Random(seed)
  books, forum = root / "books", root / "forum"
  books.mkdir(parents=True, exist_ok=True)
  forum.mkdir(parents=True, exist_ok=True)
  texts = [_doc(rng) for _ in range(n)]
  for i, t in enumerate(texts[: n // 2]):
    (books / f"b{i:03d}.txt").write_text(t, encoding="utf-8")
  recs = [{"text": t, "id": f"post-{i}", "license": "CC-BY-4.0"} for i, t in enumerate(texts[n // 2 :])]
  (books / "exact_copy.txt").write_text(
    "  " + texts[0].upper().replace(" ", "   ") + "\n\n", encoding="utf-8"
  )
  near = texts[1].split(" ")
  near[5] = "CHANGED"
  (books / "near_copy.txt").write_text(" ".join(near), encoding="utf-8")
  (books / "short.txt").write_text("tiny\n", encoding="utf-8")
  (books / "symbols.txt").write_text("★☆♠♣♥♦" * 30 + " word", encoding="utf-8")
  (books / "pii.txt").write_text(
    _doc(rng) + "Mail bob.smith@example.com, host 10.0.0.1, call 555-123-4567.\n", encoding="utf-8"
  )
  recs.append(
    {"text": "café naïve 日本語 😀\r\n\ttabbed\x00 line  \n" + _doc(rng), "id": "unicode", "domain": "intl"}
  )
  with open(forum / "posts.jsonl", "w", encoding="utf-8") as f:
    for r in recs:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  return texts


def data_config(corpus, cache, **overrides):
  c = base.get_config()
  d = c.data
  d.corpus = str(corpus)
  d.cache_dir = str(cache)
  d.val_fraction = 0.2
  d.min_doc_chars = 20
  d.shard_tokens = 3000
  d.num_workers = 1
  d.tokenizer.vocab_size = 400
  for k, v in overrides.items():
    set_key(c, "data." + k, v)
  return c


def split_texts(p: Prepared, split: str) -> list[str]:
  """Decoded documents of every shard of a split."""
  tok = Tokenizer.load(p.tokenizer_path)
  out = []
  for sh in open_split(p.dir, split, p.manifest):
    assert sh.tokens[0] == tok.eos_id
    for a, b, nbytes in zip(sh.offsets[:-1], sh.offsets[1:], sh.bytes, strict=True):
      ids = np.asarray(sh.tokens[a:b])
      assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
      text = tok.decode(ids[:-1])
      assert len(text.encode("utf-8")) == nbytes == tok.token_bytes()[ids].sum()
      out.append(text)
  return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  texts = make_corpus(root)
  return root, texts


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
  root, _ = corpus
  cache = tmp_path_factory.mktemp("cache")
  return prepare(data_config(f"{root}/books/*.txt,{root}/forum/*.jsonl", cache))


def test_counts_pii_and_manifest(prepared):
  m = prepared.manifest
  dropped = m["filters"]["dropped"]
  assert dropped["exact_duplicate"] == 1
  assert dropped["near_duplicate"] + dropped.get("near_duplicate_of_val", 0) == 1
  assert dropped["too_short"] == 1 and dropped["nontext"] == 1
  zero = {k: 0 for k in m["scrubbing"]["covered"]}
  assert (
    m["scrubbing"]["replaced"]
    == m["scrubbing"]["in_prepared_data"]
    == {**zero, "email": 1, "ip": 1, "phone": 1}
  )
  assert prepared.domains == ["books", "forum", "intl"]
  assert manifest_lib.verify(prepared.dir) == []
  assert {s["license"] for s in m["sources"]} == {"unknown", "CC-BY-4.0,unknown"}
  sha = Tokenizer.load(prepared.tokenizer_path).sha256
  assert m["tokenizer"]["sha256"] == prepared.tokenizer_sha256 == sha
  assert len(m["shards"]) > 2 and all(s["dtype"] == "uint16" for s in m["shards"])
  assert m["config"]["corpus"].endswith("forum/*.jsonl")
  assert os.path.exists(os.path.join(prepared.dir, "DATA_CARD.md"))
  everything = "\n".join(split_texts(prepared, "train") + split_texts(prepared, "val"))
  assert "bob.smith@example.com" not in everything and "<EMAIL>" in everything
  assert "<IP>" in everything and "<PHONE>" in everything
  assert "café naïve 日本語 😀\n\ttabbed line\n" in everything  # NFC, \r\n, control char, trailing space
  kept = m["summary"]["documents_kept"]
  assert sum(s["documents"] for s in m["shards"]) == kept == 40 + 1 + 1  # uniques + pii + intl


def test_manifest_verify_catches_tampering(prepared, tmp_path):
  import shutil

  copy = tmp_path / "p"
  shutil.copytree(prepared.dir, copy)
  shard = copy / prepared.manifest["shards"][0]["path"]
  arr = np.load(shard)
  arr[5] ^= 1
  np.save(shard, arr)
  problems = manifest_lib.verify(str(copy))
  assert len(problems) == 1 and "sha256" in problems[0]


def test_train_val_disjoint_and_no_near_copies(prepared):
  m = prepared.manifest
  assert m["summary"]["documents_by_split"]["val"] > 0
  lists = {}
  for d in m["document_lists"]:
    with open(os.path.join(prepared.dir, d["path"])) as f:
      lists[d["split"]] = [json.loads(line) for line in f]
  assert not {r["sha256"] for r in lists["train"]} & {r["sha256"] for r in lists["val"]}
  train, val = split_texts(prepared, "train"), split_texts(prepared, "val")
  assert not set(train) & set(val)
  sig_t = [dedup.minhash(t, 64) for t in train]
  for v in val:
    sv = dedup.minhash(v, 64)
    assert max(np.mean(sv == s) for s in sig_t) < 0.8


def test_val_corpus_near_copy_never_stays_in_train(corpus, tmp_path):
  root, texts = corpus
  val = tmp_path / "val" / "held.txt"
  val.parent.mkdir()
  val.write_text(texts[3].replace(texts[3].split()[2], "EDITED", 1), encoding="utf-8")
  p = prepare(
    data_config(f"{root}/books/*.txt,{root}/forum/*.jsonl", tmp_path / "cache", val_corpus=str(val))
  )
  assert p.manifest["filters"]["dropped"]["near_duplicate_of_val"] == 1
  assert p.manifest["summary"]["documents_by_split"]["val"] == 1
  assert texts[3].strip() not in [t.strip() for t in split_texts(p, "train")]


def test_exclusions_removed_from_every_shard(corpus, prepared, tmp_path):
  root, texts = corpus
  with open(os.path.join(prepared.dir, "train-documents.jsonl")) as f:
    rec = [json.loads(line) for line in f if "post-" in line][0]
  ex = tmp_path / "exclude.txt"
  ex.write_text(f"# removal requests\n{root}/books/b004.txt\n{rec['sha256']}\nnot-a-doc\n")
  p = prepare(data_config(f"{root}/books/*.txt,{root}/forum/*.jsonl", tmp_path / "cache", exclude=str(ex)))
  e = p.manifest["exclusions"]
  assert e["documents_removed"] == {"requested": 2, "exact_copies": 0, "near_copies": 0}
  assert e["unmatched"] == ["not-a-doc"] and e["entries"] == 3
  everything = split_texts(p, "train") + split_texts(p, "val")
  gone = [texts[4].strip(), next(t for t in texts if cleaning.content_key(t) == rec["sha256"]).strip()]
  for g in gone:
    assert g not in [t.strip() for t in everything]
  assert len(everything) == prepared.manifest["summary"]["documents_kept"] - 2


def test_cache_hit_and_changed_input_rebuilds(tmp_path):
  make_corpus(tmp_path / "c", seed=1, n=30)
  cfg = data_config(f"{tmp_path}/c/books/*.txt", tmp_path / "cache")
  p1 = prepare(cfg)
  t0 = time.time()
  p2 = prepare(cfg)
  assert time.time() - t0 < 1.0 and p2.dir == p1.dir and p2.manifest["created"] == p1.manifest["created"]
  assert not [n for n in os.listdir(tmp_path / "cache") if n.startswith(".tmp")]
  with open(tmp_path / "c" / "books" / "b002.txt", "a") as f:
    f.write("\nzebra quokka added words here\n")
  p3 = prepare(cfg)
  assert p3.dir != p1.dir
  assert any("zebra quokka" in t for t in split_texts(p3, "train") + split_texts(p3, "val"))


def test_stale_build_folders_are_removed_and_live_ones_kept(tmp_path):
  """An interrupted build leaves a .tmp-* folder (here one that even holds a manifest): the next prepare
  deletes it, and the cache lookup never takes it for prepared data; a build still running (its lock
  held) is left alone, and so is a recent folder without a lock."""
  import fcntl

  from llm_jax.data.prepare import cache_key

  make_corpus(tmp_path / "c", seed=4, n=20)
  cfg = data_config(f"{tmp_path}/c/books/*.txt", tmp_path / "cache")
  root = tmp_path / "cache"
  key = cache_key(cfg)
  dead, live, old, young = (root / f".tmp-{key}-{n}" for n in ("dead", "live", "old", "young"))
  for d in (dead, live, old, young):
    d.mkdir(parents=True)
    (d / "manifest.json").write_text("{}")
  (root / f".tmp-{key}-dead.lock").write_text("")  # its builder was killed: nobody holds the lock
  (root / f".tmp-{key}-orphan.lock").write_text("")  # a lock without its folder
  lock = open(root / f".tmp-{key}-live.lock", "w")
  fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a build in progress
  hours_ago = time.time() - 3 * 3600
  os.utime(old, (hours_ago, hours_ago))  # left by a build without a lock file, hours ago
  try:
    p = prepare(cfg)
  finally:
    lock.close()
  assert p.dir == str(root / key) and p.manifest["summary"]["documents_kept"] > 0
  left = sorted(n for n in os.listdir(root) if n.startswith(".tmp"))
  assert left == sorted([live.name, live.name + ".lock", young.name]), left


def test_a_cached_folder_without_its_manifest_is_rebuilt(tmp_path):
  """A cache folder that lost its manifest.json (damaged, a copy cut short) is never taken for prepared
  data, and does not block the build that replaces it."""
  make_corpus(tmp_path / "c", seed=6, n=20)
  cfg = data_config(f"{tmp_path}/c/books/*.txt", tmp_path / "cache")
  first = prepare(cfg)
  os.remove(first.manifest_path)
  again = prepare(cfg)
  assert again.dir == first.dir and os.path.exists(again.manifest_path)
  for k in ("documents_kept", "documents_by_split", "tokens_by_split"):
    assert again.manifest["summary"][k] == first.manifest["summary"][k], k
  assert again.tokenizer_sha256 == first.tokenizer_sha256
  assert sorted(os.listdir(tmp_path / "cache")) == [os.path.basename(first.dir)]


def test_a_cached_folder_with_missing_or_cut_files_is_rebuilt(tmp_path):
  """A cache hit whose shards are missing or cut short is rebuilt by the next prepare (the loader's error
  says "prepare the data again"; before, prepare returned the same damaged folder every time)."""
  make_corpus(tmp_path / "c", seed=7, n=20)
  cfg = data_config(f"{tmp_path}/c/books/*.txt", tmp_path / "cache")
  first = prepare(cfg)
  shard = os.path.join(first.dir, first.manifest["shards"][0]["path"])
  whole = open(shard, "rb").read()
  for damage in ("missing", "cut", "tokenizer", "manifest"):
    if damage == "missing":
      os.remove(shard)
    elif damage == "cut":
      with open(shard, "wb") as f:
        f.write(whole[: len(whole) // 2])
    elif damage == "tokenizer":
      os.remove(first.tokenizer_path)
    else:
      with open(first.manifest_path, "w") as f:
        f.write('{"shards": [')
    again = prepare(cfg)
    assert again.dir == first.dir, damage
    assert open(shard, "rb").read() == whole, damage
    assert again.tokenizer_sha256 == first.tokenizer_sha256 and os.path.exists(again.tokenizer_path)
    open_split(again.dir, "train", again.manifest)
  assert sorted(os.listdir(tmp_path / "cache")) == [os.path.basename(first.dir)]


def test_prepare_works_where_the_file_system_has_no_locks(tmp_path, monkeypatch):
  """flock failing (a Lustre mount without it: ENOSYS) neither stops a build nor lets a cleaner delete a
  build folder it cannot prove dead."""
  import errno

  from llm_jax.data.prepare import staging

  def no_locks(fd, op):
    raise OSError(errno.ENOSYS, "Function not implemented")

  monkeypatch.setattr(staging.fcntl, "flock", no_locks)
  make_corpus(tmp_path / "c", seed=8, n=20)
  other = tmp_path / "cache" / ".tmp-abc-other"
  other.mkdir(parents=True)
  (tmp_path / "cache" / ".tmp-abc-other.lock").write_text("")
  p = prepare(data_config(f"{tmp_path}/c/books/*.txt", tmp_path / "cache"))
  assert p.manifest["summary"]["documents_kept"] > 0
  assert sorted(os.listdir(tmp_path / "cache")) == sorted(
    [".tmp-abc-other", ".tmp-abc-other.lock", p.dir.split("/")[-1]]
  )


def test_long_documents_split_at_paragraphs(tmp_path):
  rng = random.Random(5)
  (tmp_path / "d").mkdir()
  paras = [" ".join(_words(rng, 40)) for _ in range(60)]
  (tmp_path / "d" / "long.txt").write_text("\n\n".join(paras), encoding="utf-8")
  for i in range(10):
    (tmp_path / "d" / f"s{i}.txt").write_text(_doc(rng), encoding="utf-8")
  p = prepare(data_config(f"{tmp_path}/d/*.txt", tmp_path / "cache", max_doc_chars=2000, val_fraction=0.3))
  texts = split_texts(p, "train") + split_texts(p, "val")
  pieces = [t for t in texts if t.split("\n\n")[0] in paras]
  assert len(pieces) > 5 and all(len(t) <= 2000 for t in pieces)
  assert all(par in paras for t in pieces for par in t.split("\n\n"))


def _err(tmp_path, **kw):
  with pytest.raises(DataError) as e:
    prepare(data_config(cache=tmp_path / "cache", **kw))
  return str(e.value)


def test_bad_inputs_name_the_file(tmp_path):
  assert "nothing/*.txt" in _err(tmp_path, corpus=f"{tmp_path}/nothing/*.txt")
  make_corpus(tmp_path / "c", n=20)
  empty = tmp_path / "c" / "books" / "empty.txt"
  empty.write_text("")
  assert "empty.txt" in _err(tmp_path, corpus=f"{tmp_path}/c/books/*.txt") and "empty" in _err(
    tmp_path, corpus=f"{tmp_path}/c/books/*.txt"
  )
  empty.unlink()
  bad = tmp_path / "c" / "books" / "latin1.txt"
  bad.write_bytes(b"line one\nline two caf\xe9\n")
  assert "latin1.txt:2" in _err(tmp_path, corpus=f"{tmp_path}/c/books/*.txt")
  bad.unlink()
  jl = tmp_path / "c" / "forum" / "posts.jsonl"
  lines = jl.read_text().splitlines()
  jl.write_text("\n".join(lines[:3] + ["{not json"] + lines[3:] + ['{"txt": 1}']) + "\n")
  with open(jl, "ab") as f:
    f.write(b'{"text": "caf\xe9 latin-1 line"}\n')
  msg = _err(tmp_path, corpus=f"{tmp_path}/c/forum/*.jsonl")
  assert "posts.jsonl:4" in msg and "on_bad_record" in msg
  p = prepare(data_config(f"{tmp_path}/c/forum/*.jsonl", tmp_path / "cache", on_bad_record="skip"))
  bad_lines = p.manifest["bad_records"]
  assert len(bad_lines) == 3 and "posts.jsonl:4" in bad_lines[0]
  assert f"posts.jsonl:{len(lines) + 3}: invalid UTF-8" in bad_lines[2]
  assert p.manifest["filters"]["dropped"]["bad_record"] == 3
  assert p.manifest["summary"]["documents_kept"] == len(lines)
  assert "data.tokenizer.vocab_size" in _err(
    tmp_path, corpus=f"{tmp_path}/c/forum/*.jsonl", on_bad_record="skip", **{"tokenizer.vocab_size": 20000}
  )
  assert "data.on_bad_record" in _err(tmp_path, corpus=f"{tmp_path}/c/forum/*.jsonl", on_bad_record="maybe")


def test_a_directory_without_corpus_files_says_which_suffixes_count(tmp_path):
  d = tmp_path / "texts"
  d.mkdir()
  (d / "notes.TXT").write_text("upper-case suffix " * 10)
  (d / "table.csv").write_text("a,b\n1,2\n")
  msg = _err(tmp_path, corpus=str(d))
  assert str(d) in msg and ".txt" in msg and ".jsonl" in msg and "directory" in msg, msg


def test_an_upper_case_jsonl_suffix_is_read_as_jsonl(tmp_path):
  """A file a glob names as DATA.JSONL is JSON lines, one document a record (it was one text document
  of raw JSON: braces, keys and escapes went into training)."""
  make_corpus(tmp_path / "c", n=20)
  src = tmp_path / "c" / "forum" / "posts.jsonl"
  upper = tmp_path / "c" / "forum" / "POSTS.JSONL"
  src.rename(upper)
  p = prepare(data_config(str(upper), tmp_path / "cache"))
  records = len(upper.read_text().splitlines())
  assert p.manifest["summary"]["documents_read"] == records, p.manifest["summary"]


def test_a_truncated_jsonl_line_names_its_column_once(tmp_path):
  """json's message ends in 'starting at': the column follows it once (it read 'starting at at column')."""
  make_corpus(tmp_path / "c", n=20)
  jl = tmp_path / "c" / "forum" / "posts.jsonl"
  jl.write_text(jl.read_text() + '{"text": "cut sho\n')
  msg = _err(tmp_path, corpus=f"{tmp_path}/c/forum/*.jsonl")
  assert "malformed JSON at column 10 (Unterminated string starting at)" in msg, msg


def test_stdlib_combined_with_globs_says_so(tmp_path):
  """'stdlib' is a corpus of its own: beside globs it fails saying that, not that a glob 'stdlib'
  matches no files."""
  make_corpus(tmp_path / "c", n=10)
  msg = _err(tmp_path, corpus=f"stdlib,{tmp_path}/c/books/*.txt")
  assert "'stdlib'" in msg and "alone" in msg and "matches no files" not in msg, msg


def test_cache_dir_that_is_a_file_names_the_key(tmp_path):
  make_corpus(tmp_path / "c", n=10)
  (tmp_path / "not_a_dir").write_text("x")
  with pytest.raises(DataError, match="data.cache_dir.*not_a_dir.*not a directory"):
    prepare(data_config(f"{tmp_path}/c/books/*.txt", tmp_path / "not_a_dir"))


def test_exclusion_file_with_invalid_utf8_names_the_line(tmp_path):
  """A removal file that is not UTF-8 fails naming its line, instead of entries decoded with replacement
  characters that silently match nothing (a removal request that removes nothing)."""
  make_corpus(tmp_path / "c", n=10)
  ex = tmp_path / "remove.txt"
  ex.write_bytes(b"# requests\n" + f"{tmp_path}/c/books/b001.txt\n".encode() + b"caf\xe9.txt\n")
  msg = _err(tmp_path, corpus=f"{tmp_path}/c/books/*.txt", exclude=str(ex))
  assert "data.exclude" in msg and "remove.txt:3" in msg and "UTF-8" in msg, msg


def test_jsonl_lone_surrogate_names_the_line(tmp_path):
  """JSON may escape a lone surrogate ("\\ud800"), which is no Unicode text: the record fails naming its
  file and line (skip: counted as a bad record), instead of a UnicodeEncodeError without a place."""
  make_corpus(tmp_path / "c", n=20)
  jl = tmp_path / "c" / "forum" / "posts.jsonl"
  lines = jl.read_text().splitlines()
  bad = json.dumps({"text": "a lone surrogate \ud800 in a document long enough to be kept"})
  assert "\\ud800" in bad
  jl.write_text("\n".join(lines[:2] + [bad] + lines[2:]) + "\n")
  msg = _err(tmp_path, corpus=f"{tmp_path}/c/forum/*.jsonl")
  assert "posts.jsonl:3" in msg and "surrogate" in msg, msg
  p = prepare(data_config(f"{tmp_path}/c/forum/*.jsonl", tmp_path / "cache", on_bad_record="skip"))
  assert len(p.manifest["bad_records"]) == 1 and "posts.jsonl:3" in p.manifest["bad_records"][0]
  assert p.manifest["summary"]["documents_kept"] == len(lines)


def test_export_never_replaces_the_tokenizer_of_a_trained_run(prepared, tmp_path):
  """prepare --workdir into a run directory trained on another tokenizer refuses and changes nothing; the
  same tokenizer (a resume's data) is copied again."""
  from llm_jax.data.prepare import export_to

  run = tmp_path / "run"
  run.mkdir()
  (run / "tokenizer.model").write_bytes(b"the run's own tokenizer")
  (run / "manifest.json").write_text('{"the run": "manifest"}')
  (run / "run.json").write_text(json.dumps({"tokenizer_sha256": "ab" * 32, "manifest_sha256": "cd" * 32}))
  before = {f.name: f.read_bytes() for f in run.iterdir()}
  with pytest.raises(DataError) as e:
    export_to(prepared, str(run))
  assert "run.json" in str(e.value) and "tokenizer" in str(e.value) and "abababab" in str(e.value)
  assert {f.name: f.read_bytes() for f in run.iterdir()} == before
  (run / "run.json").write_text(
    json.dumps({"tokenizer_sha256": prepared.tokenizer_sha256, "manifest_sha256": prepared.manifest_sha256})
  )
  export_to(prepared, str(run))
  assert (run / "tokenizer.model").read_bytes() == open(prepared.tokenizer_path, "rb").read()
  fresh = tmp_path / "fresh"
  export_to(prepared, str(fresh))  # no run there: the files are copies of the cache's
  assert (fresh / "manifest.json").exists() and not (fresh / "run.json").exists()
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(DataError, match="a_file.*not a directory"):
    export_to(prepared, str(tmp_path / "a_file"))


@pytest.mark.parametrize(
  "files,held",
  [
    ({"model.json": "{}"}, "model package"),
    ({"config.json": "{}", "model.safetensors": "w"}, "Hugging Face"),
  ],
)
def test_a_package_or_hf_checkpoint_is_not_a_run_directory(prepared, tmp_path, devices, files, held):
  """prepare --workdir and training refuse a model package or a Hugging Face checkpoint, naming it,
  and change nothing (the package's tokenizer.model was replaced, so it no longer loaded)."""
  from llm_jax import config as config_lib
  from llm_jax.data.prepare import export_to
  from llm_jax.train import run_dir

  pkg = tmp_path / "pkg"
  pkg.mkdir()
  for name, text in {**files, "tokenizer.model": "the package's own"}.items():
    (pkg / name).write_text(text)
  before = {f.name: f.read_bytes() for f in pkg.iterdir()}
  with pytest.raises(DataError, match=f"is a {held}.*not a run directory"):
    export_to(prepared, str(pkg))
  with pytest.raises(run_dir.RunDirError, match=f"is a {held}.*not a run directory"):
    run_dir.check_resume(str(pkg), config_lib.load("configs/tiny.py"), None, "sha")
  assert {f.name: f.read_bytes() for f in pkg.iterdir()} == before


@pytest.mark.parametrize(
  "key, value",
  [
    ("shard_tokens", 0),
    ("shard_tokens", -1),
    ("max_doc_chars", -1),
    ("min_doc_chars", -1),
    ("minhash_num_perm", 0),
    ("stdlib_max_bytes", -1),
    ("num_workers", -2),
    ("max_nontext_fraction", 1.5),
    ("max_nontext_fraction", -0.5),
    ("tokenizer.character_coverage", 0.5),
    ("tokenizer.character_coverage", 1.5),
    ("tokenizer.max_sentence_length", 0),
    ("tokenizer.input_sentence_size", -1),
  ],
)
def test_bad_numeric_data_settings_name_the_key_before_any_work(tmp_path, key, value):
  """A data.* number that cannot work fails at once naming its key, before the corpus is read (the corpus
  here does not exist: reading it would fail naming the glob instead)."""
  msg = _err(tmp_path, corpus=f"{tmp_path}/absent/*.txt", **{key: value})
  assert f"data.{key}={value}" in msg, msg
  assert not os.path.exists(tmp_path / "cache")


def test_cli_writes_workdir_and_summary(corpus, tmp_path):
  root, _ = corpus
  cmd = [
    sys.executable,
    "-m",
    "llm_jax.data.prepare",
    "--config=configs/tiny.py",
    f"--workdir={tmp_path}/run",
    f"--config.data.corpus={root}/books/*.txt",
    f"--config.data.cache_dir={tmp_path}/cache",
    "--config.data.tokenizer.vocab_size=400",
    "--config.data.val_fraction=0.2",
    "--config.data.num_workers=1",
  ]
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "kept" in out.stdout and "bytes/token" in out.stdout and "exact_duplicate" in out.stdout
  for name in ("manifest.json", "DATA_CARD.md", "tokenizer.model"):
    assert os.path.exists(tmp_path / "run" / name)
  bad = subprocess.run(
    cmd[:4] + [f"--config.data.corpus={tmp_path}/none/*.txt"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert bad.returncode == 1 and "none/*.txt" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_no_validation_split_when_val_fraction_is_zero(tmp_path):
  make_corpus(tmp_path / "c", seed=2, n=20)
  p = prepare(data_config(f"{tmp_path}/c/books/*.txt", tmp_path / "cache", val_fraction=0.0))
  assert {s["split"] for s in p.manifest["shards"]} == {"train"}
  assert p.manifest["summary"]["documents_by_split"]["val"] == 0
  with pytest.raises(DataError, match="split 'val' has no shards"):
    open_split(p.dir, "val", p.manifest)


def test_worker_processes_give_the_same_result(tmp_path, monkeypatch):
  from llm_jax.data.prepare import clean

  make_corpus(tmp_path / "c", seed=3, n=30)
  spec = f"{tmp_path}/c/books/*.txt,{tmp_path}/c/forum/*.jsonl"
  serial = prepare(
    data_config(spec, tmp_path / "cache1", **{"tokenizer.type": "unigram", "tokenizer.vocab_size": 300})
  )
  monkeypatch.setattr(clean, "PARALLEL_MIN_CHARS", 0)
  pooled = prepare(
    data_config(
      spec, tmp_path / "cache2", num_workers=2, **{"tokenizer.type": "unigram", "tokenizer.vocab_size": 300}
    )
  )
  assert pooled.tokenizer_sha256 == serial.tokenizer_sha256
  assert [s["sha256"] for s in pooled.manifest["shards"]] == [s["sha256"] for s in serial.manifest["shards"]]
  assert pooled.manifest["filters"] == serial.manifest["filters"]

"""Raw text -> cleaned, scrubbed, deduplicated documents -> tokenizer -> token shards + manifest, cached by a
hash of (inputs, config.data).

    python -m llm_jax.data.prepare --config=configs/tiny.py --workdir=/tmp/d [--config.data.corpus='a/*.txt']

Modules: key (cache location and key), pipeline (the stages in order), clean (stage "clean", per document),
select (stage "dedup": filters, removals, split, dedup, paragraphs), write (tokenizer, shards), summary
(manifest and CLI summary), staging (the locked build folder; removing interrupted ones), __main__ (the
command).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys

from llm_jax.data import hf_tokenizer, removals
from llm_jax.data import manifest as manifest_lib
from llm_jax.data import shards as shards_lib
from llm_jax.data.errors import DataError
from llm_jax.data.prepare import pipeline, staging
from llm_jax.data.prepare.key import VERSION, cache_key, cache_root, data_config
from llm_jax.data.prepare.summary import summary_text

__all__ = [
  "VERSION",
  "Prepared",
  "cache_key",
  "cache_root",
  "data_config",
  "export_to",
  "prepare",
  "summary_text",
]


@dataclasses.dataclass
class Prepared:
  """A prepared data directory."""

  dir: str
  manifest: dict
  manifest_path: str
  manifest_sha256: str
  tokenizer_path: str
  tokenizer_sha256: str
  domains: list

  @classmethod
  def open(cls, prepared_dir: str) -> Prepared:
    """Opens an already prepared directory."""
    m = manifest_lib.load(prepared_dir)
    path = os.path.join(prepared_dir, manifest_lib.MANIFEST)
    return cls(
      dir=prepared_dir,
      manifest=m,
      manifest_path=path,
      manifest_sha256=shards_lib.file_sha256(path),
      tokenizer_path=os.path.join(prepared_dir, m["tokenizer"]["path"]),
      tokenizer_sha256=m["tokenizer"]["sha256"],
      domains=list(m["domains"]),
    )

  def tokenizer(self):
    """The prepared tokenizer (llm_jax's Tokenizer or one of llm_jax.data.hf_tokenizer's)."""
    return hf_tokenizer.load_tokenizer(self.tokenizer_path)

  def tokenizer_files(self) -> list[str]:
    """Paths of the tokenizer's files: tokenizer.model, or Hugging Face files (+ tokenizer_config.json)."""
    names = self.manifest["tokenizer"].get("files") or [self.manifest["tokenizer"]["path"]]
    return [os.path.join(self.dir, n) for n in names]


def _check(config) -> None:
  d = config.data
  for key, value, allowed in (
    ("data.on_bad_record", d.on_bad_record, ("fail", "skip")),
    ("data.tokenizer.type", d.tokenizer.type, ("bpe", "unigram", "char")),
  ):
    if value not in allowed:
      raise DataError(f"{key}={value!r} is not one of {', '.join(allowed)}")
  for key, value, closed in (
    ("val_fraction", d.val_fraction, False),
    ("near_dup_threshold", d.near_dup_threshold, True),
    ("removal_near_threshold", d.removal_near_threshold, True),
    ("max_control_fraction", d.max_control_fraction, True),
    ("max_nontext_fraction", d.max_nontext_fraction, True),
  ):
    if not (0 <= value <= 1 if closed else 0 <= value < 1):
      raise DataError(f"data.{key}={value} must be in [0, 1{']' if closed else ')'}")
  for key, value, least, meaning in (
    ("shard_tokens", d.shard_tokens, 1, ""),
    ("minhash_num_perm", d.minhash_num_perm, 1, ""),
    ("max_doc_chars", d.max_doc_chars, 0, " (0: documents are never cut)"),
    ("min_doc_chars", d.min_doc_chars, 0, ""),
    ("stdlib_max_bytes", d.stdlib_max_bytes, 0, ""),
    ("num_workers", d.num_workers, 0, " (0: one per core)"),
    ("tokenizer.max_sentence_length", d.tokenizer.max_sentence_length, 10, " (SentencePiece's least)"),
    ("tokenizer.input_sentence_size", d.tokenizer.input_sentence_size, 0, " (0: every sentence)"),
  ):
    if not value >= least:
      raise DataError(f"data.{key}={value} must be >= {least}{meaning}")
  if not 0.98 <= d.tokenizer.character_coverage <= 1:
    raise DataError(
      f"data.tokenizer.character_coverage={d.tokenizer.character_coverage} must be in [0.98, 1] "
      "(SentencePiece's range; the characters left out use byte fallback)"
    )
  if not d.corpus.strip():
    raise DataError("data.corpus is empty: give comma-separated globs or 'stdlib'")


def _after(config, prepared: Prepared) -> Prepared:
  """Strict removals on a cache hit; deleting other cached copies of removed documents."""
  ex = prepared.manifest.get("exclusions", {})
  if config.data.strict_removals and ex.get("unmatched"):
    raise DataError(
      f"data.exclude={config.data.exclude!r}: {len(ex['unmatched'])} entries match no document "
      f"(e.g. {ex['unmatched'][0]!r}) (data.strict_removals=True)"
    )
  if ex.get("entries"):
    entries = frozenset(ex.get("matched", []) + ex.get("unmatched", []))  # unmatched: maybe in older copies
    removals.purge_caches(cache_root(config), prepared.dir, entries, removals.removed_hashes(ex))
  return prepared


def prepare(
  config, progress: bool | None = None, tokenizer_path: str | None = None, tokenizer=None
) -> Prepared:
  """Prepares config.data (or finds it in the cache) and returns the prepared directory.

  With `tokenizer` (a loaded tokenizer: llm_jax's SentencePiece model, a tokenizer.json or a foreign
  SentencePiece model, see llm_jax.data.hf_tokenizer) or `tokenizer_path` (a file load_tokenizer opens),
  that tokenizer is used as it is instead of training a new one (fine-tuning on a source model's
  tokenizer); documents are separated by its EOS id and the cache key includes its identity.
  """
  _check(config)
  if tokenizer is None and tokenizer_path:
    tokenizer = hf_tokenizer.load_tokenizer(tokenizer_path)
  key = cache_key(config, tokenizer)
  root = cache_root(config)
  if os.path.exists(root) and not os.path.isdir(root):
    raise DataError(
      f"data.cache_dir (else $LLM_JAX_CACHE/prepared): the prepared-data cache {root!r} is not a directory"
    )
  final = os.path.join(root, key)
  staging.remove_stale(root)  # folders of interrupted builds (never taken for prepared data)
  if os.path.exists(os.path.join(final, manifest_lib.MANIFEST)):
    problems = manifest_lib.damage(final)
    if not problems:
      logging.info("prepared data found in cache: %s", final)
      return _after(config, Prepared.open(final))
    logging.warning("rebuilding the damaged prepared data %s: %s", final, "; ".join(problems[:3]))
    staging.discard(final, root, key)
  os.makedirs(root, exist_ok=True)
  with staging.build_folder(root, key) as tmp:
    pipeline.build(
      config,
      key,
      tmp,
      progress=sys.stderr.isatty() if progress is None else progress,
      tokenizer=tokenizer,
    )
    try:
      os.rename(tmp, final)
    except OSError:
      if os.path.exists(os.path.join(final, manifest_lib.MANIFEST)):
        logging.info("another process prepared %s first; using it", final)
      elif os.path.isdir(final):  # a complete build is renamed into place with its manifest: damaged
        logging.warning(
          "replacing %s: it has no %s (damaged or copied in part)", final, manifest_lib.MANIFEST
        )
        staging.discard(final, root, key)
        os.rename(tmp, final)
      else:
        raise
  return _after(config, Prepared.open(final))


RUN_RECORD = "run.json"  # a trained run's record (llm_jax.train.run_dir.RUN_FILE)
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def not_a_run(workdir: str) -> str | None:
  """What `workdir` holds when it is a model package or a Hugging Face checkpoint (whose tokenizer a
  run's files would replace), else None."""
  if not os.path.isdir(workdir) or os.path.exists(os.path.join(workdir, RUN_RECORD)):
    return None
  if os.path.exists(os.path.join(workdir, "model.json")):
    return "model package (model.json)"
  hf = [n for n in _HF_WEIGHTS if os.path.exists(os.path.join(workdir, n))]
  if hf and os.path.exists(os.path.join(workdir, "config.json")):
    return f"Hugging Face checkpoint (config.json, {hf[0]})"
  return None


def _check_workdir(p: Prepared, workdir: str) -> None:
  """Refuses a workdir whose trained run depends on another tokenizer (its checkpoints would no longer
  match the tokenizer.model beside them)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise DataError(f"--workdir {workdir} is not a directory")
  held = not_a_run(workdir)
  if held:
    raise DataError(f"--workdir {workdir} is a {held}, not a run directory: give another --workdir (or none)")
  path = os.path.join(workdir, RUN_RECORD)
  if not os.path.exists(path):
    return
  try:
    with open(path, encoding="utf-8") as f:
      recorded = json.load(f).get("tokenizer_sha256")
  except (OSError, ValueError, AttributeError) as e:
    raise DataError(f"cannot read {path} ({e}): not replacing the tokenizer of the run in {workdir}") from e
  if recorded and recorded != p.tokenizer_sha256:
    raise DataError(
      f"{workdir} holds a run trained with tokenizer sha256 {recorded[:12]}... ({path}), but this data's "
      f"tokenizer is {p.tokenizer_sha256[:12]}...: not replacing that run's tokenizer and manifest; "
      "give another --workdir (or none)"
    )


def export_to(p: Prepared, workdir: str) -> None:
  """Copies manifest.json, DATA_CARD.md and the tokenizer's files into a run directory; refuses one whose
  run (run.json) was trained with another tokenizer."""
  _check_workdir(p, workdir)
  os.makedirs(workdir, exist_ok=True)
  names = (manifest_lib.MANIFEST, manifest_lib.DATA_CARD)
  for src in [os.path.join(p.dir, n) for n in names] + p.tokenizer_files():
    name = os.path.basename(src)
    tmp = os.path.join(workdir, name + ".partial")
    shutil.copyfile(src, tmp)
    os.replace(tmp, os.path.join(workdir, name))

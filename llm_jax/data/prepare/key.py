"""Where prepared data is cached and the key that names it: a hash of (pipeline version, inputs, removal
file, the config.data fields that shape the output)."""

from __future__ import annotations

import hashlib
import json
import os

from llm_jax.data import hf_tokenizer, removals, sources

VERSION = 4  # bump when the pipeline's output changes for the same inputs and config
# config.data fields that do not change the prepared data (loader-side knobs, resources, strictness).
NOT_IN_KEY = (
  "cache_dir",
  "num_workers",
  "segment_windows",
  "mixture",
  "seed",
  "window_offsets",
  "strict_removals",
)


def cache_root(config) -> str:
  """The prepared-data cache: data.cache_dir, else $LLM_JAX_CACHE/prepared, else ~/.cache/llm_jax/prepared."""
  if config.data.cache_dir:
    return os.path.abspath(os.path.expanduser(config.data.cache_dir))
  if os.environ.get("LLM_JAX_CACHE"):
    return os.path.join(os.path.abspath(os.environ["LLM_JAX_CACHE"]), "prepared")
  return os.path.join(os.path.expanduser("~"), ".cache", "llm_jax", "prepared")


def data_config(config) -> dict:
  """config.data as a plain dict (what the manifest records)."""
  return json.loads(config.data.to_json_best_effort())


def cache_key(config, tokenizer=None) -> str:
  """Hash of (pipeline version, input files, exclude file, the config.data fields that shape the output,
  a given tokenizer's identity).

  `tokenizer` (a loaded tokenizer or a path load_tokenizer opens) is one used as it is instead of a
  trained one. llm_jax's own SentencePiece model counts by its sha256 (the keys of existing caches);
  any other by `hf_tokenizer.identity` (file hash, kind and special ids), so it never reuses our shards.
  """
  d = config.data
  cfg = {k: v for k, v in data_config(config).items() if k not in NOT_IN_KEY}
  if not cfg.get("tokenizer", {}).get("encoder_pieces", True):  # off: the key of configs without it
    cfg["tokenizer"].pop("encoder_pieces")
  parts = {
    "version": VERSION,
    "config": cfg,
    "corpus": sources.fingerprint(d.corpus, d.stdlib_max_bytes),
    "val_corpus": sources.fingerprint(d.val_corpus, d.stdlib_max_bytes) if d.val_corpus else None,
    "exclude": removals.read(d.exclude).sha256 if d.exclude else None,
  }
  key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]
  if tokenizer:
    if isinstance(tokenizer, str):
      tokenizer = hf_tokenizer.load_tokenizer(tokenizer)
    key = hashlib.sha256((key + hf_tokenizer.identity(tokenizer)).encode()).hexdigest()[:20]
  return key

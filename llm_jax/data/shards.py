"""Token shards: [EOS] doc0 [EOS] doc1 [EOS] ... as .npy arrays (memory-mapped on read) plus an index of
document offsets, domain ids and UTF-8 byte counts. EOS is the tokenizer's own (manifest.json's
tokenizer.eos_id: 2 for llm_jax's SentencePiece model); ids are uint16 while the vocabulary fits, else
uint32."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
from collections.abc import Sequence

import numpy as np

from llm_jax.data.errors import DataError
from llm_jax.data.tokenizer import EOS_ID, PAD_ID


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id fits, else uint32."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def file_sha256(path: str) -> str:
  """sha256 hex of a file's bytes."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def block_sha256s(path: str, block_bytes: int, threads: int = 0) -> list[str]:
  """sha256 hex of each `block_bytes` block of a file (the last one shorter), hashed on `threads`
  threads at once (0: up to 8, one per core): hashlib releases the GIL, so a file checks in about
  1/threads of file_sha256's time (docs/serving.md: 500 MB at ~300 MB/s on an H200 host's core)."""
  size = os.path.getsize(path)
  starts = range(0, max(size, 1), block_bytes)

  def one(start: int) -> str:  # read in 4 MiB pieces: a few MiB in memory per thread, not a block
    h, end = hashlib.sha256(), min(start + block_bytes, size)
    with open(path, "rb") as f:
      f.seek(start)
      while start < end and (piece := f.read(min(end - start, 1 << 22))):
        h.update(piece)
        start += len(piece)
    return h.hexdigest()

  threads = threads or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="llm-sha256") as pool:
    return list(pool.map(one, starts))


def _save(path: str, save_fn) -> None:
  tmp = path + ".partial"
  with open(tmp, "wb") as f:
    save_fn(f)
  os.replace(tmp, path)


class ShardWriter:
  """Packs tokenized documents of one split into shards of about `shard_tokens` tokens."""

  def __init__(self, out_dir: str, split: str, vocab_size: int, shard_tokens: int, eos_id: int = EOS_ID):
    self.out_dir, self.split = out_dir, split
    self.eos_id = int(eos_id)
    if not 0 <= self.eos_id < vocab_size:
      raise DataError(f"eos_id={eos_id} is not an id of a vocabulary of {vocab_size}")
    self.dtype = token_dtype(vocab_size)
    self.shard_tokens = max(1, int(shard_tokens))
    self.records: list[dict] = []
    self._reset()

  def _reset(self):
    self._ids: list[np.ndarray] = [np.array([self.eos_id], self.dtype)]
    self._lengths: list[int] = []
    self._domains: list[int] = []
    self._bytes: list[int] = []
    self._count = 1

  def add(self, ids: Sequence[int], domain_id: int, num_bytes: int) -> None:
    """Appends one document (its EOS is added here)."""
    arr = np.empty(len(ids) + 1, self.dtype)
    arr[:-1] = ids
    arr[-1] = self.eos_id
    self._ids.append(arr)
    self._lengths.append(len(arr))
    self._domains.append(domain_id)
    self._bytes.append(num_bytes)
    self._count += len(arr)
    if self._count >= self.shard_tokens:
      self.flush()

  def flush(self) -> None:
    """Writes the buffered documents as one shard."""
    if not self._lengths:
      return
    name = f"{self.split}-{len(self.records):05d}"
    tokens = np.concatenate(self._ids)
    offsets = np.concatenate([[1], 1 + np.cumsum(self._lengths)]).astype(np.int64)
    tok_path = os.path.join(self.out_dir, name + ".tokens.npy")
    idx_path = os.path.join(self.out_dir, name + ".index.npz")
    _save(tok_path, lambda f: np.save(f, tokens, allow_pickle=False))
    _save(
      idx_path,
      lambda f: np.savez(
        f,
        offsets=offsets,
        domains=np.asarray(self._domains, np.int32),
        bytes=np.asarray(self._bytes, np.int64),
      ),
    )
    self.records.append(
      {
        "split": self.split,
        "path": name + ".tokens.npy",
        "sha256": file_sha256(tok_path),
        "index_path": name + ".index.npz",
        "index_sha256": file_sha256(idx_path),
        "documents": len(self._lengths),
        "bytes": int(sum(self._bytes)),
        "tokens": int(len(tokens)),
        "dtype": self.dtype.name,
      }
    )
    self._reset()


def separator_ids(manifest: dict) -> tuple[int, int]:
  """(eos_id, pad_id) of prepared data: the document separator and the id of padding (weight 0); the
  fixed 2 and 0 for manifests without them. A tokenizer without pad uses eos (hf_tokenizer's choice)."""
  t = manifest.get("tokenizer") or {}
  eos = int(t.get("eos_id", EOS_ID))
  pad = int(t.get("pad_id", PAD_ID))
  return eos, (eos if pad < 0 else pad)


@dataclasses.dataclass
class Shard:
  """One shard opened for reading: tokens memory-mapped, index in memory."""

  path: str
  tokens: np.ndarray  # [T] memmap, uint16/uint32
  offsets: np.ndarray  # [D+1] int64: document d is tokens[offsets[d]:offsets[d+1]] incl. its EOS
  domains: np.ndarray  # [D] int32
  bytes: np.ndarray  # [D] int64 UTF-8 bytes of each document's text


def open_split(prepared_dir: str, split: str, manifest: dict) -> list[Shard]:
  """The shards of a split, tokens memory-mapped."""
  records = [r for r in manifest["shards"] if r["split"] == split]
  if not records:
    splits = sorted({r["split"] for r in manifest["shards"]})
    raise DataError(f"{prepared_dir}: split {split!r} has no shards (splits present: {splits})")
  out = []
  for r in records:
    path = os.path.join(prepared_dir, r["path"])
    try:
      tokens = np.load(path, mmap_mode="r")
      with np.load(os.path.join(prepared_dir, r["index_path"])) as idx:
        offsets, domains, nbytes = idx["offsets"], idx["domains"], idx["bytes"]
    except (OSError, ValueError, KeyError) as e:
      raise DataError(f"cannot open shard {path!r}: {e}; prepare the data again") from e
    if len(tokens) != r["tokens"]:
      raise DataError(f"shard {path!r} has {len(tokens)} tokens, the manifest says {r['tokens']}")
    # A plain ndarray view of the memmap: still memory-mapped, without np.memmap's per-index overhead.
    out.append(Shard(path, tokens.view(np.ndarray), offsets, domains, nbytes))
  return out

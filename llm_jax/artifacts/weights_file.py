"""A package's weights file (weights.safetensors): its hashes for model.json, and its tensors read and
checked against model.json (the tensor list, and the file's hashes while the tensors are read).

model.json's `weights_block_sha256` hashes the file in WEIGHT_BLOCK_BYTES blocks, checked on up to 8
threads at once (one thread's sha256 of gpt_small's 500 MB was 2.4 s of a warm server start-up on an
H200 host: docs/serving.md); `weights_sha256` (the whole file) stays for provenance and tools such as
sha256sum, and is what packages written before the blocks are checked against.
"""

from __future__ import annotations

import concurrent.futures
import os

from safetensors import safe_open

from llm_jax.artifacts.errors import PackageError
from llm_jax.data.shards import block_sha256s, file_sha256

WEIGHT_BLOCK_BYTES = 64 << 20


def hashes(wpath: str) -> dict:
  """model.json's hash fields of a weights file: the whole file's and its blocks'."""
  return {
    "weights_sha256": file_sha256(wpath),
    "weights_block_sha256": {
      "block_bytes": WEIGHT_BLOCK_BYTES,
      "sha256": block_sha256s(wpath, WEIGHT_BLOCK_BYTES),
    },
  }


def read_checked(wpath: str, meta: dict, verify: bool = True) -> dict:
  """{name: numpy array} of the weights file, its tensors checked against model.json's list and (with
  `verify`) the file against model.json's hashes, before any tensor is returned."""
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llm-verify") as pool:
    # the file's hashes while its tensors are read (hashlib releases the GIL): checked before any
    # tensor leaves this function
    damage = pool.submit(_damage, wpath, meta) if verify else None
    try:
      flat = _tensors(wpath, meta)
    finally:  # a damaged file is reported as damaged, whatever reading it raised
      where = damage.result() if damage is not None else None
      if where is not None:
        raise PackageError(
          f"{wpath} does not match model.json's {where}: the file is damaged or was replaced"
        )
  return flat


def _tensors(wpath: str, meta: dict) -> dict:
  """{name: numpy array} of a package's weights file, each checked against model.json's list."""
  flat = {}
  with safe_open(wpath, framework="np") as f:
    have = set(f.keys())
    want = set(meta["tensors"])
    if have != want:
      raise PackageError(
        f"{wpath}: tensors differ from model.json; missing {sorted(want - have)[:5]}, "
        f"unexpected {sorted(have - want)[:5]}"
      )
    for key in sorted(have):
      arr = f.get_tensor(key)
      spec = meta["tensors"][key]
      if list(arr.shape) != spec["shape"] or str(arr.dtype) != spec["dtype"]:
        raise PackageError(
          f"{wpath}: tensor {key!r} is {arr.dtype}{list(arr.shape)}, model.json says "
          f"{spec['dtype']}{spec['shape']}"
        )
      flat[key] = arr
  return flat


def _damage(wpath: str, meta: dict) -> str | None:
  """Where the weights file differs from model.json's hashes (None: it matches, or there are none):
  by blocks, hashed on several threads, where the package has them; else the whole file."""
  blocks = meta.get("weights_block_sha256")
  if blocks:
    if not (
      isinstance(blocks, dict)
      and isinstance(blocks.get("block_bytes"), int)
      and blocks["block_bytes"] > 0
      and isinstance(blocks.get("sha256"), list)
    ):
      return "weights_block_sha256 (not {block_bytes: a positive integer, sha256: a list})"
    size, want = os.path.getsize(wpath), meta.get("weights_bytes")
    if want is not None and size != want:
      return f"weights_bytes ({size} bytes, not {want})"
    step, want_blocks = blocks["block_bytes"], blocks["sha256"]
    have_blocks = block_sha256s(wpath, step)
    for i, (have, expect) in enumerate(zip(have_blocks, want_blocks, strict=False)):
      if have != expect:
        return f"weights_block_sha256 (the block at byte {i * step})"
    if len(have_blocks) != len(want_blocks):
      return f"weights_block_sha256 ({len(want_blocks)} blocks, the file has {len(have_blocks)})"
    return None  # the blocks cover the whole file: no second, single-threaded pass over it
  if meta.get("weights_sha256") and file_sha256(wpath) != meta["weights_sha256"]:
    return "weights_sha256"
  return None

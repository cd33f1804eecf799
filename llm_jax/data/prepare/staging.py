"""The build folder a prepare writes into before renaming it to its cache key, and removing the ones
interrupted builds left behind.

A build holds an exclusive `flock` on `.tmp-KEY-ID.lock` (made before the folder `.tmp-KEY-ID`) until the
folder is renamed or deleted. A folder whose lock nobody holds belongs to a build that was killed: it is
deleted, so that stale partial output never piles up in the cache, and no copy of text a removal request
deleted survives in one. A folder without a lock file (an older llm_jax) is deleted once it is
STALE_SECONDS old. On a file system without locks (flock fails) nothing with a lock file is deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
import uuid

PREFIX = ".tmp-"
STALE_SECONDS = 3600.0


def _unheld(lock_path: str) -> bool:
  """Takes and drops the lock: True when no build holds it (the file may be gone: then False)."""
  try:
    fd = os.open(lock_path, os.O_RDWR)
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except OSError:
    return False
  finally:
    os.close(fd)


def remove_stale(root: str) -> list[str]:
  """Deletes the build folders (and lock files) of builds that no longer run; returns what went."""
  removed = []
  try:
    names = os.listdir(root)
  except OSError:
    return removed
  for name in sorted(names):
    if not name.startswith(PREFIX):
      continue
    path = os.path.join(root, name)
    if name.endswith(".lock"):
      if not os.path.exists(path[: -len(".lock")]) and _unheld(path):
        with contextlib.suppress(OSError):
          os.remove(path)
      continue
    if not os.path.isdir(path):
      continue
    lock = path + ".lock"
    if os.path.exists(lock):
      stale = _unheld(lock)
    else:
      try:
        stale = time.time() - os.path.getmtime(path) > STALE_SECONDS
      except OSError:
        stale = False
    if stale:
      shutil.rmtree(path, ignore_errors=True)
      with contextlib.suppress(OSError):
        os.remove(lock)
      logging.warning("removed %s, the folder of an interrupted data preparation", path)
      removed.append(path)
  return removed


def discard(path: str, root: str, key: str) -> None:
  """Moves a folder out of the way under a build-folder name (so a crash midway leaves it to
  remove_stale) and deletes it."""
  aside = os.path.join(root, f"{PREFIX}{key}-discarded-{uuid.uuid4().hex[:8]}")
  os.rename(path, aside)
  shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def build_folder(root: str, key: str):
  """Yields a new, empty build folder under root, locked for as long as the block runs; it is deleted
  afterwards unless the block renamed it."""
  while True:
    base = os.path.join(root, f"{PREFIX}{key}-{uuid.uuid4().hex[:8]}")
    fd = os.open(base + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # a file system without locks: no cleaner can lock it either, so the folder stays
      break
    try:  # a cleaner may have taken the fresh lock file for an orphan before flock: then take another
      if os.stat(base + ".lock").st_ino == os.fstat(fd).st_ino:
        break
    except FileNotFoundError:
      pass
    os.close(fd)
  try:
    os.makedirs(base)
    try:
      yield base
    finally:
      shutil.rmtree(base, ignore_errors=True)
  finally:
    with contextlib.suppress(OSError):
      os.remove(base + ".lock")
    os.close(fd)

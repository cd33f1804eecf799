"""Where an export may write: `out` is replaced only when it is empty or an earlier export of the
same kind (`--overwrite`), never a run directory, the model being exported, or a folder of anything
else, whose files `--overwrite` would delete."""

from __future__ import annotations

import os
import shutil

# what a run directory holds (llm_jax.train): never replaced by an export
_RUN_MARKERS = ("run.json", "checkpoints", "metrics.jsonl")


def check_out(out: str, *, overwrite: bool, markers: tuple[str, ...], what: str, error=ValueError) -> None:
  """Raises `error` naming `out` unless an export of `what` (a directory holding all of `markers`)
  may be written there: it does not exist, is empty, or (with `overwrite`) is such an export."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise error(f"{out} is a file; --out names the directory to write the {what} into")
  if not os.path.isdir(out) or not os.listdir(out):
    return
  if not overwrite:
    raise error(f"{out} exists and is not empty; choose another --out or pass --overwrite")
  run = [m for m in _RUN_MARKERS if os.path.exists(os.path.join(out, m))]
  if run:
    raise error(f"{out} is a run directory (it holds {run[0]}); --overwrite never replaces one")
  missing = [m for m in markers if not os.path.exists(os.path.join(out, m))]
  if missing:
    raise error(
      f"{out} is not a {what} (no {missing[0]}): --overwrite replaces only an earlier {what}, "
      "so its files stay; choose another --out"
    )


def check_not_source(out: str, source: str, error=ValueError) -> None:
  """Raises `error` when `out` is the exported model's directory or one that holds it."""
  src, dst = os.path.realpath(source), os.path.realpath(out)
  if src == dst or src.startswith(dst.rstrip(os.sep) + os.sep):
    raise error(f"--out {out} is the model being exported or holds it ({source}); choose another --out")


def move_into_place(tmp: str, out: str) -> None:
  """Renames the finished directory `tmp` to `out`; an existing `out` (checked by `check_out`) is moved
  aside first and deleted after, so that there is never a moment without either."""
  if not os.path.exists(out):
    os.replace(tmp, out)
    return
  old = out.rstrip("/") + f".old-{os.getpid()}"
  os.replace(out, old)
  os.replace(tmp, out)
  shutil.rmtree(old, ignore_errors=True)

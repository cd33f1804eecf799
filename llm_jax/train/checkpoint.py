"""Checkpoints: an Orbax CheckpointManager at WORKDIR/checkpoints holding the train state and the
data-iterator state together. Training resumes through `Checkpoints.restore`; everything that opens a
trained model reads parameters through `Checkpoints.read_params` (called by llm_jax.artifacts).

Each step directory holds two items: `state` (the sharded TrainState, written by every process through
Orbax's multi-host path) and `data` (the loader's JSON state). Saves are asynchronous and atomic: a step
appears under checkpoints/ only once complete, so a crash mid-save leaves the previous steps intact.
Restoring takes target shardings, so a checkpoint written on one mesh restores onto any other.

A checkpoint that fails to restore is never used, and with `fallback` it is moved aside to
checkpoints/corrupt/STEP, so it no longer counts as the latest or for retention and the step can be
saved again. With `keep_best`, saves carry the validation loss (Orbax step metrics) and the checkpoint
with the lowest one is kept beyond keep-last-K retention; `best_step()` names it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocm

from llm_jax.model.params import shape_differences

log = logging.getLogger(__name__)

CORRUPT_DIR = "corrupt"  # checkpoints/corrupt/STEP: checkpoints that failed to restore
BEST_METRIC = "val_loss"


class CheckpointError(RuntimeError):
  """A checkpoint is missing, broken or does not fit the model; the message names the step."""


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints as an absolute path (Orbax wants one)."""
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _first_line(e: BaseException) -> str:
  """The error's type and status (DATA_LOSS, NOT_FOUND, ...) or its first words: no storage dump."""
  text = str(e).strip()
  status = re.match(r"([A-Z_]{4,}):", text)
  if status:
    return f"{type(e).__name__}: {status.group(1)}"
  line = text.splitlines()[0] if text else ""
  return f"{type(e).__name__}: {line[:80]}" + ("..." if len(line) > 80 else "")


def _metric(metrics) -> float:
  value = (metrics or {}).get(BEST_METRIC)
  return math.inf if value is None else float(value)


def _handlers():
  return {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}


def _ignore_reads_left_behind() -> None:
  """When one read of a checkpoint fails, the storage library's other reads of it still finish and post
  their results to an event loop the failed restore already closed; Python would print a traceback
  ("Event loop is closed") for each, and asyncio one ("Task exception was never retrieved") for each
  that failed too. Those reads are abandoned on purpose: drop exactly those errors (installed before
  every read, metadata or restore, since the stragglers can arrive before it returns)."""
  previous = sys.excepthook
  if getattr(previous, "_llm_jax_quiet", False):
    return

  def hook(kind, value, tb):
    if kind is RuntimeError and str(value) == "Event loop is closed":
      return
    previous(kind, value, tb)

  hook._llm_jax_quiet = True
  sys.excepthook = hook
  threading.excepthook = _thread_hook(threading.excepthook)
  sys.unraisablehook = _unraisable_hook(sys.unraisablehook)
  logging.getLogger("asyncio").addFilter(_abandoned_read)


def _abandoned_read(record: logging.LogRecord) -> bool:
  """False for asyncio's "Task exception was never retrieved" of a storage-library read (a tensorstore
  error) that failed beside the one the restore reported: another read left behind, whose traceback
  asyncio prints when its task is collected. Every other record passes."""
  value = record.exc_info[1] if record.exc_info else None
  return not (
    record.getMessage().startswith("Task exception was never retrieved") and "tensorstore" in str(value)
  )


def _unraisable_hook(previous):
  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    # a read of the same broken checkpoint, abandoned when the restore failed, collected later (a
    # reader that falls back to an earlier step goes on running: generate, evaluate, export)
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and code.co_name == "_read_array_index_and_device_put":
      return
    previous(unraisable)

  return hook


def _thread_hook(previous):
  def hook(args):
    if args.exc_type is RuntimeError and str(args.exc_value) == "Event loop is closed":
      return
    previous(args)

  return hook


def _empty_steps(directory: str) -> list[int]:
  """Steps whose directory under checkpoints/ is empty: no checkpoint (Orbax only renames a complete
  save into place), but Orbax would count them and refuse to save there."""
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  out = []
  for name in names:
    path = os.path.join(directory, name)
    try:
      if name.isdigit() and os.path.isdir(path) and not os.listdir(path):
        out.append(int(name))
    except OSError:
      continue
  return sorted(out)


class Checkpoints:
  """The run's checkpoints: save every N steps (async), keep the last K plus every M-th, restore."""

  def __init__(
    self,
    workdir: str,
    *,
    keep: int = 3,
    keep_every: int = 0,
    async_save: bool = True,
    read_only: bool = False,
    keep_best: bool = False,
  ):
    self.directory = checkpoint_dir(workdir)
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f"{workdir!r} has no checkpoints/ directory; is it a training run directory?")
    if not read_only:
      for step in _empty_steps(self.directory):
        try:
          os.rmdir(os.path.join(self.directory, str(step)))  # only ever removes an empty directory
          log.warning(
            "removed the empty directory of step %d in %s: it held no checkpoint", step, self.directory
          )
        except OSError:
          pass  # another process removed it, or something appeared in it
    policies = [ocm.LatestN(max(1, int(keep)))]
    if keep_every and keep_every > 0:
      policies.append(ocm.EveryNSteps(int(keep_every)))
    if keep_best:  # lowest val_loss first kept; saves without one rank last
      policies.append(
        ocm.BestN(get_metric_fn=_metric, reverse=True, n=1, keep_checkpoints_without_metrics=False)
      )
    options = ocp.CheckpointManagerOptions(
      best_fn=_metric,
      best_mode="min",  # Orbax writes a save's metrics only when best_fn is set
      save_interval_steps=1,  # the loop decides when to save
      preservation_policy=ocm.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=not read_only,  # half-written saves of a killed run
      create=not read_only,
      read_only=read_only,
    )
    self.manager = ocp.CheckpointManager(self.directory, item_handlers=_handlers(), options=options)

  @classmethod
  def for_training(cls, workdir: str, config) -> Checkpoints:
    """Retention from config.train.keep_checkpoints / keep_every / keep_best (with evaluation)."""
    tr = config.train
    return cls(
      workdir,
      keep=tr.keep_checkpoints,
      keep_every=tr.keep_every,
      keep_best=bool(tr.get("keep_best", True)) and tr.eval_every > 0,
    )

  def steps(self) -> list[int]:
    """Complete checkpoint steps, ascending."""
    self.manager.reload()
    empty = _empty_steps(self.directory)
    return sorted(s for s in self.manager.all_steps() if s not in empty)

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def best(self) -> tuple[int, float] | None:
    """(step, val_loss) of the kept checkpoint with the lowest validation loss, or None."""
    found = None
    for step in self.steps():
      value = _metric(self.manager.metrics(step))
      if math.isfinite(value) and (found is None or value < found[1]):
        found = (step, value)
    return found

  def best_step(self) -> int | None:
    """The step of the best validation loss among the checkpoints (train.keep_best), or None."""
    best = self.best()
    return None if best is None else best[0]

  def save(self, step: int, state, data_state: dict[str, Any], metrics: dict | None = None) -> bool:
    """Starts an async save of (state, data-iterator state) at `step`; False if it already exists.

    `metrics` ({'val_loss': v}) ranks the checkpoint for keep_best.
    """
    if step in self.manager.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state))
    return bool(self.manager.save(int(step), args=args, force=True, metrics=dict(metrics or {})))

  def move_aside(self, step: int) -> str:
    """Moves a broken step to checkpoints/corrupt/STEP (process 0; every process waits); returns it."""
    dst = os.path.join(self.directory, CORRUPT_DIR, str(step))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      n = 1
      while os.path.exists(dst):
        dst, n = os.path.join(self.directory, CORRUPT_DIR, f"{step}.{n}"), n + 1
      os.rename(os.path.join(self.directory, str(step)), dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"llm_jax moved checkpoint {step} aside")
    self.manager.reload()
    return dst

  def wait(self) -> None:
    """Blocks until pending saves are complete on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    # orbax's close() does not wait for the temporary-directory cleanup its constructor starts in a
    # thread (saves do); one still running at interpreter exit fails there with a long traceback
    await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:
      await_cleanup()
    self.manager.close()

  def saved_shapes(self, step: int):
    """The tree of array metadata (shape, dtype) of the state saved at `step`."""
    _ignore_reads_left_behind()  # a broken checkpoint can fail here, before any restore
    try:
      meta = self.manager.item_metadata(step)["state"]
    except Exception as e:  # any read failure is a broken checkpoint
      log.debug("reading the metadata of step %d failed", step, exc_info=True)
      raise CheckpointError(
        f"checkpoint at step {step} in {self.directory} is unreadable ({_first_line(e)})"
      ) from None
    if meta is None:
      raise CheckpointError(f"checkpoint at step {step} in {self.directory} has no readable state")
    return meta

  def check_fits(self, step: int, abstract_state) -> None:
    """Raises naming every parameter whose shape differs between the checkpoint and the model."""
    meta = self.saved_shapes(step)
    saved = {"params": meta["params"]}
    wanted = {"params": abstract_state.params}
    diffs = shape_differences(saved, wanted)
    if diffs:
      raise CheckpointError(
        f"the checkpoint at step {step} in {self.directory} does not fit the configured model "
        f"({len(diffs)} differing keys):\n  "
        + "\n  ".join(diffs)
        + "\nUse the run's original model settings, or a new --workdir."
      )

  def _read(self, step: int, state_target, *, partial: bool = False, with_data: bool = False):
    """The one place that reads a checkpoint: the `state` item into `state_target` (+ the data item)."""
    items = {
      "state": ocp.args.PyTreeRestore(
        item=state_target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(state_target),
        partial_restore=partial,
      )
    }
    if with_data:
      items["data"] = ocp.args.JsonRestore()
    _ignore_reads_left_behind()
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # any read failure is a broken checkpoint
      log.debug("restoring step %d failed", step, exc_info=True)
      raise CheckpointError(
        f"checkpoint at step {step} in {self.directory} cannot be restored ({_first_line(e)})"
      ) from None
    return out["state"], (out["data"] if with_data else None)

  def _restore_one(self, step: int, abstract_state, with_data: bool):
    self.check_fits(step, abstract_state)
    return self._read(step, abstract_state, with_data=with_data)

  def read_params(self, step: int, target):
    """Only the parameters saved at `step`, into `target` (ShapeDtypeStructs with shardings)."""
    return self._read(step, {"params": target}, partial=True)[0]["params"]

  def restore(
    self, abstract_state, *, step: int | None = None, fallback: bool = False, with_data: bool = True
  ):
    """(step, state, data_state) from the latest (or given) complete checkpoint, in the target shardings.

    `abstract_state` is a tree of jax.ShapeDtypeStruct with shardings. A broken checkpoint raises
    CheckpointError naming its step; with `fallback` it is moved to checkpoints/corrupt/STEP and the
    one before is tried instead.
    """
    steps = self.steps()
    if not steps:
      raise CheckpointError(f"no complete checkpoint in {self.directory}")
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"no checkpoint at step {step} in {self.directory}; have {steps}")
      steps = [s for s in steps if s <= step]
    candidates = list(reversed(steps))
    for i, s in enumerate(candidates):
      try:
        state, data = self._restore_one(s, abstract_state, with_data)
        return s, state, data
      except CheckpointError as e:
        if "does not fit" in str(e):
          raise
        before = candidates[i + 1] if i + 1 < len(candidates) else None
        if not fallback or before is None:
          hint = (
            f"; set train.restore_fallback=True to move it aside and resume from step {before}"
            if before is not None and not fallback
            else ""
          )
          raise CheckpointError(f"{e}{hint}") from None
        moved = self.move_aside(s)
        log.warning("%s; moved it to %s, falling back to the checkpoint at step %d", e, moved, before)
    raise AssertionError("unreachable")


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs carrying the given shardings (restore targets)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

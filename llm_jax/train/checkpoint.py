"""Checkpoints: an Orbax CheckpointManager at WORKDIR/checkpoints holding the train state and the
data-iterator state together. Training resumes through `Checkpoints.restore`; everything that opens a
trained model reads parameters through `Checkpoints.read_params` (called by llm_jax.artifacts).

Each step directory holds two items: `state` (the sharded TrainState, written by every process through
Orbax's multi-host path) and `data` (the loader's JSON state). Saves are asynchronous and atomic: a step
appears under checkpoints/ only once complete, so a crash mid-save leaves the previous steps intact.
Restoring takes target shardings, so a checkpoint written on one mesh restores onto any other.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from llm_jax.model.params import shape_differences

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """A checkpoint is missing, broken or does not fit the model; the message names the step."""


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints as an absolute path (Orbax wants one)."""
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _handlers():
  return {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}


class Checkpoints:
  """The run's checkpoints: save every N steps (async), keep the last K plus every M-th, restore."""

  def __init__(self, workdir: str, *, keep: int = 3, keep_every: int = 0, async_save: bool = True,
               read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f"{workdir!r} has no checkpoints/ directory; is it a training run directory?")
    policies = [ocm.LatestN(max(1, int(keep)))]
    if keep_every and keep_every > 0:
      policies.append(ocm.EveryNSteps(int(keep_every)))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1,  # the loop decides when to save
        preservation_policy=ocm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,  # half-written saves of a killed run
        create=not read_only,
        read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, item_handlers=_handlers(), options=options)

  @classmethod
  def for_training(cls, workdir: str, config) -> "Checkpoints":
    """Retention from config.train.keep_checkpoints / keep_every."""
    return cls(workdir, keep=config.train.keep_checkpoints, keep_every=config.train.keep_every)

  def steps(self) -> list[int]:
    """Complete checkpoint steps, ascending."""
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, state, data_state: dict[str, Any]) -> bool:
    """Starts an async save of (state, data-iterator state) at `step`; False if it already exists."""
    if step in self.manager.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state))
    return bool(self.manager.save(int(step), args=args, force=True))

  def wait(self) -> None:
    """Blocks until pending saves are complete on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def saved_shapes(self, step: int):
    """The tree of array metadata (shape, dtype) of the state saved at `step`."""
    try:
      meta = self.manager.item_metadata(step)["state"]
    except Exception as e:  # noqa: BLE001 - any read failure is a broken checkpoint
      raise CheckpointError(f"checkpoint at step {step} in {self.directory} is unreadable: "
                            f"{type(e).__name__}: {e}") from e
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
          f"({len(diffs)} differing keys):\n  " + "\n  ".join(diffs) +
          "\nUse the run's original model settings, or a new --workdir.")

  def _read(self, step: int, state_target, *, partial: bool = False, with_data: bool = False):
    """The one place that reads a checkpoint: the `state` item into `state_target` (+ the data item)."""
    items = {"state": ocp.args.PyTreeRestore(
        item=state_target, restore_args=ocp.checkpoint_utils.construct_restore_args(state_target),
        partial_restore=partial)}
    if with_data:
      items["data"] = ocp.args.JsonRestore()
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # any read failure is a broken checkpoint
      raise CheckpointError(f"checkpoint at step {step} in {self.directory} cannot be restored: "
                            f"{type(e).__name__}: {str(e)[:500]}") from e
    return out["state"], (out["data"] if with_data else None)

  def _restore_one(self, step: int, abstract_state, with_data: bool):
    self.check_fits(step, abstract_state)
    return self._read(step, abstract_state, with_data=with_data)

  def read_params(self, step: int, target):
    """Only the parameters saved at `step`, into `target` (ShapeDtypeStructs with shardings)."""
    return self._read(step, {"params": target}, partial=True)[0]["params"]

  def restore(self, abstract_state, *, step: int | None = None, fallback: bool = False,
              with_data: bool = True):
    """(step, state, data_state) from the latest (or given) complete checkpoint, in the target shardings.

    `abstract_state` is a tree of jax.ShapeDtypeStruct with shardings. A broken checkpoint raises
    CheckpointError naming its step; with `fallback` the one before is tried instead.
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
          hint = (f"; set train.restore_fallback=True to resume from step {before} instead"
                  if before is not None and not fallback else "")
          raise CheckpointError(f"{e}{hint}") from e
        log.warning("%s; falling back to the checkpoint at step %d", e, before)
    raise AssertionError("unreachable")


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs carrying the given shardings (restore targets)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

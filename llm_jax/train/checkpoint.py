"""Checkpoints: an Orbax CheckpointManager at WORKDIR/checkpoints holding the train state and the
data-iterator state together, plus `restore_params` for everything that reads a trained run.

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

from llm_jax import config as config_lib

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"


class CheckpointError(RuntimeError):
  """A checkpoint is missing, broken or does not fit the model; the message names the step."""


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints as an absolute path (Orbax wants one)."""
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _handlers():
  return {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}


def path_name(path) -> str:
  """'params/blocks/attn/query/kernel' for a jax key path."""
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


def _shape_table(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_name(p): (tuple(leaf.shape), str(leaf.dtype)) for p, leaf in flat
          if hasattr(leaf, "shape")}


def shape_differences(saved, wanted) -> list[str]:
  """Lines naming each leaf whose presence, shape or dtype differs between two trees of arrays/specs."""
  a, b = _shape_table(saved), _shape_table(wanted)
  lines = []
  for key in sorted(set(a) | set(b)):
    if key not in b:
      lines.append(f"{key}: in the checkpoint {a[key][0]}, absent from the model")
    elif key not in a:
      lines.append(f"{key}: absent from the checkpoint, model wants {b[key][0]}")
    elif a[key] != b[key]:
      lines.append(f"{key}: checkpoint {a[key][0]} {a[key][1]}, model wants {b[key][0]} {b[key][1]}")
  return lines


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

  def _restore_one(self, step: int, abstract_state, with_data: bool):
    self.check_fits(step, abstract_state)
    items = {"state": ocp.args.PyTreeRestore(
        abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
    if with_data:
      items["data"] = ocp.args.JsonRestore()
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 - any read failure is a broken checkpoint
      raise CheckpointError(f"checkpoint at step {step} in {self.directory} cannot be restored: "
                            f"{type(e).__name__}: {str(e)[:500]}") from e
    return out["state"], (out["data"] if with_data else None)

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


def load_config(workdir: str):
  """The resolved config a run saved in WORKDIR/config.json."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise CheckpointError(f"{path} does not exist; is {workdir!r} a training run directory?")
  return config_lib.from_json(path)


def restore_params(workdir: str, step: int | None = None, mesh=None, *, merge_lora: bool = True):
  """(float32 params as a plain pytree, the run's config, step) from a run directory.

  Without a mesh the parameters land on the first local device; with one they are sharded by the
  run's logical-axis rules. Only the parameters are read (no optimizer state). A LoRA fine-tuning run
  (finetune.lora.rank > 0) checkpoints only its adapters: they come back merged into the base weights
  of its config.init_from (full parameters), or as saved with `merge_lora=False`.
  """
  config = load_config(workdir)
  if _is_lora(config):
    if merge_lora:
      from llm_jax.finetune import lora  # noqa: PLC0415 - lora imports this module
      params, config, step = lora.merged_params(workdir, step, mesh=mesh)
      if mesh is not None:  # the base's shardings
        params = jax.device_put(params, param_shardings(config, mesh))
      return params, config, step
  ckpts = Checkpoints(workdir, read_only=True)
  steps = ckpts.steps()
  if not steps:
    raise CheckpointError(f"no complete checkpoint in {ckpts.directory}")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f"no checkpoint at step {step} in {ckpts.directory}; have {steps}")
  meta = ckpts.saved_shapes(step)["params"]
  if mesh is None or _is_lora(config):  # adapters are small: replicated on a mesh
    sharding = (jax.sharding.SingleDeviceSharding(jax.local_devices()[0]) if mesh is None else
                jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta)
  else:
    target = abstract_with_shardings(_abstract_params(config), param_shardings(config, mesh))
    diffs = shape_differences(meta, target)
    if diffs:
      raise CheckpointError(f"checkpoint at step {step} in {ckpts.directory} does not match its "
                            f"config.json:\n  " + "\n  ".join(diffs))
  item = {"params": target}
  try:
    out = ckpts.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"checkpoint at step {step} in {ckpts.directory} cannot be restored: "
                          f"{type(e).__name__}: {str(e)[:500]}") from e
  ckpts.manager.close()
  return out["state"]["params"], config, int(step)


def _is_lora(config) -> bool:
  """True for a LoRA fine-tuning run's config (its checkpoints hold adapters only)."""
  f = config.get("finetune")
  lo = f.get("lora") if f is not None else None
  return bool(lo is not None and int(lo.get("rank", 0)) > 0)


def _model(config):
  from llm_jax.model import Decoder, ModelConfig  # noqa: PLC0415 - keep import light for readers
  return Decoder(ModelConfig.from_config(config))


def _abstract_params(config):
  import flax.linen as nn  # noqa: PLC0415
  model = _model(config)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros((1, 8), jax.numpy.int32))
  return nn.unbox(boxed)["params"]


def param_shardings(config, mesh):
  """NamedShardings of the model's parameters on `mesh` under the config's logical-axis rules."""
  import flax.linen as nn  # noqa: PLC0415
  from llm_jax import sharding as sharding_lib  # noqa: PLC0415
  model = _model(config)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros((1, 8), jax.numpy.int32))
  return sharding_lib.logical_to_sharding(nn.get_partition_spec(boxed)["params"], mesh, config)

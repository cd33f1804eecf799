"""Reading a training run directory (written by llm_jax.train.run_dir): config, tokenizer, provenance,
checkpoint steps and the parameters of one checkpoint.

A checkpoint that fails to read is never used silently: asked for the latest, the reader names the
broken step in one log line and takes the newest one that reads; asked for a step, it raises.
"""

from __future__ import annotations

import json
import logging
import os

import jax

from llm_jax import config as config_lib
from llm_jax.artifacts.errors import ArtifactError
from llm_jax.data import hf_tokenizer
from llm_jax.data.shards import file_sha256
from llm_jax.model.params import abstract_params, shape_differences
from llm_jax.train import checkpoint as ckpt_lib
from llm_jax.train import run_dir

log = logging.getLogger(__name__)


def is_run_dir(path: str) -> bool:
  """True for a training run directory (config.json or checkpoints/)."""
  return os.path.exists(os.path.join(path, run_dir.CONFIG_FILE)) or os.path.isdir(
    ckpt_lib.checkpoint_dir(path)
  )


def load_config(workdir: str):
  """The resolved config the run saved (older config.json files are migrated by config.from_json)."""
  path = os.path.join(workdir, run_dir.CONFIG_FILE)
  if not os.path.exists(path):
    raise ArtifactError(f"{path} does not exist; is {workdir!r} a training run directory?")
  try:
    return config_lib.from_json(path)
  except (OSError, ValueError) as e:
    raise ArtifactError(f"cannot read {path}: {e}") from e


def tokenizer_path(workdir: str) -> str:
  """WORKDIR/tokenizer.json (a Hugging Face tokenizer a fine-tune reused) or WORKDIR/tokenizer.model."""
  for name in (run_dir.TOKENIZER_JSON, run_dir.TOKENIZER_FILE):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      return path
  path = os.path.join(workdir, run_dir.TOKENIZER_FILE)
  raise ArtifactError(f"{path} is missing; is {workdir!r} a complete training run directory?")


def load_tokenizer(workdir: str):
  """(tokenizer, path) of a run directory, through the one loader (llm_jax.data.hf_tokenizer)."""
  path = tokenizer_path(workdir)
  try:
    return hf_tokenizer.load_tokenizer(path), path
  except hf_tokenizer.DataError as e:
    raise ArtifactError(f"{workdir}: {e}") from e


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ArtifactError(f"{path} is not valid JSON (line {e.lineno}): {e.msg}") from e
  except OSError as e:
    raise ArtifactError(f"cannot read {path}: {e}") from e


def record(workdir: str) -> dict:
  """run.json ({} when absent)."""
  return _read_json(os.path.join(workdir, run_dir.RUN_FILE)) or {}


def manifest(workdir: str) -> dict | None:
  """The data manifest.json copied into the run directory, or None."""
  return _read_json(os.path.join(workdir, run_dir.MANIFEST_FILE))


def provenance(workdir: str) -> dict:
  """git commit, tokenizer and data-manifest sha256 of a run (run.json; the manifest hashed if absent)."""
  rec = record(workdir)
  if not rec:
    log.warning(
      "%s is missing: provenance records git commit 'unknown'", os.path.join(workdir, run_dir.RUN_FILE)
    )
  git = rec.get("git") if isinstance(rec.get("git"), dict) else {}
  commit = str(git.get("commit") or "") + ("+dirty" if git.get("dirty") else "")
  manifest_sha = rec.get("manifest_sha256") or ""
  mpath = os.path.join(workdir, run_dir.MANIFEST_FILE)
  if not manifest_sha and os.path.exists(mpath):
    manifest_sha = file_sha256(mpath)
  out = {
    "git_commit": commit,
    "tokenizer_sha256": rec.get("tokenizer_sha256") or "",
    "manifest_sha256": manifest_sha,
  }
  declared = rec.get("max_position_embeddings")  # a fine-tune's source's context (a RoPE model's)
  if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
    out["max_position_embeddings"] = declared
  return out


def check_tokenizer(workdir: str, tokenizer) -> None:
  """The tokenizer beside the checkpoints is the one run.json and manifest.json record."""
  recorded = (
    ("run.json", record(workdir).get("tokenizer_sha256")),
    ("manifest.json", ((manifest(workdir) or {}).get("tokenizer") or {}).get("sha256")),
  )
  for where, sha in recorded:
    if sha and sha != tokenizer.sha256:
      raise ArtifactError(
        f"{tokenizer.path or workdir} has sha256 {tokenizer.sha256[:16]}..., but {workdir}/{where} "
        f"records tokenizer sha256 {sha[:16]}...: the run directory mixes two tokenizers"
      )


def require_checkpoints(workdir: str) -> None:
  """Raises unless the run has a checkpoints/ directory."""
  if not os.path.isdir(ckpt_lib.checkpoint_dir(workdir)):
    raise ArtifactError(
      f"{workdir} has no checkpoints/ directory: nothing to open yet (train first, "
      "or give a run that saved a checkpoint)"
    )


def _open_checkpoints(workdir: str) -> ckpt_lib.Checkpoints:
  require_checkpoints(workdir)
  return ckpt_lib.Checkpoints(workdir, read_only=True)


def steps(workdir: str) -> list[int]:
  """Complete checkpoint steps of a run, ascending."""
  ckpts = _open_checkpoints(workdir)
  try:
    return ckpts.steps()
  finally:
    ckpts.close()


def best_step(ckpts: ckpt_lib.Checkpoints) -> int:
  """The step of the best validation loss the run recorded (train.keep_best)."""
  find = getattr(ckpts, "best_step", None)
  best = find() if find is not None else None
  if best is None:
    raise ArtifactError(
      f"{ckpts.directory} records no best checkpoint (train.keep_best needs "
      "evaluation during training); give a step number instead"
    )
  return int(best)


def resolve_step(workdir: str, step: int | str | None) -> int:
  """The checkpoint step `step` names (None: the latest, 'best': train.keep_best's), which must exist."""
  ckpts = _open_checkpoints(workdir)
  try:
    have = ckpts.steps()
    if not have:
      raise ArtifactError(f"{workdir!r} has no usable weights: no complete checkpoint in {ckpts.directory}")
    if step is None:
      return have[-1]
    step = best_step(ckpts) if step == "best" else int(step)
    if step not in have:
      raise ArtifactError(f"no checkpoint at step {step} in {ckpts.directory}; have {have}")
    return step
  finally:
    ckpts.close()


def read_params(workdir: str, config, step: int | str | None, target_fn):
  """(float32 parameters, step) of one checkpoint; `target_fn(saved_param_metadata)` gives the restore
  target (ShapeDtypeStructs with shardings). step: an int, 'best', or None for the latest readable."""
  ckpts = _open_checkpoints(workdir)
  try:
    have = ckpts.steps()
    if not have:
      raise ArtifactError(f"no complete checkpoint in {ckpts.directory}")
    if step == "best":
      step = best_step(ckpts)
    if step is not None:
      step = int(step)
      if step not in have:
        raise ArtifactError(f"no checkpoint at step {step} in {ckpts.directory}; have {have}")
      candidates = [step]
    else:
      candidates = list(reversed(have))
    for i, s in enumerate(candidates):
      try:
        meta = ckpts.saved_shapes(s)["params"]
        target = target_fn(meta)
        diffs = shape_differences(meta, target, dtypes=False)
        if diffs:
          raise ArtifactError(
            f"checkpoint at step {s} in {ckpts.directory} does not match its "
            "config.json:\n  " + "\n  ".join(diffs)
          )
        return ckpts.read_params(s, target), s
      except ckpt_lib.CheckpointError as e:
        if i + 1 >= len(candidates):
          raise ArtifactError(str(e)) from e
        log.warning(
          "skipping the checkpoint at step %d in %s (unreadable: %s); using step %d",
          s,
          ckpts.directory,
          str(e).splitlines()[0][:200],
          candidates[i + 1],
        )
    raise AssertionError("unreachable")
  finally:
    ckpts.close()


def param_target(model_cfg, sharding_fn):
  """A target_fn for read_params: the model's parameter shapes placed by `sharding_fn(logical_specs)`."""

  def target(saved_meta):
    del saved_meta
    shapes, specs = abstract_params(model_cfg)
    shardings = sharding_fn(specs)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)

  return target


def saved_target(sharding):
  """A target_fn restoring exactly what was saved (LoRA adapters), every leaf in `sharding`."""

  def target(saved_meta):
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), saved_meta)

  return target

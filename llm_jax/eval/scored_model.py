"""What evaluation scores: a training run's checkpoint or an exported package, behind one small adapter.

`open_model(path, step)` returns a ScoredModel (params on the evaluation mesh, ModelConfig, tokenizer,
meta, the config that places it). A directory with checkpoints/ or config.json is a run; one with
model.json is a package (llm_jax.package.load_package).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import ml_collections

from llm_jax import config as config_lib
from llm_jax import sharding as sharding_lib


class EvalError(ValueError):
  """Evaluation cannot start or continue; the message names the path, step or key."""


@dataclasses.dataclass
class ScoredModel:
  """Parameters placed on `mesh`, their ModelConfig and tokenizer, and where they came from."""
  params: Any
  model_cfg: Any  # llm_jax.model.ModelConfig
  tokenizer: Any  # llm_jax.data.tokenizer.Tokenizer
  meta: dict  # run.json (runs) or model.json (packages)
  config: Any  # ConfigDict: the run's config, or defaults for a package (sharding rules)
  mesh: Any
  step: int
  kind: str  # "run" | "package"
  path: str
  manifest: dict | None = None  # the run's data manifest (runs only)

  def model(self):
    """The Decoder these parameters belong to."""
    from llm_jax.model import Decoder
    return Decoder(self.model_cfg)

  @property
  def prefix_ids(self) -> list[int]:
    """What precedes a document: training shards put EOS between documents, so text starts after EOS."""
    return [self.tokenizer.eos_id]


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise EvalError(f"cannot read {path}: {e}") from e


def eval_mesh(config):
  """The run's mesh when this machine's devices fit it, else plain data parallelism over all devices."""
  try:
    return sharding_lib.make_mesh(config), config
  except config_lib.ConfigError as e:
    logging.warning("the run's mesh does not fit %d devices (%s); evaluating data-parallel",
                    jax.device_count(), e)
    config = ml_collections.ConfigDict(config_lib.to_dict(config))
    config.sharding.data, config.sharding.fsdp, config.sharding.tensor = -1, 1, 1
    return sharding_lib.make_mesh(config), config


def open_model(path: str, step: int | None = None) -> ScoredModel:
  """A run directory (latest or given checkpoint step) or an exported package, ready to score."""
  if not os.path.isdir(path):
    raise EvalError(f"{path} is not a directory (give a training --workdir or an exported package)")
  if os.path.exists(os.path.join(path, "model.json")) and not os.path.isdir(os.path.join(path, "checkpoints")):
    return _open_package(path, step)
  return _open_run(path, step)


def _open_run(workdir: str, step: int | None) -> ScoredModel:
  from llm_jax.data.tokenizer import Tokenizer
  from llm_jax.model import ModelConfig
  from llm_jax.train import checkpoint as ckpt_lib
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.exists(cfg_path):
    raise EvalError(f"{cfg_path} does not exist; is {workdir} a training run directory?")
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise EvalError(f"{workdir} has no checkpoints/ directory: nothing to evaluate yet (train first, or "
                    "point --workdir at a run that saved a checkpoint)")
  tok_path = os.path.join(workdir, "tokenizer.model")
  if not os.path.exists(tok_path):
    raise EvalError(f"{tok_path} is missing; the run directory is incomplete")
  tokenizer = Tokenizer.load(tok_path)
  config = ckpt_lib.load_config(workdir)
  mesh, config = eval_mesh(config)
  try:
    params, config_saved, step = ckpt_lib.restore_params(workdir, step, mesh)
  except ckpt_lib.CheckpointError as e:
    raise EvalError(str(e)) from e
  del config_saved
  run = _read_json(os.path.join(workdir, "run.json")) or {}
  manifest = _read_json(os.path.join(workdir, "manifest.json"))
  for where, sha in (("run.json", _find(run, "tokenizer_sha256")),
                     ("manifest.json", (manifest or {}).get("tokenizer", {}).get("sha256"))):
    if sha and sha != tokenizer.sha256:
      raise EvalError(f"{tok_path} has sha256 {tokenizer.sha256[:16]}..., but {workdir}/{where} records "
                      f"tokenizer sha256 {sha[:16]}...: the run directory mixes two tokenizers")
  model_cfg = ModelConfig.from_config(config, tokenizer_size=tokenizer.vocab_size)
  return ScoredModel(params, model_cfg, tokenizer, run, config, mesh, int(step), "run",
                     os.path.abspath(workdir), manifest)


def _open_package(path: str, step: int | None) -> ScoredModel:
  from configs import base
  from llm_jax import package as package_lib
  try:
    loaded = package_lib.load_package(path)
  except package_lib.PackageError as e:
    raise EvalError(str(e)) from e
  pstep = int(loaded.meta.get("provenance", {}).get("training_step", loaded.meta.get("step", 0)) or 0)
  if step is not None and step != pstep:
    raise EvalError(f"package {path} holds step {pstep}; --step={step} cannot be chosen for a package")
  config = base.get_config()
  mesh, config = eval_mesh(config)
  params = jax.device_put(loaded.params, sharding_lib.replicated(mesh))
  return ScoredModel(params, loaded.model_config, loaded.tokenizer, loaded.meta, config, mesh, pstep,
                     "package", os.path.abspath(path))


def _find(d: dict, key: str) -> str:
  """A key at the top level of a record or one level down."""
  if d.get(key):
    return str(d[key])
  for v in d.values():
    if isinstance(v, dict) and v.get(key):
      return str(v[key])
  return ""

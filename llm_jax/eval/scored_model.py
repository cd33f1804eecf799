"""What evaluation scores: a model opened by llm_jax.artifacts.open_model on the evaluation mesh.

The mesh is the run's own when this machine's devices fit it, else plain data parallelism over all
devices (and always for a package, which carries no mesh settings).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import ml_collections

from llm_jax import config as config_lib
from llm_jax import sharding as sharding_lib
from llm_jax.artifacts import ArtifactError, kind_of
from llm_jax.artifacts import open_model as open_artifact
from llm_jax.artifacts import run as run_lib
from llm_jax.model import Decoder


class EvalError(ValueError):
  """Evaluation cannot start or continue; the message names the path, step or key."""


@dataclasses.dataclass
class ScoredModel:
  """Parameters placed on `mesh`, their ModelConfig and tokenizer, and where they came from."""

  params: Any
  model_cfg: Any  # llm_jax.model.ModelConfig
  tokenizer: Any  # llm_jax.data.tokenizer.Tokenizer
  meta: dict  # run.json (runs) or model.json (packages)
  config: Any  # the run's ConfigDict (its mesh and rules), or None for a package (default rules)
  mesh: Any
  step: int
  kind: str  # "run" | "package" | "hf"
  path: str
  manifest: dict | None = None  # the run's data manifest (runs only)

  def model(self):
    """The Decoder these parameters belong to."""
    return Decoder(self.model_cfg)

  @property
  def model_config(self):
    return self.model_cfg

  @property
  def prefix_ids(self) -> list[int]:
    """What precedes a document: the model's prompt prefix (BOS for imported Hugging Face models), else
    EOS: training shards put EOS between documents, so text starts after EOS."""
    return [int(i) for i in self.meta.get("prompt_prefix", [self.tokenizer.eos_id])]


def eval_mesh(config):
  """(mesh, config): the run's mesh when the devices fit it, else data parallelism over all devices."""
  if config is None:
    return sharding_lib.data_parallel_mesh(), None
  try:
    return sharding_lib.make_mesh(config), config
  except config_lib.ConfigError as e:
    logging.warning(
      "the run's mesh does not fit %d devices (%s); evaluating data-parallel", jax.device_count(), e
    )
    config = ml_collections.ConfigDict(config_lib.to_dict(config))
    config.sharding.data, config.sharding.fsdp, config.sharding.tensor = -1, 1, 1
    return sharding_lib.make_mesh(config), config


def open_model(path: str, step: int | str | None = None) -> ScoredModel:
  """A run directory (latest, given or 'best' checkpoint) or a package, ready to score."""
  try:
    config = run_lib.load_config(path) if kind_of(path) == "run" else None
    mesh, config = eval_mesh(config)
    opened = open_artifact(path, step, mesh=mesh)
  except ArtifactError as e:
    raise EvalError(str(e)) from e
  meta = opened.meta.get("run", {}) if opened.kind == "run" else opened.meta
  return ScoredModel(
    opened.params,
    opened.model_config,
    opened.tokenizer,
    meta,
    config,
    mesh,
    opened.step,
    opened.kind,
    opened.path,
    opened.manifest,
  )

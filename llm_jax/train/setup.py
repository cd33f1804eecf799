"""Everything a run needs, built once from the config: data, tokenizer, model, optimizer, mesh, shardings.

Nothing here allocates parameters or writes into the run directory.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from llm_jax import config as config_lib
from llm_jax import sharding as sharding_lib
from llm_jax.model import Decoder, ModelConfig
from llm_jax.model.config import check_gelu_kernel
from llm_jax.train import optimizer as optimizer_lib
from llm_jax.train import profiling
from llm_jax.train.extension import TrainExtension


@dataclasses.dataclass
class Setup:
  """The run's parts, built once from the config."""

  config: Any
  prepared: Any
  tokenizer: Any
  model_cfg: ModelConfig
  model: Decoder
  optimizer: Any
  mesh: Any
  extension: TrainExtension
  state_shardings: Any = None
  abstract_state: Any = None

  def process_slice(self) -> tuple[int, int]:
    """(index, count) of the block of batch rows this process's devices hold."""
    return sharding_lib.process_batch_slice(self.mesh)


def _prepare_data(config, extension: TrainExtension):
  if jax.process_count() == 1:
    return extension.prepare_data(config)
  prepared = extension.prepare_data(config) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("llm_jax prepared data")
  return prepared or extension.prepare_data(config)


def _check_profile(spec: str) -> None:
  try:
    profiling.parse_profile_steps(spec)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from e


def build(config, extension: TrainExtension | None = None) -> Setup:
  """Data, tokenizer, resolved model config, mesh and state shardings (no parameters allocated)."""
  extension = extension or TrainExtension()
  config_lib.validate(config, jax.device_count())
  check_gelu_kernel(config.model)
  _check_profile(config.train.profile_steps)
  extension.validate(config)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    extension.resolve_config(config)
  prepared = _prepare_data(config, extension)
  tokenizer = prepared.tokenizer()
  model_cfg = ModelConfig.from_config(config, tokenizer.vocab_size)
  if model_cfg.vocab_size < tokenizer.vocab_size:
    raise config_lib.ConfigError(
      f"model.vocab_size={model_cfg.vocab_size} is smaller than the "
      f"tokenizer's {tokenizer.vocab_size} pieces ({prepared.tokenizer_path})"
    )
  with config.unlocked():
    config.model.vocab_size = model_cfg.vocab_size  # config.json then needs no tokenizer to rebuild
  optimizer = extension.wrap_optimizer(optimizer_lib.make_optimizer(config), config)
  setup = Setup(
    config,
    prepared,
    tokenizer,
    model_cfg,
    extension.make_model(model_cfg),
    optimizer,
    sharding_lib.make_mesh(config),
    extension,
  )
  extension.attach(setup)
  setup.abstract_state, setup.state_shardings = extension.state_shardings(setup)
  return setup


def eval_batches(setup: Setup) -> list[dict[str, np.ndarray]]:
  """This process's rows of the held-out batches (the extension's; by default train.eval_batches of the
  val split, 0: all)."""
  index, count = setup.process_slice()
  return setup.extension.eval_batches(setup, index, count)

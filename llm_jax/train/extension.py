"""The trainer's extension point: how a run's state is made, stepped, fed and restored.

`TrainExtension`'s methods do plain pretraining. A training variant (fine-tuning in llm_jax.finetune)
subclasses it and `train.loop.train(config, workdir, extension=...)` calls the overrides; the trainer
itself never imports a variant. The order of calls in a run:

    validate(config)                 before anything is read or written
    resolve_config(config)           fill the config in place before it is saved (absolute paths)
    prepare_data(config)             the prepared data (tokenizer, shards)
    wrap_optimizer(optimizer)        e.g. masks for frozen parameters
    make_model(model_cfg)            the flax module trained (a Decoder; an encoder's classifier)
    attach(setup)                    the model, mesh and tokenizer exist: check sources, load bases
    state_shardings(setup)           the abstract state and its shardings: what a checkpoint restores into
    init_state(setup, seed)          the first state of a fresh run
    make_loader(setup, i, n)         the training batches of this process
    eval_batches(setup, i, n)        the held-out batches of val_loss (the val split)
    extra_eval_sets(setup, i, n)     more held-out sets, logged as val_loss/NAME
    train_step(setup, ...)           the jitted step
    model_params(params)             the parameters the model runs with (eval, samples)
    runs_preflight()                 whether the preflight checks apply to this state
    hooks(setup)                     more periodic actions (llm_jax.train.hooks)
"""

from __future__ import annotations

import functools
from typing import Any

import jax

from llm_jax import config as config_lib
from llm_jax.data import loader as loader_lib
from llm_jax.data import prepare as prepare_lib
from llm_jax.model import Decoder
from llm_jax.train import state as state_lib
from llm_jax.train import step as step_lib


def needs_variant(config) -> list[str]:
  """The config keys set that plain pretraining cannot honour (fine-tuning's), as 'key=value'."""
  found = []
  if config.get("init_from"):
    found.append(f"init_from={config.init_from!r}")
  if config.get("reuse_source_tokenizer"):
    found.append("reuse_source_tokenizer=True")
  f = config.get("finetune")
  if f is not None:
    for key, off in (("freeze_embeddings", False), ("freeze_blocks", 0), ("freeze_patterns", "")):
      if f.get(key, off) != off:
        found.append(f"finetune.{key}={f[key]!r}")
    if f.get("lora") is not None and f.lora.get("rank", 0):
      found.append(f"finetune.lora.rank={f.lora.rank}")
    if f.get("sft") is not None and (f.sft.get("train_file") or f.sft.get("val_file")):
      found.append("finetune.sft.train_file/val_file")
  return found


class TrainExtension:
  """Plain pretraining; every method is a step a training variant may replace."""

  name = "pretrain"

  def validate(self, config) -> None:
    """Checks of the variant's own keys; plain pretraining refuses fine-tuning keys it would ignore."""
    if not config.model.get("causal", True):
      raise config_lib.ConfigError(
        "model.causal=False trains an encoder, which needs llm_jax.encoder's extension: run "
        "`python -m llm_jax.train` (it picks the extension from the config)"
      )
    keys = needs_variant(config)
    if keys:
      raise config_lib.ConfigError(
        f"{', '.join(keys)} need the fine-tuning extension, which plain pretraining does not apply: "
        "run `python -m llm_jax.train` (it picks the extension from the config), or pass "
        "extension=llm_jax.finetune.extension_for(config) to train()"
      )

  def resolve_config(self, config) -> None:
    """Fills in the config (in place, unlocked) before it is saved as config.json."""
    del config

  def prepare_data(self, config):
    """The prepared data: llm_jax.data.prepare's Prepared (tokenizer, shards, manifest)."""
    return prepare_lib.prepare(config)

  def wrap_optimizer(self, optimizer, config):
    """The update rule around the configured AdamW (e.g. frozen parameters masked out)."""
    del config
    return optimizer

  def make_model(self, model_cfg):
    """The flax module the run trains and evaluates (setup.model)."""
    return Decoder(model_cfg)

  def attach(self, setup) -> None:
    """Called once the model, mesh and tokenizer exist, before any state is made."""
    del setup

  def state_shardings(self, setup) -> tuple[Any, Any]:
    """(abstract state, its shardings): the state's layout, and the target a checkpoint restores into."""
    return state_lib.state_shardings(setup.model, setup.optimizer, setup.mesh, setup.config)

  def init_state(self, setup, seed: int):
    """The first state of a fresh run, created in its shards."""
    return state_lib.create_state(setup.model, setup.optimizer, setup.mesh, setup.config, seed)[0]

  def make_loader(self, setup, process_index: int, process_count: int):
    """This process's training batches (a resumable StepLoader: get_state / set_state)."""
    c = setup.config
    return loader_lib.TrainLoader(
      setup.prepared.dir,
      "train",
      c.train.seq_len,
      c.train.global_batch_size,
      c.data.seed,
      process_index=process_index,
      process_count=process_count,
      segment_windows=c.data.segment_windows,
      mixture=c.data.mixture,
      window_offsets=c.data.window_offsets,
    )

  def eval_batches(self, setup, process_index: int, process_count: int) -> list:
    """This process's rows of the held-out batches behind val_loss (train.eval_batches of the val split);
    none when the data has no val split (data.val_fraction=0 without data.val_corpus)."""
    c = setup.config
    if not any(r["split"] == "val" for r in setup.prepared.manifest["shards"]):
      return []
    return list(
      loader_lib.eval_batches(
        setup.prepared.dir,
        "val",
        c.train.seq_len,
        c.train.global_batch_size,
        max_batches=c.train.eval_batches or None,
        process_index=process_index,
        process_count=process_count,
      )
    )

  def extra_eval_sets(self, setup, process_index: int, process_count: int) -> dict[str, list]:
    """{name: host batches} evaluated beside the val split and logged as val_loss/NAME."""
    del setup, process_index, process_count
    return {}

  def train_step(self, setup, batch_shardings, metrics_sharding):
    """The jitted step (state, batch) -> (state, metrics); the state is donated."""
    fn = functools.partial(
      step_lib.train_step, model=setup.model, optimizer=setup.optimizer, config=setup.config
    )
    return jax.jit(
      fn,
      in_shardings=(setup.state_shardings, batch_shardings),
      out_shardings=(setup.state_shardings, metrics_sharding),
      donate_argnums=0,
    )

  def model_params(self, params):
    """The parameters the model runs with for evaluation and samples (the state's own here)."""
    return params

  def runs_preflight(self) -> bool:
    """Whether preflight's update check applies (it updates the state's params as model params)."""
    return True

  def hooks(self, setup) -> list:
    """More periodic actions (llm_jax.train.hooks.Hook), run after the built-in ones."""
    del setup
    return []

  def describe(self, state) -> str:
    """A log line about the first state (e.g. trainable and frozen counts); empty for none."""
    del state
    return ""

  def run_record(self) -> dict:
    """Fields this extension adds to run.json (e.g. the stop ids of the weights it started from)."""
    return {}

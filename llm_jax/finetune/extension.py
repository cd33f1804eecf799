"""Fine-tuning as the trainer's extension: init_from weights, frozen groups, LoRA adapters, SFT data.

    extension = extension_for(config)        # None for plain pretraining
    llm_jax.train.loop.train(config, workdir, extension=extension)

`python -m llm_jax.train` picks it from the config (init_from, finetune.*); `train(config, workdir)`
below does the same for code.
"""

from __future__ import annotations

import functools
import logging
import os

import jax

from llm_jax import config as config_lib
from llm_jax import sharding as sharding_lib
from llm_jax.data import prepare as prepare_lib
from llm_jax.finetune import freeze, init_from, lora, sft
from llm_jax.generate import samples
from llm_jax.model.params import abstract_params
from llm_jax.train import loop
from llm_jax.train.extension import TrainExtension, needs_variant

log = logging.getLogger(__name__)


def validate(config) -> None:
  """Cross-field checks of init_from and config.finetune; each failure names the keys."""
  f = config.get("finetune")
  spec = lora.spec_from_config(config)
  if spec is not None and not config.get("init_from"):
    raise config_lib.ConfigError("finetune.lora.rank > 0 needs init_from (the base model to adapt)")
  if spec is not None and freeze.spec_from_config(config).active:
    raise config_lib.ConfigError(
      "finetune.lora.rank > 0 and finetune.freeze_* are exclusive: LoRA already freezes every base weight"
    )
  if config.get("reuse_source_tokenizer") and not config.get("init_from"):
    raise config_lib.ConfigError("reuse_source_tokenizer=True needs init_from (the source)")
  if f is not None and f.sft.train_file and not os.path.exists(f.sft.train_file):
    raise config_lib.ConfigError(f"finetune.sft.train_file={f.sft.train_file!r} does not exist")
  if f is not None and f.sft.val_file and not os.path.exists(f.sft.val_file):
    raise config_lib.ConfigError(f"finetune.sft.val_file={f.sft.val_file!r} does not exist")
  if f is not None and (f.sft.train_file or f.sft.val_file):
    sft.templates_from_config(config)


def resolve_init_from(config) -> None:
  """init_from as an absolute path, its '@STEP' / '@best' pinned into finetune.init_step (in place).

  config.json then names the source from anywhere (resume, export) and the exact checkpoint used.
  """
  if not config.get("init_from"):
    return
  path, at = init_from.parse_source(config.init_from)
  step = int(config.finetune.init_step)
  if at is not None:
    if step >= 0:
      raise config_lib.ConfigError(
        f"init_from={config.init_from!r} names a step and finetune.init_step={step} another; give one of them"
      )
    step = init_from.describe(config.init_from).step  # 'best' resolved to its number
  config.init_from = os.path.abspath(os.path.expanduser(path))
  config.finetune.init_step = int(step)
  resolve_tokenizer(config)


def resolve_tokenizer(config) -> None:
  """reuse_source_tokenizer=True (in place) when the source's tokenizer is not llm_jax's SentencePiece
  model: data preparation can only train that kind, so such a source (a tokenizer.json, a SentencePiece
  model with its own special ids) is always fine-tuned on its own tokenizer; config.json records it."""
  if config.get("reuse_source_tokenizer") or not config.get("init_from"):
    return
  source = init_from.describe(config.init_from)
  if not source.own_tokenizer:
    log.info(
      "init_from %s has its own tokenizer (%s): reuse_source_tokenizer=True",
      source.path,
      source.tokenizer_path,
    )
    config.reuse_source_tokenizer = True


class FinetuneExtension(TrainExtension):
  """The trainer's hooks for a run that fine-tunes: source weights, frozen groups, LoRA, SFT data."""

  name = "finetune"

  def __init__(self):
    self.lora = None
    self.base = self.base_shardings = self._merge = None
    self.config = self.mesh = self.tokenizer = None
    self.stop_ids: list[int] = []  # the source's end-of-text ids besides EOS (run.json stop_ids)
    self.declared_context: int | None = None  # a RoPE source's context (run.json)

  def validate(self, config) -> None:
    validate(config)

  def resolve_config(self, config) -> None:
    resolve_init_from(config)

  def prepare_data(self, config):
    """config.data prepared; with reuse_source_tokenizer, on the source's tokenizer (its files are
    copied into the prepared data and from there into the run directory)."""
    if not (config.get("reuse_source_tokenizer") and config.get("init_from")):
      return prepare_lib.prepare(config)
    source = init_from.describe(config.init_from)
    sha = source.tokenizer_sha256
    log.info(
      "preparing %s with the source's tokenizer %s (%s)", config.data.corpus, source.tokenizer_path, sha[:12]
    )
    prepared = prepare_lib.prepare(config, tokenizer=source.tokenizer)
    if prepared.tokenizer_sha256 != sha:
      raise init_from.InitFromError(
        f"prepared data in {prepared.dir} has tokenizer sha256 "
        f"{prepared.tokenizer_sha256}, not the source's {sha}"
      )
    return prepared

  def wrap_optimizer(self, optimizer, config):
    return freeze.wrap(optimizer, config)

  def _step(self) -> int | None:
    step = int(self.config.finetune.init_step)
    return None if step < 0 else step

  def attach(self, setup) -> None:
    """Checks the source's tokenizer and shapes (cheap); for LoRA, reads the frozen base."""
    self.config, self.mesh, self.tokenizer = setup.config, setup.mesh, setup.tokenizer
    self.lora = lora.spec_from_config(setup.config)
    if setup.config.get("init_from"):  # before anything is written
      probe = init_from.describe(setup.config.init_from, self._step())
      init_from.check_tokenizer(setup.config, probe, setup.prepared.tokenizer_sha256)
      init_from.check_model(setup.config, probe, setup.tokenizer.vocab_size)
      self.stop_ids = list(probe.stop_ids)
      self.declared_context = probe.declared_context
    if self.lora is not None:
      shapes, specs = abstract_params(setup.model_cfg)
      self.base_shardings = sharding_lib.logical_to_sharding(specs, setup.mesh, setup.config)
      source = self._source()
      self.base = init_from.place(init_from.fit(source.params, shapes, source.path), self.base_shardings)
      self._merge = jax.jit(functools.partial(_merge, spec=self.lora), out_shardings=self.base_shardings)

  def _source(self) -> init_from.Source:
    source = init_from.load_source(self.config.init_from, self._step(), mesh=self.mesh)
    init_from.check_model(self.config, source, self.tokenizer.vocab_size)
    return source

  def run_record(self) -> dict:
    """What a fine-tune keeps of its source: stop ids (an instruct model's end-of-turn ids) and a RoPE
    model's declared context (an export declares it, not the run's shorter training context)."""
    out = {"stop_ids": self.stop_ids} if self.stop_ids else {}
    if self.declared_context:
      out["max_position_embeddings"] = self.declared_context
    return out

  def state_shardings(self, setup):
    if self.lora is None:
      return super().state_shardings(setup)
    return lora.state_shardings(self.base, setup.optimizer, setup.mesh, setup.config)

  def init_state(self, setup, seed: int):
    """Fresh adapters (LoRA), or a fresh state holding the source's weights."""
    if self.lora is not None:
      return lora.create_state(self.base, setup.optimizer, setup.mesh, setup.config, seed)[0]
    state = super().init_state(setup, seed)
    if not setup.config.get("init_from"):
      return state
    source = self._source()
    log.info("init_from %s (step %s)", source.path, source.step)
    return init_from.into_state(state, setup.state_shardings, source)

  def describe(self, state) -> str:
    if self.lora is not None or not self.config.get("init_from"):
      return ""
    counts = freeze.summary(state.params, self.config)
    return f"fine-tuning: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen parameters"

  def make_loader(self, setup, process_index: int, process_count: int):
    c = setup.config
    if not c.finetune.sft.train_file:
      return super().make_loader(setup, process_index, process_count)
    rows = sft.load(c.finetune.sft.train_file, setup.tokenizer, c.train.seq_len, sft.templates_from_config(c))
    return sft.SFTLoader(rows, c.train.global_batch_size, c.data.seed, process_index, process_count)

  def extra_eval_sets(self, setup, process_index: int, process_count: int) -> dict[str, list]:
    """{'sft': packed batches of finetune.sft.val_file} (empty when unset)."""
    c = setup.config
    if not c.finetune.sft.val_file:
      return {}
    rows = sft.load(c.finetune.sft.val_file, setup.tokenizer, c.train.seq_len, sft.templates_from_config(c))
    return {
      "sft": list(
        sft.eval_batches(
          rows, c.train.global_batch_size, c.train.eval_batches or None, process_index, process_count
        )
      )
    }

  def train_step(self, setup, batch_shardings, metrics_sharding):
    """LoRA: the base weights are an argument of the step, not constants baked into the program."""
    if self.lora is None:
      return super().train_step(setup, batch_shardings, metrics_sharding)
    jitted = jax.jit(
      functools.partial(lora.train_step, model=setup.model, optimizer=setup.optimizer, config=setup.config),
      in_shardings=(setup.state_shardings, batch_shardings, self.base_shardings),
      out_shardings=(setup.state_shardings, metrics_sharding),
      donate_argnums=0,
    )
    return lambda state, batch: jitted(state, batch, self.base)

  def model_params(self, params):
    """Merged base + adapters for LoRA, else the state's own parameters."""
    return params if self.lora is None else self._merge(params, self.base)

  def runs_preflight(self) -> bool:
    return self.lora is None  # LoRA's state is adapters, not model parameters


def _merge(adapters, base, *, spec):
  return lora.merge(base, adapters, spec)


def extension_for(config) -> FinetuneExtension | None:
  """The fine-tuning extension when the config asks for it (init_from, finetune.*), else None."""
  return FinetuneExtension() if needs_variant(config) else None


def train(config, workdir: str, **kwargs):
  """llm_jax.train.loop.train with the extension the config asks for (and samples through generate)."""
  kwargs.setdefault("make_sampler", samples.for_training)
  return loop.train(config, workdir, extension_for(config), **kwargs)

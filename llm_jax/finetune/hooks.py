"""What the training loop calls when a run fine-tunes: source tokenizer and weights, LoRA state and
step, SFT batches. `Finetune.create` returns None for an ordinary run, so the loop's hooks are no-ops.
"""
from __future__ import annotations

import functools
import logging
import os

import flax.linen as nn
import jax

from llm_jax import config as config_lib
from llm_jax import sharding as sharding_lib
from llm_jax.finetune import freeze, init_from, lora, sft

log = logging.getLogger(__name__)


def validate(config) -> None:
  """Cross-field checks of init_from and config.finetune; each failure names the keys."""
  f = config.get("finetune")
  spec = lora.spec_from_config(config)
  if spec is not None and not config.get("init_from"):
    raise config_lib.ConfigError("finetune.lora.rank > 0 needs init_from (the base model to adapt)")
  if spec is not None and freeze.spec_from_config(config).active:
    raise config_lib.ConfigError("finetune.lora.rank > 0 and finetune.freeze_* are exclusive: LoRA "
                                 "already freezes every base weight")
  if config.get("reuse_source_tokenizer") and not config.get("init_from"):
    raise config_lib.ConfigError("reuse_source_tokenizer=True needs init_from (the source)")
  if f is not None and f.sft.train_file and not os.path.exists(f.sft.train_file):
    raise config_lib.ConfigError(f"finetune.sft.train_file={f.sft.train_file!r} does not exist")
  if f is not None and f.sft.val_file and not os.path.exists(f.sft.val_file):
    raise config_lib.ConfigError(f"finetune.sft.val_file={f.sft.val_file!r} does not exist")
  if f is not None and (f.sft.train_file or f.sft.val_file):
    sft.templates_from_config(config)


def prepare_data(config):
  """config.data prepared with the source's tokenizer.model (reuse_source_tokenizer=True).

  The cache key of such a preparation includes the tokenizer's hash.
  """
  from llm_jax.data import prepare as prepare_lib  # noqa: PLC0415
  tok_path, sha = init_from.tokenizer_of(config.init_from)
  log.info("preparing %s with the source's tokenizer %s (%s)", config.data.corpus, tok_path, sha[:12])
  prepared = prepare_lib.prepare(config, tokenizer_path=tok_path)
  if prepared.tokenizer_sha256 != sha:
    raise init_from.InitFromError(f"prepared data in {prepared.dir} has tokenizer sha256 "
                                  f"{prepared.tokenizer_sha256}, not the source's {sha}")
  return prepared


class Finetune:
  """A fine-tuning run's extras: the source, the LoRA base and step, SFT data."""

  def __init__(self, config, model, mesh, tokenizer, tokenizer_sha256: str):
    self.config, self.mesh, self.tokenizer = config, mesh, tokenizer
    self.lora = lora.spec_from_config(config)
    self._source = None
    self.base = self.base_shardings = None
    if config.get("init_from"):  # checked before the run directory is written
      step = int(config.finetune.init_step)
      probe = init_from.describe(config.init_from, None if step < 0 else step)
      init_from.check_tokenizer(config, probe, tokenizer_sha256)
      init_from.check_model(config, probe, tokenizer.vocab_size)
    if self.lora is not None:
      boxed = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros((1, 8), jax.numpy.int32))
      abstract = nn.unbox(boxed)["params"]
      self.base_shardings = sharding_lib.logical_to_sharding(nn.get_partition_spec(boxed)["params"],
                                                             mesh, config)
      self.base = init_from.place(init_from.fit(self.source.params, abstract, self.source.path),
                                  self.base_shardings)
      self._source = None  # the base weights live in self.base
      self._merge = jax.jit(functools.partial(_merge, spec=self.lora), out_shardings=self.base_shardings)

  @classmethod
  def create(cls, config, model, mesh, tokenizer, tokenizer_sha256: str) -> "Finetune | None":
    """None for an ordinary run (no init_from, no SFT file); else the run's extras, checked."""
    validate(config)
    if config.get("init_from"):  # config.json must name the source from anywhere (resume, export)
      with config.unlocked():
        config.init_from = os.path.abspath(os.path.expanduser(config.init_from))
    f = config.get("finetune")
    if not config.get("init_from") and not (f is not None and f.sft.train_file):
      return None
    return cls(config, model, mesh, tokenizer, tokenizer_sha256)

  @property
  def source(self) -> init_from.Source:
    """The init_from source, read on first use (a resumed full fine-tune never reads it)."""
    if self._source is None:
      step = int(self.config.finetune.init_step)
      self._source = init_from.load_source(self.config.init_from, None if step < 0 else step,
                                           mesh=self.mesh)
      init_from.check_model(self.config, self._source, self.tokenizer.vocab_size)
    return self._source

  # ---------------------------------------------------------------- state

  def state_shardings(self, optimizer):
    """(abstract state, shardings) of the adapters for LoRA; None otherwise (the loop's own)."""
    if self.lora is None:
      return None
    return lora.state_shardings(self.base, optimizer, self.mesh, self.config)

  def init_state(self, optimizer, seed: int, create_state_fn):
    """The first state: fresh adapters (LoRA), or `create_state_fn()` with the source's weights."""
    if self.lora is not None:
      state, _ = lora.create_state(self.base, optimizer, self.mesh, self.config, seed)
      return state
    state, shardings = create_state_fn()
    if not self.config.get("init_from"):
      return state
    state = init_from.into_state(state, shardings, self.source)
    counts = freeze.summary(state.params, self.config)
    log.info("init_from %s (step %s): %s trainable, %s frozen parameters", self.source.path,
             self.source.step, f"{counts['trainable']:,}", f"{counts['frozen']:,}")
    self._source = None  # the weights now live in the state
    return state

  # ---------------------------------------------------------------- steps

  def step_fn(self, model, optimizer, state_shardings, batch_shardings, out_sharding):
    """The jitted train step for LoRA (base weights passed in, not baked into the program), else None."""
    if self.lora is None:
      return None
    jitted = jax.jit(functools.partial(lora.train_step, model=model, optimizer=optimizer,
                                       config=self.config),
                     in_shardings=(state_shardings, batch_shardings, self.base_shardings),
                     out_shardings=(state_shardings, out_sharding), donate_argnums=0)
    return lambda state, batch: jitted(state, batch, self.base)

  def model_params(self, params):
    """The parameters to run the model with: merged base + adapters for LoRA, else `params`."""
    return params if self.lora is None else self._merge(params, self.base)

  # ---------------------------------------------------------------- SFT

  @property
  def sft_file(self) -> str:
    return self.config.finetune.sft.train_file

  def make_loader(self, process_index: int = 0, process_count: int = 1):
    """An SFTLoader over finetune.sft.train_file, else None (use the data pipeline)."""
    if not self.sft_file:
      return None
    c = self.config
    rows = sft.load(self.sft_file, self.tokenizer, c.train.seq_len, sft.templates_from_config(c))
    return sft.SFTLoader(rows, c.train.global_batch_size, c.data.seed, process_index, process_count)

  def sft_eval_batches(self, process_index: int = 0, process_count: int = 1) -> list:
    """Packed batches of finetune.sft.val_file (empty when unset)."""
    c = self.config
    if not c.finetune.sft.val_file:
      return []
    rows = sft.load(c.finetune.sft.val_file, self.tokenizer, c.train.seq_len,
                    sft.templates_from_config(c))
    return list(sft.eval_batches(rows, c.train.global_batch_size, c.train.eval_batches or None,
                                 process_index, process_count))


def _merge(adapters, base, *, spec):
  return lora.merge(base, adapters, spec)

"""Encoders as the trainer's extension: masked-LM pretraining and classification fine-tuning.

    extension = extension_for(config)   # EncoderExtension when model.causal=False, else fine-tuning's
    llm_jax.train.loop.train(config, workdir, extension=extension)

`python -m llm_jax.train` picks it from the config. encoder.task=mlm trains on the prepared data with
masked batches (llm_jax.encoder.masking); encoder.task=classify trains a pooled head (Classifier) on
encoder.train_file, usually from init_from=an MLM run. Both reuse fine-tuning's init_from and freezing.
"""

from __future__ import annotations

import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import config as config_lib
from llm_jax import sharding as sharding_lib
from llm_jax.encoder import labelled, masking
from llm_jax.encoder.classifier import POOLINGS, Classifier
from llm_jax.finetune import extension as finetune_ext
from llm_jax.finetune import init_from, lora, sft
from llm_jax.train import hooks as hooks_lib
from llm_jax.train.extension import TrainExtension

log = logging.getLogger(__name__)
TASKS = ("mlm", "classify")
HEAD = "cls_head"


def validate(config) -> None:
  """Checks of config.encoder against the rest of the config; each failure names the keys."""
  e = config.get("encoder")
  if e is None:
    raise config_lib.ConfigError("model.causal=False needs the config's encoder section (configs/base.py)")
  if e.task not in TASKS:
    raise config_lib.ConfigError(f"encoder.task={e.task!r} is not one of {', '.join(TASKS)}")
  if e.pooling not in POOLINGS:
    raise config_lib.ConfigError(f"encoder.pooling={e.pooling!r} is not one of {', '.join(POOLINGS)}")
  for key in ("mask_rate", "mask_token_rate", "random_token_rate"):
    if not 0.0 <= float(e[key]) <= 1.0:
      raise config_lib.ConfigError(f"encoder.{key}={e[key]!r} must be in [0, 1]")
  if e.mask_token_rate + e.random_token_rate > 1.0:
    raise config_lib.ConfigError(
      f"encoder.mask_token_rate + encoder.random_token_rate = "
      f"{e.mask_token_rate + e.random_token_rate} must be <= 1"
    )
  if e.task == "mlm" and not e.mask_rate > 0:
    raise config_lib.ConfigError("encoder.mask_rate must be > 0 for encoder.task=mlm")
  if config.train.sample_every > 0:
    raise config_lib.ConfigError(
      f"train.sample_every={config.train.sample_every}: an encoder does not "
      "generate text; set train.sample_every=0"
    )
  if lora.spec_from_config(config) is not None:
    raise config_lib.ConfigError("finetune.lora.rank > 0 is not supported for encoders (model.causal=False)")
  f = config.get("finetune")
  if f is not None and (f.sft.train_file or f.sft.val_file):
    raise config_lib.ConfigError(
      "finetune.sft.* trains a decoder; an encoder classifies with "
      "encoder.task=classify and encoder.train_file"
    )
  if e.task == "classify":
    if not e.train_file:
      raise config_lib.ConfigError("encoder.task=classify needs encoder.train_file (JSONL of text, label)")
    for key in ("train_file", "val_file"):
      if e[key] and not os.path.exists(e[key]):
        raise config_lib.ConfigError(f"encoder.{key}={e[key]!r} does not exist")


def labels(config) -> list[str]:
  """encoder.labels as a list (resolve_config fills it from the training file)."""
  return [s for s in config.encoder.labels.split(",") if s]


class EncoderExtension(finetune_ext.FinetuneExtension):
  """The trainer's hooks for model.causal=False: masked batches, or a classifier and its data."""

  name = "encoder"

  def __init__(self):
    super().__init__()
    self.spec: masking.MaskSpec | None = None
    self._val: list | None = None

  def validate(self, config) -> None:
    finetune_ext.validate(config)
    validate(config)

  def resolve_config(self, config) -> None:
    super().resolve_config(config)
    self.config = config  # the resolved config (make_model, before attach, needs encoder.*)
    e = config.encoder
    if e.task != "classify":
      return
    for key in ("train_file", "val_file"):
      if e[key]:
        e[key] = os.path.abspath(os.path.expanduser(e[key]))
    if not e.labels:
      e.labels = ",".join(labelled.labels_of(e.train_file))
    if len(labels(config)) < 2:
      raise config_lib.ConfigError(f"encoder.labels={e.labels!r}: classification needs at least 2 labels")

  @property
  def classify(self) -> bool:
    return self.config.encoder.task == "classify"

  def make_model(self, model_cfg):
    if not self.classify:
      return super().make_model(model_cfg)
    return Classifier(model_cfg, num_labels=len(labels(self.config)), pooling=self.config.encoder.pooling)

  def attach(self, setup) -> None:
    super().attach(setup)
    try:
      self.spec = masking.MaskSpec.from_config(setup.config, setup.tokenizer)
    except masking.DataError as e:
      raise config_lib.ConfigError(str(e)) from e

  def init_state(self, setup, seed: int):
    """A classifier from init_from: the source's encoder weights and a fresh head."""
    if not (self.classify and setup.config.get("init_from")):
      return super().init_state(setup, seed)
    state = TrainExtension.init_state(self, setup, seed)
    source = self._source()
    log.info("init_from %s (step %s); new head %s", source.path, source.step, HEAD)
    body = {k: v for k, v in state.params.items() if k != HEAD}
    init_from.fit(source.params, body, source.path)
    body_shardings = {k: v for k, v in setup.state_shardings.params.items() if k != HEAD}
    placed = init_from.place(source.params, body_shardings)
    return state.replace(params={**placed, HEAD: state.params[HEAD]})

  def _rows(self, setup, path: str) -> dict:
    return labelled.rows(path, setup.tokenizer, setup.config.train.seq_len, labels(setup.config))

  def make_loader(self, setup, process_index: int, process_count: int):
    c = setup.config
    if self.classify:
      return sft.SFTLoader(
        self._rows(setup, c.encoder.train_file),
        c.train.global_batch_size,
        c.data.seed,
        process_index,
        process_count,
      )
    return masking.MaskedLoader(super().make_loader(setup, process_index, process_count), self.spec)

  def eval_batches(self, setup, process_index: int, process_count: int) -> list:
    """Masked val-split batches (mlm), or encoder.val_file's rows (classify; none without it)."""
    c = setup.config
    if self.classify:
      self._val = (
        []
        if not c.encoder.val_file
        else list(
          sft.eval_batches(
            self._rows(setup, c.encoder.val_file),
            c.train.global_batch_size,
            None,
            process_index,
            process_count,
          )
        )
      )
    else:
      first_row = process_index * (c.train.global_batch_size // process_count)
      self._val = masking.masked_eval_batches(
        super().eval_batches(setup, process_index, process_count), self.spec, first_row
      )
    return self._val

  def runs_preflight(self) -> bool:
    return False  # its batch checks are a decoder's (targets = inputs shifted by one)

  def hooks(self, setup) -> list:
    every = setup.config.train.eval_every
    if every <= 0:
      return []
    if self._val is None:
      self.eval_batches(setup, *setup.process_slice())
    if not self._val:
      return []
    if self.classify:
      return [ClassifyEvalHook(setup, every, self._val, labels(setup.config))]
    return [MaskedAccuracyHook(setup, every, self._val)]


def _predictions(params, batch, *, model):
  logits_B1C = model.apply(
    {"params": params}, batch["inputs"], batch.get("positions"), batch.get("segment_ids")
  )
  return jnp.argmax(logits_B1C[:, 0], axis=-1)


def _masked_correct(params, batch, *, model):
  logits_BLV = model.apply(
    {"params": params}, batch["inputs"], batch.get("positions"), batch.get("segment_ids")
  )
  hit_BL = (jnp.argmax(logits_BLV, axis=-1) == batch["targets"]).astype(jnp.float32)
  return {"correct": jnp.sum(hit_BL * batch["weights"]), "tokens": jnp.sum(batch["weights"])}


class MaskedAccuracyHook(hooks_lib.Hook):
  """val_mlm_accuracy: the share of chosen held-out tokens whose top prediction is the original."""

  def __init__(self, setup, every: int, batches: list):
    self.setup, self.every, self.batches = setup, int(every), batches
    self.fn = jax.jit(
      functools.partial(_masked_correct, model=setup.model), out_shardings=sharding_lib.replicated(setup.mesh)
    )

  def __call__(self, ctx: hooks_lib.StepContext) -> None:
    s = self.setup
    params = s.extension.model_params(ctx.state.params)
    outs = jax.device_get([self.fn(params, sharding_lib.global_batch(b, s.mesh)) for b in self.batches])
    tokens = sum(float(o["tokens"]) for o in outs)
    if tokens > 0:
      ctx.row["val_mlm_accuracy"] = sum(float(o["correct"]) for o in outs) / tokens


class ClassifyEvalHook(hooks_lib.Hook):
  """val_accuracy and val_macro_f1 on encoder.val_file; at the end WORKDIR/eval/classify-STEP/ gets
  results.json and report.md (confusion matrix, majority-class baseline)."""

  def __init__(self, setup, every: int, batches: list, names: list[str]):
    self.setup, self.every, self.batches, self.names = setup, int(every), batches, names
    self.fn = jax.jit(
      functools.partial(_predictions, model=setup.model), out_shardings=sharding_lib.replicated(setup.mesh)
    )

  def __call__(self, ctx: hooks_lib.StepContext) -> None:
    s = self.setup
    params = s.extension.model_params(ctx.state.params)
    preds = jax.device_get([self.fn(params, sharding_lib.global_batch(b, s.mesh)) for b in self.batches])
    true, pred = [], []
    index, count = s.process_slice()
    del index
    for b, p in zip(self.batches, preds, strict=True):
      keep = np.asarray(b["weights"])[:, 0] > 0
      if count == 1:  # one process: its rows are the global batch
        true.append(np.asarray(b["targets"])[keep, 0])
        pred.append(np.asarray(p)[keep])
    if not true:
      return
    m = labelled.metrics(np.concatenate(true), np.concatenate(pred), self.names)
    ctx.row.update(val_accuracy=m["accuracy"], val_macro_f1=m["macro_f1"])
    log.info(
      "step %d: val accuracy %.4f, macro-F1 %.4f (majority baseline %.4f)",
      ctx.step,
      m["accuracy"],
      m["macro_f1"],
      m["majority_baseline"],
    )
    if ctx.at_end and jax.process_index() == 0:
      out = os.path.join(ctx.run.workdir, "eval", f"classify-{ctx.step}")
      os.makedirs(out, exist_ok=True)
      with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"step": ctx.step, "val_file": s.config.encoder.val_file, **m}, f, indent=2)
      with open(os.path.join(out, "report.md"), "w") as f:
        f.write(labelled.report_md(m, f"Classification at step {ctx.step}: {s.config.encoder.val_file}"))
      log.info("wrote %s/report.md", out)


def extension_for(config) -> TrainExtension | None:
  """EncoderExtension for model.causal=False; otherwise fine-tuning's choice (None: plain pretraining)."""
  if not config.model.get("causal", True):
    return EncoderExtension()
  return finetune_ext.extension_for(config)

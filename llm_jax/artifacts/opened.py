"""One way to open a trained model: `open_model(path)` for a run directory, a model package or a
Hugging Face checkpoint directory.

    opened = open_model("runs/tiny")                      # latest readable checkpoint, float32
    opened = open_model("runs/tiny", step="best", dtype="auto", mesh=mesh)
    opened = open_model("packages/tiny")                  # an exported package
    opened = open_model("hf/Llama-3.2-1B")                # config.json + model.safetensors (+ tokenizer)

eval, generate, serve, export, quantize and fine-tuning's init_from all call it; nothing else reads
checkpoints or packages. A LoRA run opens as full parameters: its adapters merged into the model its
config.init_from names (opened the same way).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp

from llm_jax import sharding as sharding_lib
from llm_jax.artifacts import hf as hf_lib
from llm_jax.artifacts import package as package_lib
from llm_jax.artifacts import run as run_lib
from llm_jax.artifacts.errors import ArtifactError
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.model import Decoder, ModelConfig
from llm_jax.model import lora as lora_lib
from llm_jax.model import quantize as quantize_lib
from llm_jax.model.params import abstract_params, cast_params, count

DTYPES = ("float32", "bfloat16")
# A RoPE model's max_seq_len only sizes buffers (the KV cache); checkpoints declare their longest context
# (LLaMA 3.1: 131072), so an opened Hugging Face RoPE model is capped here unless open_model is told.
HF_MAX_SEQ_LEN = 8192


@dataclasses.dataclass
class OpenedModel:
  """Parameters, the ModelConfig to build `Decoder` with, the tokenizer, and where they came from.

  `meta` is model.json for a package; for a run or a Hugging Face directory, the same keys (name,
  build_id, provenance, parameter_count, precision, prompt_prefix) made from run.json / config.json.
  `config` is the run's config (None otherwise). `tokenizer` is llm_jax's Tokenizer or one of
  llm_jax.data.hf_tokenizer's (same interface).
  """

  params: Any
  model_config: ModelConfig
  tokenizer: Tokenizer
  meta: dict
  path: str
  kind: str  # "run" | "package" | "hf"
  step: int
  tokenizer_path: str
  config: Any = None
  mesh: Any = None
  manifest: dict | None = None

  @property
  def provenance(self) -> dict:
    return self.meta.get("provenance", {})

  @property
  def build_id(self) -> str:
    return self.meta.get("build_id", "")

  @property
  def tokenizer_sha256(self) -> str:
    return self.provenance.get("tokenizer_sha256", "") or self.tokenizer.sha256

  @property
  def manifest_sha256(self) -> str:
    return self.provenance.get("manifest_sha256", "")

  @property
  def prompt_prefix(self) -> list[int]:
    """Ids put before a text prompt: what training examples began with (the document separator EOS;
    BOS for an SFT run; an imported model's own, e.g. its BOS)."""
    return [int(i) for i in self.meta.get("prompt_prefix", [self.tokenizer.eos_id])]

  @property
  def stop_ids(self) -> list[int]:
    """End-of-text ids besides the tokenizer's EOS that end a generation: model.json's `stop_ids`, or
    a Hugging Face checkpoint's other eos_token_ids (LLaMA-3 instruct's <|eot_id|>)."""
    ids = self.meta.get("stop_ids", self.provenance.get("eos_token_ids", []))
    eos, vocab = self.tokenizer.eos_id, self.tokenizer.vocab_size
    return [int(i) for i in ids if int(i) != eos and 0 <= int(i) < vocab]

  @property
  def chat_template(self) -> dict | None:
    """The SFT templates {"prompt", "turn"} the model was fine-tuned with, or None (not an SFT model)."""
    return self.meta.get("chat_template")

  @property
  def name(self) -> str:
    return self.meta.get("name") or os.path.basename(os.path.normpath(self.path)) or "model"

  def model(self) -> Decoder:
    """The Decoder these parameters belong to."""
    return Decoder(self.model_config)

  def describe(self) -> str:
    c = self.model_config
    return (
      f"{self.name}: {self.meta.get('parameter_count', 0):,} params, {c.num_layers} layers, "
      f"d_model {c.d_model}, weights {self.meta.get('precision', {}).get('weights', '?')}, "
      f"compute {c.dtype}, step {self.step}, build {self.build_id}"
    )


def kind_of(path: str) -> str:
  """'package' (model.json), 'hf' (config.json with a model_type + safetensors) or 'run' (config.json /
  checkpoints/); anything else raises."""
  if not os.path.isdir(path):
    raise ArtifactError(
      f"{path!r} is not a directory; give a training run directory, an exported "
      "model package or a Hugging Face checkpoint directory"
    )
  if os.path.exists(os.path.join(path, package_lib.MODEL_JSON)):
    return "package"
  if hf_lib.is_hf_dir(path):
    return "hf"
  if run_lib.is_run_dir(path):
    return "run"
  raise ArtifactError(
    f"{path!r} is neither a training run directory (config.json, checkpoints/), "
    f"a model package ({package_lib.MODEL_JSON}) nor a Hugging Face checkpoint "
    f"({hf_lib.CONFIG} + {hf_lib.WEIGHTS})"
  )


def inference_config(cfg: ModelConfig, dtype: str = "auto", platform: str | None = None) -> ModelConfig:
  """`cfg` set up for inference: compute dtype ('auto': float32 on CPU, bfloat16 on accelerators),
  attention kernel for the platform, no remat, no dropout, float32 logits.

  Training may write the head's output in bfloat16 (model.logits_dtype='auto'), which the loss
  upcasts; decoding draws from the logits, and bfloat16 ones (8 bits of mantissa) tie often enough
  that greedy tokens and log-probabilities would hang on rounding. The float32 output costs one
  [rows, vocab] write a step."""
  platform = platform or jax.default_backend()
  if dtype == "auto":
    dtype = "float32" if platform == "cpu" else "bfloat16"
  if dtype not in DTYPES:
    raise ArtifactError(f"compute dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
  attention = "cudnn" if (platform == "gpu" and dtype == "bfloat16") else "xla"
  return dataclasses.replace(
    cfg,
    dtype=dtype,
    attention=attention,
    remat="none",
    dropout=0.0,
    attention_dropout=0.0,
    logits_dtype="float32",
  )


def open_model(
  path: str,
  step: int | str | None = None,
  mesh=None,
  dtype: str | None = None,
  *,
  keep_int8: bool = False,
  verify: bool = True,
  weights: bool = True,
  max_seq_len: int | None = None,
) -> OpenedModel:
  """Opens a run directory (latest readable, given or 'best' checkpoint), a package or a Hugging Face
  checkpoint directory (float32 weights; a RoPE model's max_seq_len capped at `max_seq_len`, default
  HF_MAX_SEQ_LEN).

  Parameters come back float32 with the ModelConfig as trained when `dtype` is None, or cast to `dtype`
  ('auto', 'float32', 'bfloat16') with the ModelConfig set up for inference. With a `mesh` they are
  sharded by the run's logical-axis rules (a package's by the default rules); without one they sit on
  the default device. `keep_int8` keeps an int8 package's weights int8 (QTensor leaves).
  `weights=False` reads only the description (params None): architecture, tokenizer, step.
  """
  path = os.path.abspath(os.path.expanduser(str(path)))
  kind = kind_of(path)
  if kind == "hf":
    opened = _open_hf(path, step, weights, max_seq_len or HF_MAX_SEQ_LEN)
    if not weights:
      return opened
  elif not weights:
    return _describe(path, kind, step)
  else:
    opened = (
      _open_package(path, step, keep_int8, verify) if kind == "package" else _open_run(path, step, mesh)
    )
  if dtype is not None:
    opened.model_config = inference_config(opened.model_config, dtype)
    opened.params = cast_params(opened.params, opened.model_config.dtype)
  if mesh is not None:
    opened.params = _place(opened.params, opened.model_config, mesh, opened.config)
    opened.mesh = mesh
  return opened


def _place(params, cfg: ModelConfig, mesh, config):
  """Parameters sharded on `mesh` by the run's rules (or the default ones); QTensors replicated."""
  if quantize_lib.has_qtensors(params):
    return jax.device_put(params, sharding_lib.replicated(mesh))
  from_specs = _sharding_fn(mesh, config)
  shardings = from_specs(_logical_specs(cfg))
  return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)


def _logical_specs(cfg: ModelConfig):
  return abstract_params(cfg)[1]


def _sharding_fn(mesh, config):
  return lambda specs: sharding_lib.logical_to_sharding(specs, mesh, config)


def _capped(cfg: ModelConfig, cap: int, path: str) -> tuple[ModelConfig, int | None]:
  """(cfg, None), or for a RoPE model declaring a longer context than `cap`: (cfg at `cap`, what it
  declared: provenance max_position_embeddings, which exports write back; the KV cache is sized by
  max_seq_len, the weights are not)."""
  if cfg.positions != "rope" or cfg.max_seq_len <= cap:
    return cfg, None
  logging.info(
    "%s declares a context of %d; using max_seq_len %d (open_model's max_seq_len= sets another)",
    path,
    cfg.max_seq_len,
    cap,
  )
  return dataclasses.replace(cfg, max_seq_len=int(cap)), cfg.max_seq_len


def _open_package(path: str, step, keep_int8: bool, verify: bool) -> OpenedModel:
  params, cfg, tokenizer, meta = package_lib.read_package(path, keep_int8=keep_int8, verify=verify)
  pstep = int(meta.get("provenance", {}).get("training_step") or 0)
  if step is not None and step != pstep:
    raise ArtifactError(
      f"package {path} holds step {pstep}; step={step!r} cannot be chosen for a "
      "package (export that checkpoint instead)"
    )
  return OpenedModel(params, cfg, tokenizer, meta, path, "package", pstep, tokenizer.path)


def _open_hf(path: str, step, weights: bool, max_seq_len: int) -> OpenedModel:
  """A Hugging Face checkpoint directory: float32 parameters on the default device (None unless
  `weights`), its tokenizer, and a description in model.json's keys."""
  if step not in (None, 0, "0"):
    raise ArtifactError(
      f"{path} is a Hugging Face checkpoint with one set of weights; step={step!r} cannot be chosen for it"
    )
  try:
    if weights:
      params, cfg, tokenizer, prov = hf_lib.read_hf(path)
    else:
      cfg, tokenizer, prov = hf_lib.describe_hf(path)
      params = None
  except (hf_lib.HFError, ValueError) as e:
    raise ArtifactError(str(e)) from e
  cfg, declared = _capped(cfg, max_seq_len, path)
  if declared:
    prov["max_position_embeddings"] = declared
  if params is not None:
    params = jax.device_put(params, _default_device())
  prov.update(training_step=0, tokenizer_sha256=tokenizer.sha256)
  meta = {
    "name": os.path.basename(os.path.normpath(path)),
    "build_id": f"hf-{prov['config_sha256'][:12]}",
    "provenance": prov,
    "parameter_count": count(params) if params is not None else cfg.param_count(),
    "precision": {"weights": prov.get("stored_dtype") or "float32"},
    "prompt_prefix": prov["prompt_prefix"],
    "special_ids": {n: int(getattr(tokenizer, f"{n}_id")) for n in ("pad", "bos", "eos", "unk")},
  }
  return OpenedModel(params, cfg, tokenizer, meta, path, "hf", 0, tokenizer.path)


def _open_run(workdir: str, step, mesh) -> OpenedModel:
  config = run_lib.load_config(workdir)
  run_lib.require_checkpoints(workdir)
  tokenizer, tok_path = run_lib.load_tokenizer(workdir)
  run_lib.check_tokenizer(workdir, tokenizer)
  cfg = ModelConfig.from_config(config, tokenizer_size=tokenizer.vocab_size)
  spec = lora_lib.spec_from_config(config)
  if spec is None:
    shard = (
      _sharding_fn(mesh, config)
      if mesh is not None
      else lambda specs: jax.tree.map(
        lambda _: _default_device(), specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
      )
    )
    params, step = run_lib.read_params(workdir, config, step, run_lib.param_target(cfg, shard))
  else:
    params, step = _merged_lora(workdir, config, step, spec)
  prov = run_lib.provenance(workdir)
  prov.update(training_step=int(step), tokenizer_sha256=tokenizer.sha256, source=workdir)
  meta = {
    "name": os.path.basename(os.path.normpath(workdir)),
    "build_id": f"workdir-step{step}",
    "provenance": prov,
    "parameter_count": count(params),
    "precision": {"weights": "float32"},
    **_run_meta(workdir, config, tokenizer),
  }
  return OpenedModel(
    params,
    cfg,
    tokenizer,
    meta,
    workdir,
    "run",
    int(step),
    tok_path,
    config=config,
    manifest=run_lib.manifest(workdir),
  )


def _run_meta(workdir: str, config, tokenizer) -> dict:
  """What a run directory says of its model besides the weights: run.json, the prompt prefix (what
  its training examples began with: SFT examples BOS, pretraining documents the EOS before them),
  the SFT chat template, and the stop ids a fine-tune keeps from its source (run.json stop_ids)."""
  record = run_lib.record(workdir)
  template = _chat_template(config)
  meta = {"run": record, "prompt_prefix": [tokenizer.bos_id if template else tokenizer.eos_id]}
  if template:
    meta["chat_template"] = template
  stop_ids = record.get("stop_ids")
  if isinstance(stop_ids, list):
    meta["stop_ids"] = [i for i in stop_ids if isinstance(i, int) and not isinstance(i, bool)]
  return meta


def _chat_template(config) -> dict | None:
  """config.finetune.sft's templates when the run trained on SFT data (sft.train_file), else None."""
  sft = (config.get("finetune") or {}).get("sft") if hasattr(config, "get") else None
  if sft is None or not sft.get("train_file"):
    return None
  return {"prompt": sft.get("prompt_template"), "turn": sft.get("turn_template")}


def _describe(path: str, kind: str, step) -> OpenedModel:
  """The model without its weights (cheap: model.json or config.json and the checkpoint listing)."""
  if kind == "package":
    meta = package_lib.read_model_json(path)
    cfg = package_lib.model_config_from(meta["architecture"], os.path.join(path, package_lib.MODEL_JSON))
    if not os.path.exists(os.path.join(path, package_lib.WEIGHTS)):
      raise ArtifactError(f"{path!r} has no weights: {package_lib.WEIGHTS} is missing")
    tokenizer = package_lib.read_tokenizer(path, meta)
    pstep = int(meta.get("provenance", {}).get("training_step") or 0)
    return OpenedModel(None, cfg, tokenizer, meta, path, "package", pstep, tokenizer.path)
  config = run_lib.load_config(path)
  tokenizer, tok_path = run_lib.load_tokenizer(path)
  resolved = run_lib.resolve_step(path, step)
  cfg = ModelConfig.from_config(config, tokenizer_size=tokenizer.vocab_size)
  return OpenedModel(
    None,
    cfg,
    tokenizer,
    {"provenance": run_lib.provenance(path), **_run_meta(path, config, tokenizer)},
    path,
    "run",
    resolved,
    tok_path,
    config=config,
    manifest=run_lib.manifest(path),
  )


def _default_device():
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _merged_lora(workdir: str, config, step, spec):
  """A LoRA run's adapters (its checkpoints hold only them) merged into the base it names."""
  if not config.get("init_from"):
    raise ArtifactError(f"{workdir}/config.json: init_from is empty; a LoRA run needs its base model")
  adapters, step = run_lib.read_params(workdir, config, step, run_lib.saved_target(_default_device()))
  init_step = int(config.finetune.get("init_step", -1))
  base = open_model(config.init_from, step=None if init_step < 0 else init_step)
  merged = lora_lib.merge(base.params, adapters, spec)
  return jax.tree.map(lambda x: x.astype(jnp.float32), merged), step

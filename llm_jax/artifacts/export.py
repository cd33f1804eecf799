"""Writing packages or Hugging Face checkpoint directories from what open_model opens (a run, a LoRA run
merged, a package, a Hugging Face directory), or packages of random weights."""

from __future__ import annotations

import dataclasses

from llm_jax import config as config_lib
from llm_jax.artifacts import hf as hf_lib
from llm_jax.artifacts import hf_write, outdir
from llm_jax.artifacts import package as package_lib
from llm_jax.artifacts.errors import ArtifactError
from llm_jax.artifacts.opened import open_model
from llm_jax.data import hf_tokenizer
from llm_jax.model import ModelConfig
from llm_jax.model import lora as lora_lib
from llm_jax.model.params import init_params

FORMATS = ("package", "hf")


def export(
  path: str,
  out: str,
  *,
  step: int | str | None = None,
  quantize: str = "none",
  weights_dtype: str = "float32",
  overwrite: bool = False,
  name: str = "",
  format: str = "package",
) -> dict:
  """Writes the package (or, format='hf', the Hugging Face directory) of a run's checkpoint (latest
  unless `step`), a package or a Hugging Face directory; returns model.json (for 'hf': a summary with
  the same keys)."""
  if format not in FORMATS:
    raise ArtifactError(f"format={format!r} is not one of {', '.join(FORMATS)}")
  opened = open_model(path, step)
  outdir.check_not_source(out, opened.path, error=ArtifactError)
  if format == "hf":
    return _export_hf(opened, out, quantize, weights_dtype, overwrite)
  prov = opened.provenance
  source = opened.path
  if opened.config is not None and lora_lib.spec_from_config(opened.config) is not None:
    source += f" (LoRA adapters merged into {opened.config.init_from})"
  if opened.kind == "hf":
    source += f" (Hugging Face {prov.get('architecture', '')})"
  return package_lib.write_package(
    out,
    opened.params,
    opened.model_config,
    opened.tokenizer_path,
    step=opened.step,
    git_commit=prov.get("git_commit", ""),
    manifest_sha256=prov.get("manifest_sha256", ""),
    tokenizer_sha256=opened.tokenizer.sha256,
    quantize=quantize,
    weights_dtype=weights_dtype,
    name=name,
    source=source,
    overwrite=overwrite,
    tokenizer=opened.tokenizer,
    prompt_prefix=opened.prompt_prefix,
    chat_template=opened.chat_template,
    stop_ids=opened.stop_ids,
    declared_context=prov.get("max_position_embeddings"),
  )


def _export_hf(opened, out: str, quantize: str, weights_dtype: str, overwrite: bool) -> dict:
  """config.json, model.safetensors and tokenizer files that transformers loads; a summary dict."""
  if quantize != "none":
    raise ArtifactError(
      f"quantize={quantize!r}: the Hugging Face export writes float weights only "
      "(an int8 package is dequantized)"
    )
  cfg = opened.model_config
  declared = opened.provenance.get("max_position_embeddings")
  if declared and cfg.positions == "rope":  # what the source declared (opening or fine-tuning cut it)
    cfg = dataclasses.replace(cfg, max_seq_len=max(int(declared), cfg.max_seq_len))
  try:
    names = hf_write.write_hf(
      out,
      opened.params,
      cfg,
      opened.tokenizer,
      weights_dtype=weights_dtype,
      overwrite=overwrite,
      stop_ids=opened.stop_ids,
      chat_turn=(opened.chat_template or {}).get("turn"),
    )
  except hf_lib.HFError as e:
    raise ArtifactError(str(e)) from e
  return {
    "format": "hf",
    "files": names,
    "build_id": opened.build_id,
    "parameter_count": int(opened.meta.get("parameter_count") or cfg.param_count()),
    "precision": {"weights": weights_dtype},
    "provenance": {"training_step": opened.step},
  }


def export_random(
  config_path: str,
  tokenizer_path: str,
  out: str,
  *,
  seed: int = 0,
  quantize: str = "none",
  weights_dtype: str = "float32",
  overwrite: bool = False,
  overrides=(),
) -> dict:
  """A package of randomly initialized weights for a config (benchmarks: shapes matter, not skill)."""
  config = config_lib.load(config_path, overrides)
  tokenizer = hf_tokenizer.load_tokenizer(tokenizer_path)
  cfg = ModelConfig.from_config(config, tokenizer_size=tokenizer.vocab_size)
  return package_lib.write_package(
    out,
    init_params(cfg, seed),
    cfg,
    tokenizer_path,
    step=0,
    quantize=quantize,
    weights_dtype=weights_dtype,
    overwrite=overwrite,
    source=f"random init of {config_path}",
    tokenizer=tokenizer,
  )

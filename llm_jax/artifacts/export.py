"""Writing packages from what open_model opens (a run, a LoRA run merged, a package) or random weights."""
from __future__ import annotations

from llm_jax import config as config_lib
from llm_jax.artifacts import package as package_lib
from llm_jax.artifacts.opened import open_model
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.model import ModelConfig
from llm_jax.model import lora as lora_lib
from llm_jax.model.params import init_params


def export(path: str, out: str, *, step: int | str | None = None, quantize: str = "none",
           weights_dtype: str = "float32", overwrite: bool = False, name: str = "") -> dict:
  """Writes the package of a run's checkpoint (latest unless `step`); returns its model.json."""
  opened = open_model(path, step)
  prov = opened.provenance
  source = opened.path
  if opened.config is not None and lora_lib.spec_from_config(opened.config) is not None:
    source += f" (LoRA adapters merged into {opened.config.init_from})"
  return package_lib.write_package(
      out, opened.params, opened.model_config, opened.tokenizer_path, step=opened.step,
      git_commit=prov.get("git_commit", ""), manifest_sha256=prov.get("manifest_sha256", ""),
      tokenizer_sha256=opened.tokenizer.sha256, quantize=quantize, weights_dtype=weights_dtype,
      name=name, source=source, chat_template=opened.chat_template, overwrite=overwrite)


def export_random(config_path: str, tokenizer_path: str, out: str, *, seed: int = 0,
                  quantize: str = "none", weights_dtype: str = "float32", overwrite: bool = False,
                  overrides=()) -> dict:
  """A package of randomly initialized weights for a config (benchmarks: shapes matter, not skill)."""
  config = config_lib.load(config_path, overrides)
  tokenizer = Tokenizer.load(tokenizer_path)
  cfg = ModelConfig.from_config(config, tokenizer_size=tokenizer.vocab_size)
  return package_lib.write_package(
      out, init_params(cfg, seed), cfg, tokenizer_path, step=0, quantize=quantize,
      weights_dtype=weights_dtype, overwrite=overwrite, source=f"random init of {config_path}")

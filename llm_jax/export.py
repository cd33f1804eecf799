"""Exports a trained model as a package (format: llm_jax/artifacts/package.py) or, with --format=hf, as
a Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer files; docs/interop.md).

    python -m llm_jax.export --workdir=runs/tiny --out=packages/tiny [--step=N|best] [--quantize=int8]
    python -m llm_jax.export --format=hf --workdir=runs/tiny --out=hf/tiny    # transformers loads it
    python -m llm_jax.export --workdir=hf/Llama-3.2-1B --out=packages/llama   # Hugging Face -> package
    python -m llm_jax.export --random_init=configs/gpt_small.py --tokenizer=tok.model --out=pkg \\
        [--config_override=model.vocab_size=50304]      # random weights: benchmarks only

--workdir takes anything llm_jax.artifacts.open_model opens (a run directory, a LoRA run: adapters
merged into its base, another package, or a Hugging Face checkpoint directory).
"""

from __future__ import annotations

import logging
import os

from absl import flags

from llm_jax import cli
from llm_jax.artifacts.export import export, export_random

_WORKDIR = flags.DEFINE_string(
  "workdir", None, "training run directory, package or Hugging Face checkpoint directory to export"
)
_FORMAT = flags.DEFINE_enum(
  "format",
  "package",
  ["package", "hf"],
  "what to write: an llm_jax package or a Hugging Face checkpoint directory",
)
_RANDOM_INIT = flags.DEFINE_string(
  "random_init", None, "a config file: package random weights of its model (for benchmarks)"
)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "with --random_init: the tokenizer .model file")
_OVERRIDES = flags.DEFINE_multi_string(
  "config_override", [], "with --random_init: key=value overrides of the config (repeatable)"
)
_SEED = flags.DEFINE_integer("seed", 0, "with --random_init: init seed")
_OUT = flags.DEFINE_string("out", None, "package (or, with --format=hf, checkpoint) directory to write")
_STEP = flags.DEFINE_string("step", None, "checkpoint step, or 'best' (default: the latest)")
_QUANTIZE = flags.DEFINE_enum("quantize", "none", ["none", "int8"], "weight quantization")
_WEIGHTS_DTYPE = flags.DEFINE_enum(
  "weights_dtype", "float32", ["float32", "bfloat16"], "dtype of unquantized float tensors"
)
_NAME = flags.DEFINE_string("name", "", "model name (default: the --out folder name)")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing --out")


def main(argv) -> int:
  """Exports a run directory (or random weights) as a package and prints one summary line."""
  del argv
  logging.getLogger().setLevel(logging.INFO)
  if bool(_WORKDIR.value) == bool(_RANDOM_INIT.value):
    raise cli.UsageError("give exactly one of --workdir=RUN and --random_init=CONFIG")
  if not _OUT.value:
    raise cli.UsageError("--out=DIR is required")
  if _RANDOM_INIT.value:
    if _FORMAT.value != "package":
      raise cli.UsageError("--random_init writes packages only; export the package with --format=hf")
    if not _TOKENIZER.value:
      raise cli.UsageError("--random_init needs --tokenizer=FILE.model")
    meta = export_random(
      _RANDOM_INIT.value,
      _TOKENIZER.value,
      _OUT.value,
      seed=_SEED.value,
      quantize=_QUANTIZE.value,
      weights_dtype=_WEIGHTS_DTYPE.value,
      overwrite=_OVERWRITE.value,
      overrides=_OVERRIDES.value,
    )
  else:
    meta = export(
      _WORKDIR.value,
      _OUT.value,
      step=cli.parse_step(_STEP.value),
      quantize=_QUANTIZE.value,
      weights_dtype=_WEIGHTS_DTYPE.value,
      overwrite=_OVERWRITE.value,
      name=_NAME.value,
      format=_FORMAT.value,
    )
  if _FORMAT.value == "hf":
    print(
      f"{os.path.normpath(_OUT.value)}: Hugging Face checkpoint ({', '.join(meta['files'])}), "
      f"{meta['parameter_count']:,} parameters, {meta['precision']['weights']} weights, "
      f"step {meta['provenance']['training_step']}"
    )
    return 0
  print(
    f"{os.path.normpath(_OUT.value)}: build {meta['build_id']}, {meta['parameter_count']:,} "
    f"parameters, {meta['weights_bytes']:,} bytes of {meta['precision']['weights']} weights, "
    f"step {meta['provenance']['training_step']}"
  )
  return 0


if __name__ == "__main__":
  cli.run(main)

"""python -m llm_jax.finetune.distill: the distillation corpus of llm_jax.finetune.distill (its docstring
has the commands)."""

from __future__ import annotations

from absl import flags

from llm_jax import cli
from llm_jax.artifacts import open_model
from llm_jax.finetune.distill import write_corpus

_PACKAGE = flags.DEFINE_string("package", None, "The model the draft will propose for: a package directory.")
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "... or a training run directory (latest checkpoint unless --step)."
)
_STEP = flags.DEFINE_string("step", None, "Checkpoint step of --workdir, or 'best' (default: latest).")
_TEXT = flags.DEFINE_multi_string("text", None, "A UTF-8 text file the prompts are cut from (repeatable).")
_OUT = flags.DEFINE_string("out", None, "The JSONL file to write.")
_PROMPTS = flags.DEFINE_integer("prompts", 8192, "Documents to write (one prompt each).")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 32, "Tokens per prompt.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 200, "New tokens per prompt at most (fewer at EOS).")
_BATCH = flags.DEFINE_integer("batch", 256, "Prompts decoded together.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy continuations.")
_SEED = flags.DEFINE_integer("seed", 0, "Chooses the prompts (and the samples at a temperature).")
_DTYPE = flags.DEFINE_string("dtype", None, "Compute dtype (default: bfloat16 on accelerators).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")


def main(argv: list[str]) -> int:
  """Opens the model, writes the corpus and prints one summary line."""
  del argv
  if bool(_PACKAGE.value) == bool(_WORKDIR.value):
    raise cli.UsageError("give exactly one of --package=PKG and --workdir=RUN")
  if not _TEXT.value or not _OUT.value:
    raise cli.UsageError("--text=FILE and --out=FILE.jsonl are required")
  model = open_model(
    _PACKAGE.value or _WORKDIR.value, cli.parse_step(_STEP.value), dtype=_DTYPE.value or "auto"
  )
  done = write_corpus(
    model,
    _TEXT.value,
    _OUT.value,
    prompts=_PROMPTS.value,
    prompt_tokens=_PROMPT_TOKENS.value,
    new_tokens=_NEW_TOKENS.value,
    batch=_BATCH.value,
    temperature=_TEMPERATURE.value,
    seed=_SEED.value,
    overwrite=_OVERWRITE.value,
  )
  print(
    f"{_OUT.value}: {done['documents']:,} documents, {done['generated_tokens']:,} generated tokens"
    f" by {model.describe()} in {done['seconds']:.1f} s"
  )
  return 0


if __name__ == "__main__":
  cli.run(main)

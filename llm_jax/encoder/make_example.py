"""Writes the encoder classification example: which standard-library package a docstring comes from.

    python -m llm_jax.encoder.make_example --out=data/docstrings [--packages=asyncio,email,logging,xml]

OUT/train.jsonl and OUT/val.jsonl, `{"text": ..., "label": ...}` per line, from this Python's own
standard library (no download): llm_jax.encoder.examples. The worked example: docs/finetune.md.
"""

from __future__ import annotations

import logging

from absl import flags

from llm_jax import cli
from llm_jax.encoder import examples

_OUT = flags.DEFINE_string("out", None, "directory for train.jsonl and val.jsonl")
_PACKAGES = flags.DEFINE_list("packages", list(examples.PACKAGES), "standard-library packages (the labels)")
_PER_LABEL = flags.DEFINE_integer("per_label", 200, "at most this many docstrings per package", lower_bound=2)
_MIN_CHARS = flags.DEFINE_integer("min_chars", 40, "shortest docstring kept (characters)", lower_bound=1)
_VAL_FRACTION = flags.DEFINE_float("val_fraction", 0.2, "share of each label held out for val.jsonl")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the per-label sample and the split")


def main(argv) -> int:
  """Writes the labelled files and prints their per-label counts."""
  del argv
  logging.getLogger().setLevel(logging.INFO)
  if not _OUT.value:
    raise cli.UsageError("give --out=DIR (where train.jsonl and val.jsonl go)")
  if not 0.0 < _VAL_FRACTION.value < 1.0:
    raise cli.UsageError(f"--val_fraction={_VAL_FRACTION.value} must be in (0, 1)")
  pairs = examples.stdlib_docstrings(_PACKAGES.value, _PER_LABEL.value, _MIN_CHARS.value, _SEED.value)
  out = examples.write_split(pairs, _OUT.value, _VAL_FRACTION.value)
  for name in ("train", "val"):
    counts = out["counts"][name]
    per_label = ", ".join(f"{k} {v}" for k, v in counts.items())
    print(f"{out['paths'][name]}: {sum(counts.values())} lines ({per_label})")
  return 0


if __name__ == "__main__":
  cli.run(main)

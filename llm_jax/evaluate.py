"""Scores a trained run (or an exported package) and writes a report a person can read.

    python -m llm_jax.evaluate --workdir=runs/tiny [--step=N|best] [--corpus=GLOB] [--suite=GLOB|none]
    python -m llm_jax.evaluate --compare=runs/a,runs/b[,...]

Writes DIR/eval/STEP/results.json, report.md and PNG plots (DIR/eval/STEP/corpus-NAME/ for --corpus)
and prints the held-out table. What every figure means: docs/eval.md.
"""

from __future__ import annotations

import logging

from absl import flags

from llm_jax import cli
from llm_jax.eval import compare as compare_lib
from llm_jax.eval import pipeline, report

_WORKDIR = flags.DEFINE_string("workdir", "", "training run directory or exported model package")
flags.DEFINE_alias("package", "workdir")
_STEP = flags.DEFINE_string("step", None, "checkpoint step or 'best' (default: the latest)")
_CORPUS = flags.DEFINE_string(
  "corpus",
  "",
  "score this text instead of the run's validation split: comma-separated globs of "
  ".txt/.md/.jsonl, 'stdlib', or a prepared data directory with the same tokenizer",
)
_SPLIT = flags.DEFINE_string("split", "val", "split of prepared data to score")
_SUITE = flags.DEFINE_string("suite", "", "eval files (glob; default evals/*.jsonl; 'none' skips)")
_BATCH_SIZE = flags.DEFINE_integer(
  "batch_size", 8, "windows per batch (results do not depend on it)", lower_bound=1
)
_SEQ_LEN = flags.DEFINE_integer(
  "seq_len", 0, "window length (default: the run's train.seq_len)", lower_bound=0
)
_PLL_WINDOWS = flags.DEFINE_integer(
  "pll_windows",
  4,
  "encoders: windows scored by pseudo-log-likelihood (each token masked in turn: "
  "seq_len forward rows per window)",
  lower_bound=1,
)
_MAX_WINDOWS = flags.DEFINE_integer("max_windows", None, "score at most this many windows", lower_bound=1)
_NO_GENERATIONS = flags.DEFINE_bool("no_generations", False, "skip the sampled generations")
_OUT = flags.DEFINE_string("out", "", "output directory (default: DIR/eval/STEP)")
_COMPARE = flags.DEFINE_list(
  "compare",
  None,
  "compare evaluated runs (workdirs, eval dirs or results.json files) side by side: --compare=DIR_A,DIR_B",
)


def main(argv) -> int:
  """Evaluates one model, or compares evaluated runs."""
  del argv
  logging.getLogger().setLevel(logging.INFO)
  if _COMPARE.value:
    print(compare_lib.text(compare_lib.compare(_COMPARE.value)))
    return 0
  if not _WORKDIR.value:
    raise cli.UsageError("give --workdir=DIR (or --package=DIR), or --compare=DIR_A,DIR_B")
  results, paths = pipeline.evaluate(
    _WORKDIR.value,
    step=cli.parse_step(_STEP.value),
    corpus=_CORPUS.value,
    split=_SPLIT.value,
    suite=_SUITE.value,
    batch_size=_BATCH_SIZE.value,
    seq_len=_SEQ_LEN.value,
    max_windows=_MAX_WINDOWS.value,
    generations=not _NO_GENERATIONS.value,
    out=_OUT.value,
    pll_windows=_PLL_WINDOWS.value,
  )
  print(report.summary_text(results))
  print(f"wrote {paths['report']} and {paths['results']}")
  return 0


if __name__ == "__main__":
  cli.run(main)

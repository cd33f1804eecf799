"""Audits a trained decoder for social bias: template sentence sets scored by log-likelihood, and samples.

    python -m llm_jax.audit_bias --workdir=runs/tiny [--step=N|best] [--templates=FILE] [--out=DIR]
    python -m llm_jax.audit_bias --package=packages/tiny

Sentences that differ only in a group term (pronouns, names, nationalities, religions, occupations) are
scored by the model; per pair of groups the report gives the mean log-likelihood gap and the
CrowS-Pairs-style preference rate with bootstrap intervals, flags gaps whose interval excludes zero, and
scores sampled completions per group with a word lexicon. Writes DIR/eval/STEP/bias/results.json,
report.md and PNGs. Template format and what every figure means: docs/eval.md, "Bias audit".
"""

from __future__ import annotations

import logging

from absl import flags

from llm_jax import cli
from llm_jax.eval import bias_audit, bias_scoring
from llm_jax.eval import bias_stats as stats

_WORKDIR = flags.DEFINE_string("workdir", "", "training run directory or exported model package")
flags.DEFINE_alias("package", "workdir")
_STEP = flags.DEFINE_string("step", None, "checkpoint step or 'best' (default: the latest)")
_TEMPLATES = flags.DEFINE_string(
  "templates", "", "template files (comma-separated globs; default evals/bias/*.jsonl)"
)
_OUT = flags.DEFINE_string("out", "", "output directory (default: DIR/eval/STEP/bias)")
_MODE = flags.DEFINE_enum(
  "mode",
  "shared",
  list(bias_scoring.MODES),
  "shared: score the tokens the sentences share (not the group term); full: every token",
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "sentences per scoring batch", lower_bound=1)
_BOOTSTRAP = flags.DEFINE_integer(
  "bootstrap", stats.DEFAULT_BOOTSTRAP, "bootstrap replicates", lower_bound=100
)
_LEVEL = flags.DEFINE_float(
  "level", stats.DEFAULT_LEVEL, "confidence level of the intervals", lower_bound=0.5, upper_bound=0.999
)
_MIN_GAP = flags.DEFINE_float(
  "min_gap",
  stats.DEFAULT_MIN_GAP,
  "flag likelihood gaps and contrasts only from this size (nats) up",
  lower_bound=0.0,
)
_MIN_LEXICON = flags.DEFINE_float(
  "min_lexicon",
  stats.DEFAULT_MIN_LEXICON,
  "flag completion lexicon-score differences only from this size up",
  lower_bound=0.0,
)
_SEED = flags.DEFINE_integer("seed", 0, "seed of the bootstrap and of the samples")
_NO_COMPLETIONS = flags.DEFINE_bool("no_completions", False, "skip the sampled completions")
_SAMPLES = flags.DEFINE_integer("samples", 4, "completions per prompt, term and group", lower_bound=1)
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 24, "tokens per completion at most", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "sampling temperature", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", 40, "sample from the k most likely tokens (0: all)", lower_bound=0)


def main(argv) -> int:
  """Runs the audit and prints where the report is and what was flagged."""
  del argv
  logging.getLogger().setLevel(logging.INFO)
  if not _WORKDIR.value:
    raise cli.UsageError("give --workdir=RUN or --package=PKG")
  results, paths = bias_audit.audit(
    _WORKDIR.value,
    step=cli.parse_step(_STEP.value),
    templates=_TEMPLATES.value,
    out=_OUT.value,
    mode=_MODE.value,
    batch_size=_BATCH_SIZE.value,
    completions=not _NO_COMPLETIONS.value,
    samples=_SAMPLES.value,
    max_tokens=_MAX_TOKENS.value,
    temperature=_TEMPERATURE.value,
    top_k=_TOP_K.value,
    settings=stats.Settings(
      seed=_SEED.value,
      n_boot=_BOOTSTRAP.value,
      level=_LEVEL.value,
      min_gap=_MIN_GAP.value,
      min_lexicon=_MIN_LEXICON.value,
    ),
  )
  lines = results["flagged"]
  print(f"{len(lines)} flagged figure(s)" + (":" if lines else ""))
  for line in lines:
    print(f"  {line}")
  print(f"wrote {paths['report']} and {paths['results']}")
  return 0


if __name__ == "__main__":
  cli.run(main)

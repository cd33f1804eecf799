"""Scores a trained run (or an exported package) and writes a report a person can read.

    python -m llm_jax.evaluate --workdir=runs/tiny [--step=N] [--corpus=GLOB] [--suite=GLOB|none]
    python -m llm_jax.evaluate --compare runs/a runs/b [...]

Writes DIR/eval/STEP/results.json, report.md and PNG plots (DIR/eval/STEP/corpus-NAME/ for --corpus)
and prints the held-out table. What every figure means: docs/eval.md.
"""
from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m llm_jax.evaluate", description=__doc__.split("\n")[0])
  p.add_argument("--workdir", "--package", dest="workdir", default="",
                 help="training run directory or exported model package")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--corpus", default="",
                 help="score this text instead of the run's validation split: comma-separated globs of "
                      ".txt/.md/.jsonl, 'stdlib', or a prepared data directory with the same tokenizer")
  p.add_argument("--split", default="val", help="split of prepared data to score (default: val)")
  p.add_argument("--suite", default="", help="eval files (glob; default evals/*.jsonl; 'none' skips)")
  p.add_argument("--batch_size", type=int, default=8, help="windows per batch (results do not depend on it)")
  p.add_argument("--seq_len", type=int, default=0, help="window length (default: the run's train.seq_len)")
  p.add_argument("--max_windows", type=int, default=None, help="score at most this many windows")
  p.add_argument("--no_generations", action="store_true", help="skip the sampled generations")
  p.add_argument("--out", default="", help="output directory (default: DIR/eval/STEP)")
  p.add_argument("--compare", nargs="+", metavar="DIR", default=None,
                 help="compare evaluated runs (workdirs, eval dirs or results.json files) side by side")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  from llm_jax.config import ConfigError
  from llm_jax.eval import compare as compare_lib
  from llm_jax.eval.scored_model import EvalError
  from llm_jax.eval.suite import SuiteError
  errors = (EvalError, SuiteError, compare_lib.CompareError, ConfigError)
  try:
    from llm_jax.data.errors import DataError
    errors += (DataError,)
  except ImportError:
    pass
  try:
    if args.compare:
      print(compare_lib.text(compare_lib.compare(args.compare)))
      return 0
    if not args.workdir:
      print("error: give --workdir=DIR (or --package=DIR), or --compare DIR_A DIR_B", file=sys.stderr)
      return 2
    if args.batch_size <= 0:
      print(f"error: --batch_size={args.batch_size} must be positive", file=sys.stderr)
      return 2
    from llm_jax.eval import pipeline, report
    results, paths = pipeline.evaluate(
        args.workdir, step=args.step, corpus=args.corpus, split=args.split, suite=args.suite,
        batch_size=args.batch_size, seq_len=args.seq_len, max_windows=args.max_windows,
        generations=not args.no_generations, out=args.out)
  except errors as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report.summary_text(results))
  print(f"wrote {paths['report']} and {paths['results']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Exports a LoRA run as a model package with the adapters merged into the base weights.

    python -m llm_jax.finetune.merge --workdir=runs/lora --out=packages/lora [--step=N] [--quantize=int8]

The package is an ordinary one (generate, serve and evaluate read it); the base comes from the run's
config.init_from, which must still exist.
"""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
  """CLI: merge and export."""
  ap = argparse.ArgumentParser(prog="python -m llm_jax.finetune.merge", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True, help="the LoRA training run directory")
  ap.add_argument("--out", required=True, help="package directory to write")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ap.add_argument("--quantize", choices=("none", "int8"), default="none")
  ap.add_argument("--weights_dtype", choices=("float32", "bfloat16"), default="float32")
  ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  from llm_jax.config import ConfigError  # noqa: PLC0415
  from llm_jax.finetune import lora  # noqa: PLC0415
  from llm_jax.package import PackageError  # noqa: PLC0415
  from llm_jax.train.checkpoint import CheckpointError  # noqa: PLC0415
  try:
    meta = lora.export(args.workdir, args.out, step=args.step, quantize=args.quantize,
                       weights_dtype=args.weights_dtype, overwrite=args.overwrite)
  except (ConfigError, PackageError, CheckpointError) as e:
    print(f"error ({type(e).__name__}): {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.out}: {meta['parameter_count']:,} parameters (LoRA merged), build "
        f"{meta['build_id']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

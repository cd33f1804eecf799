"""Exports a training run as a model package (see llm_jax/package.py for the format).

    python -m llm_jax.export --workdir=runs/tiny --out=packages/tiny [--quantize=int8] [--step=N]
"""
from __future__ import annotations

import json
import logging
import os
import sys

from llm_jax import package as package_lib
from llm_jax.data.shards import file_sha256
from llm_jax.model import ModelConfig

RUN_JSON, MANIFEST_JSON, TOKENIZER_MODEL = "run.json", "manifest.json", "tokenizer.model"


def _find(d: dict, *keys: str) -> str:
  """The first of `keys` found in a (possibly nested one level) run record."""
  for k in keys:
    if d.get(k):
      return str(d[k])
  for v in d.values():
    if isinstance(v, dict):
      for k in keys:
        if v.get(k):
          return str(v[k])
  return ""


def run_provenance(workdir: str) -> dict:
  """git commit, tokenizer and manifest sha256 of a run (from run.json; manifest hashed if absent)."""
  record = {}
  path = os.path.join(workdir, RUN_JSON)
  if os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        record = json.load(f)
    except json.JSONDecodeError as e:
      raise package_lib.PackageError(f"{path} is not valid JSON (line {e.lineno}): {e.msg}") from e
  else:
    logging.warning("%s is missing: the package records git commit 'unknown'", path)
  manifest_sha = _find(record, "manifest_sha256")
  mpath = os.path.join(workdir, MANIFEST_JSON)
  if not manifest_sha and os.path.exists(mpath):
    manifest_sha = file_sha256(mpath)
  commit = _find(record, "git_commit", "commit")
  git = record.get("git")
  if isinstance(git, dict) and git.get("commit"):
    commit = str(git["commit"]) + ("+dirty" if git.get("dirty") else "")
  return {"git_commit": commit,
          "tokenizer_sha256": _find(record, "tokenizer_sha256"),
          "manifest_sha256": manifest_sha}


def _workdir_model(workdir: str, step: int | None):
  from llm_jax.train.checkpoint import restore_params
  tok_path = os.path.join(workdir, TOKENIZER_MODEL)
  if not os.path.exists(tok_path):
    raise package_lib.PackageError(f"{tok_path} is missing; is {workdir!r} a training run directory?")
  tokenizer = package_lib.load_tokenizer(tok_path)
  params, config, step = restore_params(workdir, step)
  cfg = ModelConfig.from_config(config, tokenizer_size=tokenizer.vocab_size)
  return params, cfg, tokenizer, tok_path, step


def load_workdir(workdir: str, step: int | None = None,
                 compute_dtype: str | None = None) -> package_lib.LoadedModel:
  """A training run's checkpoint as a LoadedModel (the same object load_package returns)."""
  params, cfg, tokenizer, tok_path, step = _workdir_model(workdir, step)
  prov = run_provenance(workdir)
  prov.update(training_step=step, tokenizer_sha256=tokenizer.sha256, source=os.path.abspath(workdir))
  cfg = package_lib.inference_config(cfg, compute_dtype)
  import jax
  import jax.numpy as jnp
  params = jax.tree.map(lambda x: jnp.asarray(x).astype(cfg.dtype), params)
  meta = {"name": os.path.basename(os.path.normpath(workdir)), "build_id": f"workdir-step{step}",
          "provenance": prov, "parameter_count": cfg.param_count(),
          "precision": {"weights": "float32"}, "prompt_prefix": [tokenizer.eos_id]}
  return package_lib.LoadedModel(params=params, model_config=cfg, tokenizer=tokenizer, meta=meta,
                                 path=workdir)


def export(workdir: str, out: str, *, step: int | None = None, quantize: str = "none",
           weights_dtype: str = "float32", overwrite: bool = False, name: str = "") -> dict:
  """Writes the package of a run's checkpoint (latest unless `step`); returns its model.json."""
  params, cfg, tokenizer, tok_path, step = _workdir_model(workdir, step)
  prov = run_provenance(workdir)
  return package_lib.write_package(
      out, params, cfg, tok_path, step=step, git_commit=prov["git_commit"],
      manifest_sha256=prov["manifest_sha256"], tokenizer_sha256=prov["tokenizer_sha256"],
      quantize=quantize, weights_dtype=weights_dtype, name=name, source=os.path.abspath(workdir),
      overwrite=overwrite)


def init_params(cfg: ModelConfig, seed: int = 0):
  """Random float32 parameters of the decoder (for benchmarks and tests; not a trained model)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from llm_jax.model import Decoder
  tokens = jnp.zeros((1, 1), jnp.int32)
  return nn.unbox(jax.jit(Decoder(cfg).init)(jax.random.key(seed), tokens))["params"]


def export_random(config_path: str, tokenizer_path: str, out: str, *, seed: int = 0,
                  quantize: str = "none", weights_dtype: str = "float32", overwrite: bool = False,
                  overrides=()) -> dict:
  """A package of randomly initialized weights for a config (benchmarks: shapes matter, not skill)."""
  from llm_jax import config as config_lib
  config = config_lib.load(config_path, overrides)
  tokenizer = package_lib.load_tokenizer(tokenizer_path)
  cfg = ModelConfig.from_config(config, tokenizer_size=tokenizer.vocab_size)
  return package_lib.write_package(
      out, init_params(cfg, seed), cfg, tokenizer_path, step=0, quantize=quantize,
      weights_dtype=weights_dtype, overwrite=overwrite, source=f"random init of {config_path}")


def main(argv=None) -> int:
  """CLI: export a run directory as a package."""
  import argparse
  ap = argparse.ArgumentParser(prog="python -m llm_jax.export", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="training run directory")
  src.add_argument("--random_init", "--random-init", metavar="CONFIG",
                   help="a config file: package random weights of its model (for benchmarks)")
  ap.add_argument("--tokenizer", help="with --random_init: the tokenizer .model file")
  ap.add_argument("--config_override", "--config-override", action="append", default=[],
                  help="with --random_init: key=value overrides of the config")
  ap.add_argument("--seed", type=int, default=0, help="with --random_init: init seed")
  ap.add_argument("--out", required=True, help="package directory to write")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ap.add_argument("--quantize", choices=("none", "int8"), default="none")
  ap.add_argument("--weights_dtype", "--weights-dtype", choices=("float32", "bfloat16"),
                  default="float32", help="dtype of unquantized float tensors")
  ap.add_argument("--name", default="", help="model name (default: the --out folder name)")
  ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  try:
    if args.random_init:
      if not args.tokenizer:
        ap.error("--random_init needs --tokenizer")
      meta = export_random(args.random_init, args.tokenizer, args.out, seed=args.seed,
                           quantize=args.quantize, weights_dtype=args.weights_dtype,
                           overwrite=args.overwrite, overrides=args.config_override)
    else:
      meta = export(args.workdir, args.out, step=args.step, quantize=args.quantize,
                    weights_dtype=args.weights_dtype, overwrite=args.overwrite, name=args.name)
  except (package_lib.PackageError, ValueError, OSError) as e:
    print(f"export failed: {e}", file=sys.stderr)
    return 1
  print(f"{args.out}: build {meta['build_id']}, {meta['parameter_count']:,} parameters, "
        f"{meta['weights_bytes']:,} bytes of {meta['precision']['weights']} weights, "
        f"step {meta['provenance']['training_step']}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

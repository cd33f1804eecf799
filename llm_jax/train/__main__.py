"""python -m llm_jax.train --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=2000 ...]

Trains, or resumes the run in --workdir from its latest checkpoint. Exit codes: 0 done, 1 error (the
message names the key, step or file), 75 stopped cleanly by SIGTERM/Ctrl-C (run again to resume).
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py); override fields with --config.a.b=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard, metrics.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the mesh, per-device batch and a per-device memory "
                             "estimate (llm_jax.dry_run), then exit without compiling or training.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_libraries() -> None:
  """Orbax logs every save step by step through absl at INFO; keep the run's own log readable."""
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def _compile_cache() -> None:
  """Persistent XLA compilation cache (resuming a run skips most compile time); JAX_COMPILATION_CACHE_DIR wins."""
  import jax  # noqa: PLC0415
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  root = os.environ.get("LLM_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llm_jax")
  jax.config.update("jax_compilation_cache_dir", os.path.join(root, "jax_compile"))


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  _quiet_libraries()
  _compile_cache()
  from llm_jax import distributed  # noqa: PLC0415 - after flags: JAX starts on import
  from llm_jax.config import ConfigError  # noqa: PLC0415
  from llm_jax.data.errors import DataError  # noqa: PLC0415
  from llm_jax.train import loop  # noqa: PLC0415
  from llm_jax.train.checkpoint import CheckpointError  # noqa: PLC0415
  from llm_jax.train.preflight import PreflightError  # noqa: PLC0415
  from llm_jax.train.run_dir import RunDirError  # noqa: PLC0415
  try:
    distributed.initialize(_CONFIG.value)  # a no-op for a single process
    if _DRY_RUN.value:
      from llm_jax import dry_run  # noqa: PLC0415
      dry_run.run(_CONFIG.value)
      return 0
    summary = loop.train(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, DataError, CheckpointError, RunDirError, PreflightError,
          distributed.DistributedError, loop.TrainingError) as e:
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error ({type(e).__name__}): {e}", file=sys.stderr)
    return distributed.fail_fast(1, f"{type(e).__name__}: {e}")  # many processes: exit now
  val = summary.get("val_loss")
  print(f"{summary['status']}: step {summary['step']}/{summary['total_steps']}, loss "
        f"{summary.get('loss', float('nan')):.4f}" + (f", val loss {val:.4f}" if val else "") +
        f"; run directory {summary['workdir']}")
  return loop.EXIT_INTERRUPTED if summary["status"].startswith("stopped") else 0


def check_overrides(argv: list[str]) -> str | None:
  """The error for a misspelled or mistyped --config.a.b=v (named, with a hint), before flag parsing."""
  from llm_jax import config as config_lib  # noqa: PLC0415
  path, overrides = None, []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
      i += 1
    elif arg.startswith("--config."):
      if "=" in arg:
        overrides.append(arg[2:])
      elif i + 1 < len(argv):
        overrides.append(f"{arg[2:]}={argv[i + 1]}")
        i += 1
    i += 1
  if path is None:
    return None
  try:
    config_lib.load(path, overrides)
  except config_lib.ConfigError as e:
    return str(e)
  return None


if __name__ == "__main__":
  problem = check_overrides(sys.argv[1:])
  if problem:
    print(f"error (ConfigError): {problem}", file=sys.stderr)
    sys.exit(1)
  app.run(main)

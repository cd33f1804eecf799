"""python -m llm_jax.train --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=2000 ...]

Trains, or resumes the run in --workdir from its latest checkpoint. A config that fine-tunes
(init_from, finetune.*) trains with llm_jax.finetune's extension; an encoder (model.causal=False) with
llm_jax.encoder's. Exit codes: 0 done (or stopped
early by train.early_stop_patience), 1 failure (one line naming the key, step or file), 2 usage error,
75 stopped cleanly by SIGTERM/Ctrl-C (run the same command again to resume).
"""

from __future__ import annotations

import logging
import os
import sys

import jax
from absl import flags
from ml_collections import config_flags

from llm_jax import cli, distributed, dry_run
from llm_jax.encoder.extension import extension_for
from llm_jax.generate.samples import for_training
from llm_jax.train import loop
from llm_jax.train.checkpoint import CheckpointError

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/*.py); override fields with --config.a.b=value.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard, metrics.")
_DRY_RUN = flags.DEFINE_bool(
  "dry_run",
  False,
  "Print the mesh, per-device batch and a per-device memory "
  "estimate (llm_jax.dry_run), then exit without compiling or training.",
)
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_libraries() -> None:
  """Orbax logs every save step by step through absl at INFO; keep the run's own log readable."""
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def main(argv) -> int:
  """Trains (or resumes) one run; prints its summary line."""
  del argv
  _quiet_libraries()
  cli.use_compile_cache(cli.compile_cache_dir())  # resuming a run skips most compile time
  config = _CONFIG.value
  try:
    distributed.initialize(config)  # a no-op for a single process
    if _DRY_RUN.value:
      dry_run.run(config)
      return 0
    summary = loop.train(config, _WORKDIR.value, extension_for(config), make_sampler=for_training)
  except Exception as e:
    if jax.distributed.is_initialized():  # many processes: one line, then exit at once
      print(f"error ({type(e).__name__}): {e}", file=sys.stderr, flush=True)
      return distributed.fail_fast(1, f"{type(e).__name__}: {e}")
    if isinstance(e, CheckpointError) and not cli.verbose():
      # A failed read leaves the storage library's other reads behind (their tracebacks are dropped by
      # the hooks train.checkpoint installs before every read); at interpreter shutdown they would post
      # again. The one line says all there is: exit now, past that shutdown.
      print(f"error ({type(e).__name__}): {e}", file=sys.stderr, flush=True)
      logging.shutdown()
      os._exit(1)
    raise  # cli prints the one line (and the traceback with --verbose)
  val = summary.get("val_loss")
  best = (
    f"; best val loss {summary['best_val_loss']:.4f} at step {summary['best_step']} (--step=best)"
    if summary.get("best_step") is not None
    else ""
  )
  loss = summary.get("loss")  # none when the run had reached its budget already: nothing trained
  print(
    f"{summary['status']}: step {summary['step']}/{summary['total_steps']}"
    + (f", loss {loss:.4f}" if loss is not None else " (nothing to train: the run was there already)")
    + (f", val loss {val:.4f}" if val else "")
    + best
    + f"; run directory {summary['workdir']}"
  )
  return loop.EXIT_INTERRUPTED if summary["status"].startswith("stopped") else 0


if __name__ == "__main__":
  cli.run(main)

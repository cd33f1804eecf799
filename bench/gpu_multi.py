"""Multi-GPU training-step throughput: one mesh, one process or one process per GPU, synthetic tokens.

    PYTHONPATH=. python3 bench/gpu_multi.py --config=configs/gpt_small.py --mesh=dp --rows_per_gpu=16
    PYTHONPATH=. launch/local.sh -n 4 --gpus_per_process 1 -- python3 bench/gpu_multi.py --config=... \
      --mesh=fsdp

(from the repository root; bench/gpu_multi.sh runs these.)

Joins the job through llm_jax.distributed (so local.sh / SLURM / explicit launches all work), builds the
sharded state, jits the real train step as the loop does, and times `--steps` steps dispatched back to
back after `--warmup`. The global batch is rows_per_gpu x GPUs (weak scaling); with --mesh=tp the batch
is not split over devices, so it runs as GPUs microbatches of rows_per_gpu rows each, the same rows per
pass as the other meshes. Rows are placed with llm_jax.sharding.process_batch_slice / global_batch, the
path the training loop uses. Process 0 prints one JSON line (and appends it to --json): tokens/s, tokens/s
per GPU, peak memory per device next to the dry run's estimate.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import numpy as np

from llm_jax import config as config_lib
from llm_jax import distributed, dry_run, sharding
from llm_jax.model import Decoder, ModelConfig
from llm_jax.train import metrics as metrics_lib
from llm_jax.train import optimizer as optimizer_lib
from llm_jax.train import state as state_lib
from llm_jax.train import step as step_lib

MESHES = {"dp": (-1, 1, 1), "fsdp": (1, -1, 1), "tp": (1, 1, -1)}


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", required=True)
  p.add_argument("--mesh", choices=sorted(MESHES), default="dp")
  p.add_argument("--rows_per_gpu", type=int, default=16, help="rows per device per forward/backward")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--label", default="")
  p.add_argument("--json", default="", help="append the result line to this file (process 0)")
  args, overrides = p.parse_known_args(argv)
  return args, overrides


def main(argv=None) -> int:
  args, overrides = parse(argv)
  config = config_lib.load(args.config, overrides)
  distributed.initialize(config)  # before any other JAX call

  n = jax.device_count()
  data, fsdp, tensor = MESHES[args.mesh]
  micro = n if args.mesh == "tp" else 1
  with config.unlocked():
    config.sharding.data, config.sharding.fsdp, config.sharding.tensor = data, fsdp, tensor
    config.train.global_batch_size = args.rows_per_gpu * n
    config.train.microbatches = micro
    if not config.model.vocab_size:
      config.model.vocab_size = dry_run.tokenizer_size(config)
  config_lib.validate(config, n)
  tr = config.train

  model = Decoder(ModelConfig.from_config(config))
  optimizer = optimizer_lib.make_optimizer(config)
  mesh = sharding.make_mesh(config)
  # Each process loads only the block of rows its devices hold (with --mesh=tp across processes every
  # process holds, and loads, the whole batch).
  index, count = sharding.process_batch_slice(mesh)
  rows = tr.global_batch_size // count
  window = np.random.default_rng(1000 + index).integers(
    0, model.cfg.vocab_size, (rows, tr.seq_len + 1), dtype=np.int32
  )
  batch = sharding.global_batch({"inputs": window[:, :-1], "targets": window[:, 1:]}, mesh)

  with sharding.activate(mesh, config):
    t = time.perf_counter()
    state, shardings = state_lib.create_state(model, optimizer, mesh, config, tr.seed)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t
    step_fn = jax.jit(
      functools.partial(step_lib.train_step, model=model, optimizer=optimizer, config=config),
      in_shardings=(shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)),
      donate_argnums=0,
    )
    t = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    losses = []
    for _ in range(1 + args.warmup):
      state, metrics = compiled(state, batch)
      losses.append(float(metrics["loss"]))
    t = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = compiled(state, batch)
    losses.append(float(metrics["loss"]))  # waits for the last step
    elapsed = time.perf_counter() - t

  tokens_per_s = args.steps * tr.global_batch_size * tr.seq_len / elapsed
  peaks = [metrics_lib.device_memory_stats(d).get("peak_bytes_in_use", 0) for d in jax.local_devices()]
  est = dry_run.estimate(config, n, platform=jax.devices()[0].platform)
  dev = jax.devices()[0]
  peak = metrics_lib.peak_flops(dev.device_kind, dev.platform)
  mfu = metrics_lib.mfu(model.cfg.flops_per_token(tr.seq_len), tokens_per_s, n, peak)
  row = {
    "label": args.label or f"{os.path.basename(args.config)} {args.mesh}",
    "config": args.config,
    "mesh": dict(mesh.shape),
    "processes": jax.process_count(),
    "gpus": n,
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "global_batch": tr.global_batch_size,
    "microbatches": micro,
    "seq_len": tr.seq_len,
    "params": est.param_count,
    "init_s": round(init_s, 2),
    "compile_s": round(compile_s, 2),
    "step_ms": round(1e3 * elapsed / args.steps, 2),
    "tokens_per_s": round(tokens_per_s, 1),
    "tokens_per_s_per_gpu": round(tokens_per_s / n, 1),
    "mfu": round(mfu, 4) if mfu else None,
    "remat": config.model.remat,
    "scan_unroll": config.model.scan_unroll,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "peak_gib_per_device": round(max(peaks) / 2**30, 2) if any(peaks) else None,
    "estimate_gib_per_device": round(est.total_bytes / 2**30, 2),
    "loss_first": losses[0],
    "loss_last": losses[-1],
  }
  if jax.process_index() == 0:
    line = json.dumps(row)
    print(line, flush=True)
    if args.json:
      with open(args.json, "a") as f:
        f.write(line + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())

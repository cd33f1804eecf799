"""Data pipeline benchmark (a command, not a test): preparation MB/s and loader tokens/s on one core.

python -m llm_jax.data.bench --config=configs/tiny.py
python -m llm_jax.data.bench --config=configs/tiny.py --skip_prepare --shapes=128x16,1024x32
"""

from __future__ import annotations

import os
import platform
import resource
import tempfile
import time

from absl import flags
from ml_collections import config_flags

from llm_jax import cli
from llm_jax.data import loader as loader_lib
from llm_jax.data.prepare import prepare

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/tiny.py.", lock_config=True
)
_SKIP_PREPARE = flags.DEFINE_bool(
  "skip_prepare", False, "Use the cached prepared data instead of timing a fresh build."
)
_SHAPES = flags.DEFINE_string(
  "shapes", "", "Comma-separated SEQxBATCH loader shapes; default: the config's and 1024x32."
)
_SECONDS = flags.DEFINE_float("seconds", 3.0, "Time per loader measurement.")
_CORE = flags.DEFINE_integer("core", 0, "CPU core the loader measurement is pinned to (-1: no pinning).")
flags.mark_flags_as_required(["config"])


def _rate(fn, seconds: float) -> tuple[float, float, int]:
  """Calls fn(i) for i = 0, 1, ... for about `seconds`: (calls per wall second, per CPU second, calls).

  The CPU-time rate is what one core delivers when it is not shared; on a busy machine the wall-clock
  rate is lower by the share of the core this process got.
  """
  fn(0)
  n, t0, c0 = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - t0 < seconds:
    fn(n + 1)
    n += 1
  return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9), n


def _cpu_seconds() -> float:
  own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _shapes(spec: str) -> list[tuple[int, int]]:
  out = []
  for shape in spec.split(","):
    try:
      seq, batch = (int(v) for v in shape.split("x"))
    except ValueError:
      raise cli.UsageError(f"--shapes: {shape!r} is not SEQxBATCH (e.g. 1024x32)") from None
    out.append((seq, batch))
  return out


def main(argv) -> int:
  del argv
  config = _CONFIG.value
  shapes = _shapes(_SHAPES.value or f"{config.train.seq_len}x{config.train.global_batch_size},1024x32")
  print(f"host: {platform.node()} {os.cpu_count()} cores, python {platform.python_version()}")
  if _SKIP_PREPARE.value:
    p = prepare(config)
    print(f"prepared (cached): {p.dir}")
  else:
    with tempfile.TemporaryDirectory() as cache:
      with config.unlocked():
        config.data.cache_dir = cache
      t0, c0 = time.perf_counter(), _cpu_seconds()
      p = prepare(config, progress=False)
      secs, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
      s = p.manifest["summary"]
      mb = s["input_megabytes"]
      print(
        f"prepare: {mb:.1f} MB of input in {secs:.1f}s wall = {mb / secs:.2f} MB/s; "
        f"{cpu:.1f} CPU-seconds = {mb / cpu:.2f} MB per CPU-second; "
        f"load average {os.getloadavg()[0]:.1f}; "
        f"stages (wall s) {s['seconds_by_stage']}"
      )
      with config.unlocked():
        config.data.cache_dir = ""
      p = prepare(config)  # the persistent cache, for the loader measurement below
  if _CORE.value >= 0 and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {_CORE.value})
    print(f"loader pinned to core {_CORE.value}")
  for seq, batch in shapes:
    ld = loader_lib.TrainLoader(p.dir, "train", seq, batch, seed=0)
    tok = seq * batch / 1e6
    wall, cpu, n = _rate(ld.batch_at, _SECONDS.value)
    print(
      f"TrainLoader seq_len={seq} batch={batch}: {cpu * tok:.1f}M tokens per CPU-second "
      f"({wall * tok:.1f}M per wall second, {n} batches, load average {os.getloadavg()[0]:.1f})"
    )
    seg = loader_lib.TrainLoader(p.dir, "train", seq, batch, seed=0, segment_windows=True)
    wall, cpu, n = _rate(seg.batch_at, _SECONDS.value)
    print(f"  with segment_windows: {cpu * tok:.1f}M tokens per CPU-second ({wall * tok:.1f}M wall)")
    t0, c0 = time.perf_counter(), time.process_time()
    toks = sum(b["weights"].sum() for b in loader_lib.eval_batches(p.dir, "val", seq, batch))
    print(
      f"  eval_batches (val, in order): {toks / (time.process_time() - c0) / 1e6:.1f}M tokens per "
      f"CPU-second ({toks / (time.perf_counter() - t0) / 1e6:.1f}M wall)"
    )
  return 0


if __name__ == "__main__":
  cli.run(main)

"""Where the engine process's warm start goes (issue 19): `serve.loading.start_engine` as the server
runs it (the weights on one thread while the programs build on the main one), or `--parts`: each of
its parts alone, one after the other, in this process. Seconds per line; run it twice on one cache
(the first run fills it).

    python bench/start_probe.py --package PKG --cache DIR             # start_engine
    python bench/start_probe.py --package PKG --cache DIR --parts     # each part alone
    python -X importtime -c "import llm_jax.serve.__main__"           # the imports before main

On one H200 (docs/serving.md, issue 19 round ten: gpt_small shapes, float32 weights served in bf16)
the weights' branch took ~1.4 s alone (GPU client included) and the programs' ~1.5 s, while
start_engine took 2.8-3.4 s: side by side they wait for each other's interpreter lock. Round eleven
(the empty state a loaded program, the model's init traced once): 1.86-2.29 s. Not a test.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp

from llm_jax import cli
from llm_jax.artifacts import package as package_lib
from llm_jax.artifacts import weights_file
from llm_jax.serve import loading
from llm_jax.serve.settings import ServerSettings


def _timed(name: str, fn):
  t0 = time.monotonic()
  out = jax.block_until_ready(fn())
  print(f"{time.monotonic() - t0:6.2f} s  {name}", flush=True)
  return out


def parts(settings: ServerSettings) -> None:
  """Each part of start_engine alone, in the order the server needs them."""
  path, dtype = settings.package, settings.compute_dtype
  meta = package_lib.read_model_json(path)
  wpath = os.path.join(path, package_lib.WEIGHTS)
  _timed("weights file read and checked (host)", lambda: weights_file.read_checked(wpath, meta, True))
  flat = _timed("weights file read, unchecked (host)", lambda: weights_file.read_checked(wpath, meta, False))
  _timed("device client start", jax.devices)
  arrays = _timed(f"transfer of {len(flat)} arrays", lambda: [jax.device_put(a) for a in flat.values()])
  _timed(f"cast to {dtype}, one array at a time", lambda: [a.astype(jnp.dtype(dtype)) for a in arrays])
  _timed("read_package (read, check, transfer, cast)", lambda: package_lib.read_package(path, dtype=dtype)[0])
  _timed("load_and_lay_out (read, unstack, lay out)", lambda: loading.load_and_lay_out(settings)[0].params)
  shapes = _timed("served_shapes", lambda: loading.served_shapes(settings))
  engine = loading.make_engine(settings, *shapes)
  _timed("engine warmup: empty state and the covering programs", engine.warmup)
  _stop(engine)


def _stop(engine) -> None:
  """Stops the engine and waits for the background build it may be in (a process that exits while
  XLA compiles on another thread aborts)."""
  engine.stop()
  if engine.programs.background is not None:
    engine.programs.background.join()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--package", required=True, help="a package (python -m llm_jax.export)")
  p.add_argument("--cache", required=True, help="compilation cache directory (the server's --compile_cache)")
  p.add_argument("--parts", action="store_true", help="each part alone instead of start_engine")
  p.add_argument("--slots", type=int, default=32)
  p.add_argument("--dtype", default="bfloat16")
  args = p.parse_args()
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # as the server sets it
  cli.use_compile_cache(args.cache, min_compile_secs=0)
  settings = ServerSettings(
    package=args.package,
    compute_dtype=args.dtype,
    slots=args.slots,
    max_concurrent=2 * args.slots,
    export_dir=os.path.join(args.cache, "llm_jax_export"),
  )
  if args.parts:
    parts(settings)
  else:
    engine, _ = _timed("start_engine", lambda: loading.start_engine(settings))
    _stop(engine)


if __name__ == "__main__":
  main()

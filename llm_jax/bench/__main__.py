"""Training-step benchmark: compile time, step time, tokens/s, MFU, peak memory and data wait.

    python -m llm_jax.bench --config=configs/gpt_small.py [--steps=10] [--synthetic]
    python -m llm_jax.bench --config=configs/gpt_small.py --synthetic --sweep \
        --sweep_batches=16,32,48 --sweep_remat=none,dots_no_batch
    python -m llm_jax.bench --config=configs/gpt_small.py --synthetic \
        --variant='model.scan_layers=True' --variant='model.scan_layers=False'

Data is the prepared corpus through `TrainLoader` by default; `--synthetic` uses random tokens already
on the device. `--config.train.profile_steps=START,STOP` writes a profiler trace of those steps (counted
from 0, the compiling step) to `<workdir>/tb`. Every row goes to a JSON file (`--json`, default
runs/bench/<config>-<time>.json). docs/performance.md explains the figures.
"""

from __future__ import annotations

import datetime
import json
import os

import jax
from absl import flags
from ml_collections import config_flags

from llm_jax import cli
from llm_jax.bench.measure import format_summary, format_table, parse_variant, run_rows, sweep_overrides

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/gpt_small.py.", lock_config=True
)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after the compiling step and the warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after the compiling step.")
_SYNTHETIC = flags.DEFINE_bool("synthetic", False, "Random tokens on the device instead of real data.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Sweep batch per pass x remat policy; print one table.")
_SWEEP_BATCHES = flags.DEFINE_string(
  "sweep_batches",
  "",
  "Rows per forward/backward pass (train.global_batch_size / microbatches); "
  "empty: half, one and two times the config's.",
)
_SWEEP_REMAT = flags.DEFINE_string("sweep_remat", "none,dots_no_batch,full", "Remat policies to sweep.")
_VARIANT = flags.DEFINE_multi_string(
  "variant", [], "A space-separated list of key=value config overrides; each --variant is a row."
)
_JSON = flags.DEFINE_string("json", "", "Where to write the results (default runs/bench/...).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/bench", "Profiles go to <workdir>/tb.")
_PEAK_TFLOPS = flags.DEFINE_float(
  "peak_tflops",
  0.0,
  "Peak dense bf16 TFLOP/s per device for MFU; "
  "0: the table in llm_jax/train/metrics.py (H100/H200 989, A100 312, "
  "...), else no MFU.",
)
flags.mark_flag_as_required("config")


def _default_json_path(config_path: str) -> str:
  stem = os.path.splitext(os.path.basename(config_path or "config"))[0]
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  return os.path.join("runs", "bench", f"{stem}-{stamp}.json")


def main(argv: list[str]) -> int:
  """Measures the config (or each variant / sweep row), writes the JSON record, prints the table."""
  del argv
  config = _CONFIG.value
  override_sets = [parse_variant(v) for v in _VARIANT.value] or [{}]
  if _SWEEP.value:
    sweep = sweep_overrides(config, _SWEEP_BATCHES.value, _SWEEP_REMAT.value)
    override_sets = [{**v, **s} for v in override_sets for s in sweep]
  rows = run_rows(
    config,
    override_sets,
    steps=_STEPS.value,
    warmup=_WARMUP.value,
    synthetic=_SYNTHETIC.value,
    workdir=_WORKDIR.value,
    peak_tflops=_PEAK_TFLOPS.value,
  )
  config_path = flags.FLAGS["config"].config_filename
  path = _JSON.value or _default_json_path(config_path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  record = {
    "config": config_path,
    "jax": jax.__version__,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "date": datetime.datetime.now().isoformat(),
    "rows": rows,
  }
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=1)
  os.replace(path + ".tmp", path)
  if len(rows) == 1:
    print(format_summary(rows[0]))
  print(format_table(rows))
  print(f"results: {path}")
  return 0


if __name__ == "__main__":
  cli.run(main)

"""python -m llm_jax.dry_run --config=configs/llama_8b.py --devices=4 --device_memory_gib=141 --platform=gpu

Plans a run for hardware that is not here: the mesh, the per-device batch and a per-device memory
estimate for --devices devices, from shapes alone (nothing compiles). `python -m llm_jax.train ...
--dry_run` does the same on the devices of the job it runs in.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from llm_jax import cli, dry_run

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/*.py); override fields with --config.a.b=value.", lock_config=True
)
_DEVICES = flags.DEFINE_integer("devices", None, "Number of devices in the whole job.", lower_bound=1)
_MEMORY = flags.DEFINE_float("device_memory_gib", 0.0, "Memory of one device in GiB (0: not compared).")
_PLATFORM = flags.DEFINE_enum(
  "platform", "gpu", ["cpu", "gpu", "tpu"], "Resolves model.dtype=auto and model.attention=auto."
)
flags.mark_flags_as_required(["config", "devices"])


def main(argv) -> int:
  """Prints the dry run's report for the given hardware."""
  del argv
  est = dry_run.estimate(
    _CONFIG.value,
    _DEVICES.value,
    platform=_PLATFORM.value,
    device_memory_bytes=int(_MEMORY.value * dry_run.GIB) or None,
  )
  print(dry_run.report(est, _CONFIG.value, device_name=f"{_PLATFORM.value} device"))
  return 0


if __name__ == "__main__":
  cli.run(main)

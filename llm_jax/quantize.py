"""The precision report: size, perplexity and decode speed of float32, bfloat16 and int8 weights.

    python -m llm_jax.quantize --package=PKG --text=held_out.txt [--batch=1,8,32] [--new_tokens=64]

The report is llm_jax/eval/precision.py; the quantization itself is llm_jax/model/quantize.py.
"""

from __future__ import annotations

import json

import jax
from absl import flags

from llm_jax import cli
from llm_jax.eval.precision import format_report, report

_PACKAGE = flags.DEFINE_string("package", None, "a float32 or bfloat16 package (or a run directory)")
_TEXT = flags.DEFINE_string("text", None, "held-out text file for perplexity")
_BATCH = flags.DEFINE_list("batch", ["1", "8"], "comma-separated decode batch sizes")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "new tokens per decode measurement")
_MAX_WINDOWS = flags.DEFINE_integer("max_windows", 64, "perplexity windows of max_seq_len tokens")
_DTYPE = flags.DEFINE_enum(
  "dtype",
  None,
  ["float32", "bfloat16"],
  "compute dtype of the int8 variants (default: float32 on CPU, bfloat16 on accelerators)",
)
_JSON = flags.DEFINE_bool("json", False, "print JSON instead of the table")
flags.mark_flags_as_required(["package", "text"])


def main(argv) -> int:
  """Prints the precision comparison table of a float package on a held-out text file."""
  del argv
  try:
    batches = tuple(int(b) for b in _BATCH.value)
  except ValueError:
    raise cli.UsageError(f"--batch={','.join(_BATCH.value)} must be comma-separated integers") from None
  if not batches or min(batches) < 1:
    raise cli.UsageError(f"--batch={','.join(_BATCH.value)}: batch sizes are 1 or more")
  if _NEW_TOKENS.value < 1 or _MAX_WINDOWS.value < 1:
    raise cli.UsageError("--new_tokens and --max_windows are 1 or more")
  text = cli.read_text(_TEXT.value, "--text")
  rows = report(
    _PACKAGE.value,
    text,
    batches=batches,
    new_tokens=_NEW_TOKENS.value,
    max_windows=_MAX_WINDOWS.value,
    compute_dtype=_DTYPE.value,
  )
  print(json.dumps(rows, indent=2) if _JSON.value else format_report(rows))
  print(f"[{jax.devices()[0].device_kind}]")
  return 0


if __name__ == "__main__":
  cli.run(main)

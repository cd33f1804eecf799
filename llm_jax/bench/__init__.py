"""The training-step benchmark (`python -m llm_jax.bench`): measure() times the real step and returns
one row of figures; run_rows() measures override sets (sweeps, variants); format_* print them."""

from llm_jax.bench.measure import (
  format_summary,
  format_table,
  measure,
  parse_variant,
  peak_flops_per_device,
  run_rows,
  sweep_overrides,
)

__all__ = [
  "format_summary",
  "format_table",
  "measure",
  "parse_variant",
  "peak_flops_per_device",
  "run_rows",
  "sweep_overrides",
]

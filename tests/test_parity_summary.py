"""bench/parity_summary.py: the training switches' loss curves against the seed-to-seed spread."""

import importlib.util
import json
import os

_PATH = os.path.join(os.path.dirname(__file__), "..", "bench", "parity_summary.py")
_spec = importlib.util.spec_from_file_location("parity_summary", _PATH)
parity_summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity_summary)


def _write(out, name, run, curve):
  with open(os.path.join(out, f"{name}_{run}.metrics.jsonl"), "w") as f:
    for step, loss in curve.items():
      f.write(json.dumps({"step": step, "train_loss": 9.0}) + "\n")  # rows without val_loss are skipped
      f.write(json.dumps({"step": step, "val_loss": loss}) + "\n")


def test_switches_against_the_seed_spread(tmp_path):
  curves = {
    "off_seed0": {250: 2.10, 500: 1.70},
    "off_seed1": {250: 2.12, 500: 1.69},  # spread 0.02 (step 250)
    "off_seed2": {250: 2.11, 500: 1.71},
    "chunks_seed0": {250: 2.10, 500: 1.75},  # 0.05 from off_seed0 at step 500: outside
    "chunks_seed1": {250: 2.12, 500: 1.74},
    "fp8_seed0": {250: 2.11, 500: 1.70},  # 0.01: within
    "fp8_seed1": {250: 2.12, 500: 1.70},
  }
  for run, c in curves.items():
    _write(tmp_path, "p", run, c)
  runs = [*curves, "missing_seed0"]
  lines = parity_summary.summary("p", runs, parity_summary.load(str(tmp_path), "p", runs))
  text = "\n".join(lines)
  assert "missing_seed0: no metrics" in text
  assert "3 seeds of off" in text and "): 0.0200;" in text
  chunks = next(line for line in lines if line.startswith("chunks: max"))
  assert "0.0500" in chunks and chunks.endswith("OUTSIDE the spread")
  fp8 = next(line for line in lines if line.startswith("fp8: max"))
  assert "0.0100" in fp8 and fp8.endswith("within the spread")
  # best losses: off 1.69-1.71 (mean 1.70); chunks 1.74-1.75 outside, fp8 1.70 inside
  assert "chunks: best losses 1.7400-1.7500, mean 1.7450 (outside" in text
  assert "fp8: best losses 1.7000-1.7000, mean 1.7000 (inside" in text
  # best loss - off's per seed: chunks 1.75 - 1.70, 1.74 - 1.69 (no variation: no t); fp8 0 and +0.01
  # (t = 0.005 / (0.00707 / sqrt 2) = 1.0, one degree of freedom: under 12.71)
  assert "chunks: best loss - off's per seed +0.0500, +0.0500: mean +0.0500, paired t undefined" in text
  assert (
    "fp8: best loss - off's per seed +0.0000, +0.0100: mean +0.0050, paired t = +1.00 (1 degree of "
    "freedom: not significant at 5%, bar 12.71)" in text
  )
  row = next(line for line in lines if line.lstrip().startswith("500"))
  assert row.split()[1:4] == ["1.7000", "1.6900", "1.7100"] and row.split()[-1] == "nan"


def test_runs_without_a_seed_suffix_pair_with_seed_zero(tmp_path):
  for run, c in {"off_seed0": {1: 1.0}, "off_seed1": {1: 1.1}, "chunks": {1: 1.05}}.items():
    _write(tmp_path, "q", run, c)
  runs = ["off_seed0", "off_seed1", "chunks"]
  text = "\n".join(parity_summary.summary("q", runs, parity_summary.load(str(tmp_path), "q", runs)))
  assert "chunks: max |chunks - off| of the same seed 0.0500 (seed 0 0.0500): within the spread" in text


def test_a_shift_every_seed_shares_is_significant(tmp_path):
  """Eight seeds each 0.004-0.006 worse than off's: inside the seed spread at every evaluation, but the
  paired t says the shift is real (what "Round six" found by hand for the approximate tanh)."""
  runs = []
  for s in range(8):
    base = 1.45 + 0.01 * (s % 4)  # off's seeds spread over 0.03
    _write(tmp_path, "r", f"off_seed{s}", {1: base})
    _write(tmp_path, "r", f"gelu_seed{s}", {1: base + 0.004 + 0.0005 * (s % 5)})
    runs += [f"off_seed{s}", f"gelu_seed{s}"]
  text = "\n".join(parity_summary.summary("r", runs, parity_summary.load(str(tmp_path), "r", runs)))
  assert "within the spread" in text
  line = next(x for x in text.splitlines() if x.startswith("gelu: best loss - off's"))
  assert line.endswith("(7 degrees of freedom: significant at 5%, bar 2.36)"), line

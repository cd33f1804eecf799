"""The benchmark command: figures of the real step on synthetic and prepared data, sweeps, variants,
failure rows, the JSON record and profiler traces (tiny sizes on CPU)."""

import glob
import json
import os
import subprocess
import sys

import jax
import pytest

from llm_jax import bench
from llm_jax import config as config_lib
from llm_jax.train import metrics as metrics_lib
from llm_jax.train import profiling
from llm_jax.train.prefetch import Prefetcher

TINY = [
  "model.num_layers=1",
  "model.d_model=32",
  "model.num_heads=2",
  "model.max_seq_len=16",
  "train.seq_len=16",
  "train.global_batch_size=8",
  "data.tokenizer.vocab_size=100",
  "sharding.data=8",
  "train.warmup_steps=0",
]


def tiny_config(*extra):
  return config_lib.load("configs/tiny.py", TINY + list(extra))


@pytest.fixture(scope="module")
def row():
  return bench.measure(tiny_config(), steps=3, warmup=1, synthetic=True)


def test_synthetic_row_has_every_figure(row):
  assert row["data"] == "synthetic" and row["num_devices"] == jax.device_count()
  assert row["timed_steps"] == 3 and len(row["losses"]) == 5  # compiling step + warm-up + timed
  assert all(4.0 < loss < 5.0 for loss in row["losses"])  # about ln(100) on random tokens
  assert row["compile_s"] > 0 and row["cold_start_s"] >= row["compile_s"]
  assert row["step_ms_min"] <= row["step_ms_median"] <= row["step_ms_max"]
  tokens = row["global_batch"] * row["seq_len"]
  assert row["tokens_per_s"] <= tokens / (row["step_ms_min"] / 1e3) * 1.01
  assert row["mfu"] is None  # no known peak for a CPU
  assert row["loss"] == "xla"  # train.loss_kernel=auto: XLA's loss on a CPU
  assert (
    row["gelu_kernel"] == "xla" and row["use_bias"] is True
  )  # model.gelu_kernel=auto on a CPU; tiny's biases
  assert row["program_memory_gib"] is not None and row["data_wait_ms_median"] >= 0
  assert row["flops_per_token"] > 6 * row["params"] * 0.5
  summary = bench.format_summary({**row, "status": "ok"})
  assert "tokens/s" in summary and "cold start" in summary


def test_mfu_uses_the_device_peak():
  class Dev:
    device_kind = "NVIDIA H200"
    platform = "gpu"

  assert bench.peak_flops_per_device(Dev()) == 989e12
  assert bench.peak_flops_per_device(Dev(), override_tflops=500) == 500e12
  for kind, peak in [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("TPU v5 lite", 197e12),
    ("NVIDIA L40", 181e12),
    ("NVIDIA L4", 121e12),
  ]:
    Dev.device_kind = kind  # one table: the benchmark and the training loop's MFU agree
    assert bench.peak_flops_per_device(Dev()) == metrics_lib.peak_flops(kind, "gpu") == peak, kind
  Dev.device_kind, Dev.platform = "cpu", "cpu"
  assert bench.peak_flops_per_device(Dev()) is None


def test_prefetcher_keeps_order_and_hands_on_the_producers_error():
  items = iter([1, 2, 3])
  p = Prefetcher(lambda: next(items), depth=2)
  try:
    got = [p.get() for _ in range(3)]
    assert [item for item, _ in got] == [1, 2, 3] and all(wait >= 0 for _, wait in got)
    with pytest.raises(StopIteration):  # the producer's own exception, raised in the consumer
      p.get()
  finally:
    p.close()
  assert not p.thread.is_alive()


def test_sweep_and_variants_make_override_sets():
  c = tiny_config("train.microbatches=2")  # 4 rows per pass
  sets = bench.sweep_overrides(c, "", "none,full")
  assert [s["train.microbatches"] for s in sets] == [4, 2, 1, 4, 2, 1]  # 2, 4, 8 rows per pass
  assert {s["model.remat"] for s in sets} == {"none", "full"}
  assert [s["train.microbatches"] for s in bench.sweep_overrides(c, "3,8", "none")] == [1]
  assert bench.parse_variant("model.remat=full --config.train.microbatches=2") == {
    "model.remat": "full",
    "train.microbatches": "2",
  }
  with pytest.raises(config_lib.ConfigError, match="key=value"):
    bench.parse_variant("model.remat")


def test_rows_keep_going_past_a_bad_variant():
  rows = bench.run_rows(
    tiny_config(), [{"model.remat": "bogus"}, {"model.scan_unroll": "1"}], steps=1, warmup=0, synthetic=True
  )
  assert rows[0]["status"].startswith("error: ConfigError") and "model.remat" in rows[0]["status"]
  assert rows[1]["status"] == "ok" and rows[1]["overrides"] == {"model.scan_unroll": "1"}
  table = bench.format_table(rows)
  assert "model.remat=bogus" in table and "model.scan_unroll=1" in table
  with pytest.raises(config_lib.ConfigError):  # a single configuration fails loudly
    bench.run_rows(tiny_config(), [{"model.remat": "bogus"}], steps=1, warmup=0, synthetic=True)


def test_profile_steps_write_a_trace(tmp_path):
  bench.measure(
    tiny_config("train.profile_steps=1,2"), steps=1, warmup=1, synthetic=True, workdir=str(tmp_path)
  )
  traces = glob.glob(str(tmp_path / "tb" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(traces) == 1


def test_profile_steps_parse():
  assert profiling.parse_profile_steps("") is None
  assert profiling.parse_profile_steps("3,5") == (3, 5)
  for bad in ("5", "5,3", "a,b", "-1,2"):
    with pytest.raises(ValueError, match="profile_steps"):
      profiling.parse_profile_steps(bad)


def test_prepared_data_row(tmp_path):
  text = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))
  (tmp_path / "train.txt").write_text(text)
  (tmp_path / "val.txt").write_text(text[:3000])
  c = tiny_config(
    "data.tokenizer.type=char",
    "data.tokenizer.vocab_size=300",
    f"data.corpus={tmp_path / 'train.txt'}",
    f"data.val_corpus={tmp_path / 'val.txt'}",
    f"data.cache_dir={tmp_path / 'cache'}",
    "data.near_dup_threshold=0.0",
    "data.dedup_exact=False",
    "data.min_doc_chars=1",
  )
  row = bench.measure(c, steps=2, warmup=0, synthetic=False)
  assert row["data"] == "prepared" and row["host_batch_ms_median"] is not None
  assert row["losses"][-1] < row["losses"][0] + 0.5


def _cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "llm_jax.bench", *args],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )


def test_cli_writes_json(tmp_path):
  out = tmp_path / "bench.json"
  proc = _cli(
    "--config=configs/tiny.py",
    "--synthetic",
    "--steps=1",
    "--warmup=0",
    f"--json={out}",
    *[f"--config.{o}" for o in TINY],
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "tokens/s" in proc.stdout and "cold start" in proc.stdout
  record = json.loads(out.read_text())
  assert record["config"] == "configs/tiny.py" and record["rows"][0]["status"] == "ok"


def test_cli_usage_errors_exit_2():
  missing = _cli("--synthetic")
  assert missing.returncode == 2 and "--config" in missing.stderr
  typo = _cli("--config=configs/tiny.py", "--config.train.stpes=3")
  assert typo.returncode == 2 and "train.stpes" in typo.stderr

"""Training metrics: TensorBoard events (tb/) and metrics.jsonl, throughput/MFU/memory, alerts, samples.

Only process 0 writes; other processes get a writer that drops everything. metrics.jsonl holds one JSON
object per logged step, always with `step` and `loss`; TensorBoard tags are grouped as train/, val/,
perf/, memory/, alerts/ and samples.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import statistics
import sys
from typing import Any

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"

# Dense bf16 peak FLOP/s per chip (vendor data sheets, without 2:4 sparsity), matched by substring of
# device_kind (lowercase), first match wins: the one table for the loop's MFU and `python -m llm_jax.bench`.
PEAK_FLOPS = (
  ("gh200", 989e12),
  ("h200", 989e12),
  ("h100 pcie", 756e12),
  ("h100", 989e12),  # SXM
  ("b200", 2250e12),
  ("a100", 312e12),
  ("l40s", 362e12),
  ("l40", 181e12),
  ("l4", 121e12),
  ("a10", 125e12),
  ("v100", 125e12),
  ("tpu v6", 918e12),
  ("tpu v5p", 459e12),
  ("tpu v5", 197e12),  # v5 lite / v5e
  ("tpu v4", 275e12),
)

# Where each metric goes in TensorBoard (metrics.jsonl keeps the short names); per-domain keys
# `val_loss/D` and `val_bpb/D` go to val/loss/D and val/bits_per_byte/D.
TB_TAGS = {
  "loss": "train/loss",
  "lr": "train/lr",
  "grad_norm": "train/grad_norm",
  "param_norm": "train/param_norm",
  "skipped_steps": "train/skipped_steps",
  "tokens_seen": "train/tokens_seen",
  "tokens_per_s": "perf/tokens_per_s",
  "step_time_s": "perf/step_time_s",
  "data_wait_s": "perf/data_wait_s",
  "mfu": "perf/mfu",
  "memory_in_use_gb": "memory/in_use_gb",
  "memory_peak_gb": "memory/peak_gb",
  "memory_headroom_gb": "memory/headroom_gb",
  "val_loss": "val/loss",
  "val_ppl": "val/perplexity",
  "val_bpb": "val/bits_per_byte",
  "preflight_loss_before": "preflight/loss_before",
  "preflight_loss_after": "preflight/loss_after",
}


def tb_tag(key: str) -> str:
  """The TensorBoard tag of a metrics.jsonl key."""
  if key in TB_TAGS:
    return TB_TAGS[key]
  prefix, _, domain = key.partition("/")
  if domain and prefix in TB_TAGS:
    return f"{TB_TAGS[prefix]}/{domain}"
  return key


def peak_flops(device_kind: str, platform: str) -> float | None:
  """Dense bf16 peak FLOP/s of one chip, or None when unknown (always None on CPU)."""
  if platform == "cpu":
    return None
  kind = device_kind.lower()
  for key, value in PEAK_FLOPS:
    if key in kind:
      return value
  return None


def mfu(flops_per_token: float, tokens_per_s: float, num_devices: int, peak: float | None):
  """Model FLOPs utilization: achieved training FLOP/s over the devices' summed peak."""
  if not peak or tokens_per_s <= 0:
    return None
  return flops_per_token * tokens_per_s / (peak * num_devices)


def device_memory_stats(device) -> dict:
  """The allocator's statistics of one device (bytes_in_use, peak_bytes_in_use, bytes_limit, ...);
  empty when the backend reports none (CPU)."""
  try:
    return device.memory_stats() or {}
  except Exception:  # some backends raise instead of returning None
    return {}


def memory_stats() -> dict[str, float]:
  """In-use, peak and headroom GB of the fullest local device (empty when the backend reports none)."""
  best = None
  for d in jax.local_devices():
    s = device_memory_stats(d)
    if "bytes_in_use" not in s:
      continue
    if best is None or s["bytes_in_use"] > best["bytes_in_use"]:
      best = s
  if best is None:
    return {}
  gb = 1024**3
  out = {
    "memory_in_use_gb": best["bytes_in_use"] / gb,
    "memory_peak_gb": best.get("peak_bytes_in_use", best["bytes_in_use"]) / gb,
  }
  if best.get("bytes_limit"):
    out["memory_headroom_gb"] = (best["bytes_limit"] - out["memory_peak_gb"] * gb) / gb
  return out


class Writer:
  """TensorBoard + metrics.jsonl writer; a no-op on processes other than 0."""

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    earlier = os.path.exists(self.path)
    if earlier:  # rows an interrupted session wrote after the checkpoint this one starts from
      self._truncate_after(resume_step)
    # purge_step hides the same steps' events in TensorBoard (a fresh restart: all of them).
    purge = (resume_step + 1 if resume_step else 0) if earlier else None
    self._tb = SummaryWriter(logdir=os.path.join(workdir, TB_DIR), purge_step=purge, flush_secs=30)
    self._jsonl = open(self.path, "a")

  def _truncate_after(self, step: int) -> None:
    """Keeps rows up to `step`, the checkpoint a run restarts from (none for a fresh restart)."""
    keep, dropped = [], 0
    with open(self.path) as f:
      for line in f:
        try:
          if step > 0 and json.loads(line).get("step", 0) <= step:
            keep.append(line)
            continue
        except json.JSONDecodeError:
          pass  # a torn last line of a killed run
        dropped += 1
    if dropped:
      log.info(
        "metrics.jsonl: dropped %d rows after step %d (written after the checkpoint this "
        "session starts from)",
        dropped,
        step,
      )
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, self.path)

  @property
  def tb_dir(self) -> str:
    return os.path.join(os.path.dirname(self.path), TB_DIR)

  def write(self, step: int, row: dict[str, Any]) -> None:
    """One metrics.jsonl row and a TensorBoard scalar per numeric value (text for lists of samples)."""
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in row.items()}}
    for key, value in row.items():
      if key == "step" or value is None:
        continue
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        self._tb.add_scalar(tb_tag(key), value, step)
    self._jsonl.write(json.dumps(row, allow_nan=True) + "\n")
    self._jsonl.flush()

  def text(self, step: int, tag: str, text: str) -> None:
    if self.enabled:
      self._tb.add_text(tag, text, step)

  def alert(self, step: int, kind: str, message: str) -> None:
    """A warning in the log and in TensorBoard (text under alerts/ and a 1 at alerts/<kind>)."""
    log.warning("ALERT step %d: %s", step, message)
    if self.enabled:
      self._tb.add_text(f"alerts/{kind}", message, step)
      self._tb.add_scalar(f"alerts/{kind}", 1.0, step)

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self.enabled = False


def _plain(v):
  if isinstance(v, (np.generic, np.ndarray)) and np.ndim(v) == 0:
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return v  # json writes NaN/Infinity; readers of a diverged run should see it
  return v


class Alerts:
  """Throughput drops below a share of the running median; validation loss stops improving."""

  def __init__(self, writer: Writer, throughput_share: float, plateau_evals: int, window: int = 50):
    self.writer = writer
    self.share = throughput_share
    self.plateau_evals = plateau_evals
    self.rates = collections.deque(maxlen=window)
    self.best = math.inf
    self.since_best = 0

  def throughput(self, step: int, tokens_per_s: float) -> bool:
    fired = False
    if self.share > 0 and len(self.rates) >= 10:
      median = statistics.median(self.rates)
      if tokens_per_s < self.share * median:
        self.writer.alert(
          step,
          "throughput",
          f"tokens/s {tokens_per_s:,.0f} is below {self.share:g} x running median {median:,.0f}",
        )
        fired = True
    self.rates.append(tokens_per_s)
    return fired

  def val_loss(self, step: int, loss: float) -> bool:
    if loss < self.best:
      self.best, self.since_best = loss, 0
      return False
    self.since_best += 1
    if (
      self.plateau_evals > 0
      and self.since_best >= self.plateau_evals
      and self.since_best % self.plateau_evals == 0
    ):
      self.writer.alert(
        step,
        "plateau",
        f"validation loss has not improved on {self.best:.4f} for {self.since_best} evaluations",
      )
      return True
    return False


def progress_bar(total: int, initial: int, enabled: bool):
  """A tqdm bar on an interactive terminal (process 0), else None."""
  if not enabled or not sys.stderr.isatty():
    return None
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, smoothing=0.1)

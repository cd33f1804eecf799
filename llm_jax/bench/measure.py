"""Training-step benchmark: compile time, step time, tokens/s, MFU, peak memory and data wait.

It times the real step (`llm_jax.train.step.train_step`: AdamW, clipping, the non-finite guard,
microbatch accumulation) jitted as the training loop jits it (explicit shardings, donated state).
Data is the prepared corpus through `TrainLoader` by default, placed on the devices by the training
loop's prefetch thread; `synthetic=True` uses random tokens already on the device. The config's
`train.profile_steps=START,STOP` writes a profiler trace of those steps (counted from 0, the compiling
step) to `<workdir>/tb`. MFU uses the peak table of `llm_jax.train.metrics` (the loop's).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import statistics
import time

import jax
import numpy as np

from llm_jax import config as config_lib
from llm_jax import sharding as sharding_lib
from llm_jax.data.loader import TrainLoader
from llm_jax.data.prepare import prepare
from llm_jax.model import Decoder, ModelConfig
from llm_jax.train import metrics as metrics_lib
from llm_jax.train import optimizer as optimizer_lib
from llm_jax.train import profiling
from llm_jax.train.prefetch import Prefetcher
from llm_jax.train.state import create_state
from llm_jax.train.step import train_step, uses_loss_kernel

_STEP_KEYS = ("inputs", "targets", "segment_ids", "weights")


def peak_flops_per_device(device: jax.Device, override_tflops: float = 0.0) -> float | None:
  """Dense bf16 peak of one device in FLOP/s (`llm_jax.train.metrics.PEAK_FLOPS`; None when unknown)."""
  if override_tflops:
    return override_tflops * 1e12
  return metrics_lib.peak_flops(getattr(device, "device_kind", ""), getattr(device, "platform", ""))


class _SyntheticBatches:
  """A few batches of uniformly random tokens, made once and placed on the device, served in turn."""

  def __init__(self, config, mesh, vocab_size: int, distinct: int = 4):
    tr = config.train
    rows = tr.global_batch_size // jax.process_count()
    rng = np.random.default_rng(config.data.seed)
    self.vocab_size = vocab_size
    self.batches = []
    for _ in range(distinct):
      window = rng.integers(0, vocab_size, (rows, tr.seq_len + 1), dtype=np.int32)
      host = {"inputs": window[:, :-1], "targets": window[:, 1:]}
      self.batches.append(sharding_lib.global_batch(host, mesh))
    self._cycle = itertools.cycle(self.batches)
    self.produce_s: list[float] = []

  def next(self):
    return next(self._cycle)

  def close(self):
    pass


class _LoaderBatches:
  """Prepared data through TrainLoader; a prefetch thread loads and places batches `depth` steps ahead."""

  def __init__(self, config, mesh, depth: int = 2):
    prepared = prepare(config)
    self.vocab_size = prepared.tokenizer().vocab_size
    tr, d = config.train, config.data
    self.loader = TrainLoader(
      prepared.dir,
      "train",
      tr.seq_len,
      tr.global_batch_size,
      d.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      segment_windows=d.segment_windows,
      mixture=d.mixture,
      window_offsets=d.window_offsets,
    )
    self.mesh = mesh
    self.produce_s: list[float] = []
    self._prefetch = Prefetcher(self._produce, depth=depth)

  def _produce(self):
    t = time.perf_counter()
    local = {k: v for k, v in next(self.loader).items() if k in _STEP_KEYS}
    batch = sharding_lib.global_batch(local, self.mesh)
    self.produce_s.append(time.perf_counter() - t)
    return batch

  def next(self):
    return self._prefetch.get()[0]

  def close(self):
    self._prefetch.close()


def _program_bytes(compiled) -> int | None:
  """Device memory the compiled step needs by XLA's estimate (arguments + outputs + temporaries)."""
  try:
    m = compiled.memory_analysis()
    return int(
      m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    )
  except Exception:  # not every backend reports it
    return None


def measure(
  config, *, steps: int, warmup: int, synthetic: bool, workdir: str = "runs/bench", peak_tflops: float = 0.0
) -> dict:
  """Compiles and runs the real train step; returns one result row (a JSON-able dict)."""
  config_lib.validate(config, jax.device_count())
  tr = config.train
  mesh = sharding_lib.make_mesh(config)
  data = (
    _SyntheticBatches(config, mesh, config.data.tokenizer.vocab_size)
    if synthetic
    else _LoaderBatches(config, mesh)
  )
  try:
    model_cfg = ModelConfig.from_config(config, tokenizer_size=data.vocab_size)
    model = Decoder(model_cfg)
    optimizer = optimizer_lib.make_optimizer(config)
    with sharding_lib.activate(mesh, config):
      t = time.perf_counter()
      state, state_shardings = create_state(model, optimizer, mesh, config, tr.seed)
      jax.block_until_ready(state)
      init_s = time.perf_counter() - t
      batch = data.next()
      batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
      step_fn = jax.jit(
        functools.partial(train_step, model=model, optimizer=optimizer, config=config),
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
      )
      t = time.perf_counter()
      compiled = step_fn.lower(state, batch).compile()
      compile_s = time.perf_counter() - t
      t = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      first_step_s = time.perf_counter() - t
      losses = [float(metrics["loss"])]
      profiler = profiling.StepProfiler(tr.profile_steps, os.path.join(workdir, "tb"))
      step_s, wait_s = [], []
      for i in range(1, 1 + warmup + steps):
        t0 = time.perf_counter()
        batch = data.next()
        t1 = time.perf_counter()
        profiler.before(i)
        with profiler.annotate(i):
          state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        t2 = time.perf_counter()
        profiler.after(i, metrics)
        losses.append(float(metrics["loss"]))
        if i > warmup:
          step_s.append(t2 - t1)
          wait_s.append(t1 - t0)
      profiler.close()
  finally:
    data.close()

  tokens = tr.global_batch_size * tr.seq_len
  total_s = statistics.median(s + w for s, w in zip(step_s, wait_s, strict=True)) if step_s else float("nan")
  tokens_per_s = tokens / total_s
  flops_per_token = model_cfg.flops_per_token(tr.seq_len)
  device = jax.devices()[0]
  peak = peak_flops_per_device(device, peak_tflops)
  mfu = metrics_lib.mfu(flops_per_token, tokens_per_s, jax.device_count(), peak)
  peak_gib = metrics_lib.memory_stats().get("memory_peak_gb")  # the fullest local device
  program_bytes = _program_bytes(compiled)
  micro = max(1, int(tr.microbatches))
  return {
    "device": getattr(device, "device_kind", device.platform),
    "num_devices": jax.device_count(),
    "data": "synthetic" if synthetic else "prepared",
    "global_batch": tr.global_batch_size,
    "microbatches": micro,
    "batch_per_pass": tr.global_batch_size // micro,
    "seq_len": tr.seq_len,
    "remat": config.model.remat,
    "scan_layers": bool(config.model.scan_layers),
    "compute_dtype": model_cfg.dtype,
    "logits_dtype": getattr(model_cfg, "logits_dtype", "float32"),
    "attention": model_cfg.attention,
    "loss": "pallas" if uses_loss_kernel(config, mesh=mesh) else "xla",
    "gelu_kernel": model_cfg.gelu_kernel,  # as resolved here: mosaic where model.gelu_kernel ran the kernel
    "use_bias": bool(model_cfg.use_bias),
    "params": model_cfg.param_count(),
    "init_s": round(init_s, 3),
    "compile_s": round(compile_s, 3),
    "first_step_s": round(first_step_s, 3),
    "cold_start_s": round(compile_s + first_step_s, 3),
    "step_ms_median": round(1e3 * statistics.median(step_s), 3) if step_s else None,
    "step_ms_min": round(1e3 * min(step_s), 3) if step_s else None,
    "step_ms_max": round(1e3 * max(step_s), 3) if step_s else None,
    "data_wait_ms_median": round(1e3 * statistics.median(wait_s), 3) if wait_s else None,
    "data_wait_ms_total": round(1e3 * sum(wait_s), 3),
    "host_batch_ms_median": (round(1e3 * statistics.median(data.produce_s), 3) if data.produce_s else None),
    "tokens_per_s": round(tokens_per_s, 1),
    "flops_per_token": flops_per_token,
    "mfu": round(mfu, 4) if mfu is not None else None,
    "peak_memory_gib": round(peak_gib, 2) if peak_gib else None,
    "program_memory_gib": round(program_bytes / 2**30, 2) if program_bytes else None,
    "losses": losses,
    "timed_steps": len(step_s),
  }


def sweep_overrides(config, batches: str, remats: str) -> list[dict]:
  """Override sets for batch-per-pass x remat (batches that do not divide the global batch are skipped)."""
  gb = config.train.global_batch_size
  per_pass = gb // max(1, config.train.microbatches)
  sizes = (
    [int(b) for b in batches.split(",") if b.strip()]
    if batches
    else sorted({max(1, per_pass // 2), per_pass, min(gb, 2 * per_pass)})
  )
  out = []
  for remat in [r.strip() for r in remats.split(",") if r.strip()]:
    for b in sizes:
      if gb % b:
        logging.warning("skipping batch per pass %d: it does not divide train.global_batch_size=%d", b, gb)
        continue
      out.append({"train.microbatches": gb // b, "model.remat": remat})
  return out


def parse_variant(text: str) -> dict:
  """'a.b=1 c.d=x' -> {'a.b': '1', 'c.d': 'x'}."""
  out = {}
  for item in text.split():
    if "=" not in item:
      raise config_lib.ConfigError(f"--variant item {item!r} must look like key=value")
    key, value = item.split("=", 1)
    out[key.removeprefix("--config.").removeprefix("config.")] = value
  return out


def _is_oom(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def run_rows(base_config, override_sets: list[dict], **kwargs) -> list[dict]:
  """Measures every override set on a copy of the config; out-of-memory rows are kept and marked."""
  rows = []
  for overrides in override_sets or [{}]:
    config = base_config.copy_and_resolve_references()
    for key, value in overrides.items():
      config_lib.set_key(config, key, value)
    label = " ".join(f"{k}={v}" for k, v in overrides.items()) or "(config)"
    logging.info("bench: %s", label)
    try:
      row = measure(config, **kwargs)
      row["status"] = "ok"
    except Exception as e:  # one failing row must not lose the others
      if not (_is_oom(e) or len(override_sets) > 1):
        raise
      logging.exception("bench row %s failed", label)
      row = {"status": "oom" if _is_oom(e) else f"error: {type(e).__name__}: {str(e)[:300]}"}
    row["overrides"] = {k: str(v) for k, v in overrides.items()}
    row["label"] = label
    rows.append(row)
    jax.clear_caches()
  return rows


def format_table(rows: list[dict]) -> str:
  """One line per row: the figures a reader compares."""
  head = (
    "variant",
    "batch/pass",
    "remat",
    "scan",
    "compile_s",
    "step_ms",
    "wait_ms",
    "tokens/s",
    "MFU",
    "peak_GiB",
    "program_GiB",
    "loss",
  )
  lines = [head]
  for r in rows:
    if r.get("status") != "ok":
      lines.append((r["label"], "", "", "", "", "", "", r.get("status", "?")[:60], "", "", "", ""))
      continue
    lines.append(
      (
        r["label"],
        f"{r['batch_per_pass']}x{r['microbatches']}",
        r["remat"],
        str(r["scan_layers"]),
        f"{r['compile_s']:.1f}",
        f"{r['step_ms_median']:.1f}",
        f"{r['data_wait_ms_median']:.2f}",
        f"{r['tokens_per_s']:,.0f}",
        f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-",
        f"{r['peak_memory_gib']}" if r["peak_memory_gib"] is not None else "-",
        f"{r['program_memory_gib']}" if r["program_memory_gib"] is not None else "-",
        f"{r['losses'][-1]:.4f}",
      )
    )
  widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
  return "\n".join(
    "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
  )


def format_summary(row: dict) -> str:
  """The single-configuration report."""
  if row.get("status") != "ok":
    return f"bench: {row.get('status')}"
  mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a (unknown peak)"
  return "\n".join(
    [
      f"device            {row['num_devices']} x {row['device']}  ({row['data']} data)",
      f"batch             {row['global_batch']} x {row['seq_len']} tokens "
      f"({row['microbatches']} passes of {row['batch_per_pass']}), remat={row['remat']}, "
      f"scan_layers={row['scan_layers']}, logits {row['logits_dtype']}",
      f"compile           {row['compile_s']:.1f} s   first step {row['first_step_s']:.2f} s   "
      f"cold start {row['cold_start_s']:.1f} s",
      f"step (median)     {row['step_ms_median']:.1f} ms  (min {row['step_ms_min']:.1f}, "
      f"max {row['step_ms_max']:.1f}, {row['timed_steps']} steps)",
      f"data wait         {row['data_wait_ms_median']:.2f} ms median, "
      f"{row['data_wait_ms_total']:.1f} ms total",
      f"tokens/s          {row['tokens_per_s']:,.0f}",
      f"MFU               {mfu}",
      f"peak memory       {row['peak_memory_gib']} GiB (allocator), "
      f"{row['program_memory_gib']} GiB (XLA estimate)",
    ]
  )

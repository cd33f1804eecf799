"""The training loop: data -> sharded state -> jitted pure step -> eval, metrics, checkpoints.

`train(config, workdir)` is the whole job. It prepares data when missing, resumes from the latest
complete checkpoint in WORKDIR automatically, and returns a summary dict. Step N is dispatched before
step N-1's metrics are fetched, so the host never waits on the device inside a step; it syncs only at
evaluation, sampling and checkpoint steps. Process 0 alone writes files and logs metrics; every process
loads only its rows of each global batch.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import config as config_lib
from llm_jax import sharding as sharding_lib
from llm_jax.model import Decoder, ModelConfig
from llm_jax.train import checkpoint as ckpt_lib
from llm_jax.train import metrics as metrics_lib
from llm_jax.train import optimizer as optimizer_lib
from llm_jax.train import preflight as preflight_lib
from llm_jax.train import profiling
from llm_jax.train import run_dir
from llm_jax.train import state as state_lib
from llm_jax.train import step as step_lib
from llm_jax.train.prefetch import Prefetcher

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 75  # CLI exit code after a clean stop on SIGTERM/SIGINT (resume by running again)


class TrainingError(RuntimeError):
  """The run stopped on a non-finite step (or too many in a row); the message names the step."""


# ------------------------------------------------------------------ signals


class StopFlag:
  """SIGTERM and the first Ctrl-C ask the loop to save and stop; a second Ctrl-C interrupts at once."""

  def __init__(self):
    self.signal_name: str | None = None
    self._old = {}

  def __bool__(self):
    return self.signal_name is not None

  def _handle(self, signum, frame):
    del frame
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name
    log.warning("%s received: saving a checkpoint and stopping (Ctrl-C again to abort at once)",
                self.signal_name)

  def install(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def restore(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}

  def agreed(self) -> bool:
    """True when any process was asked to stop (a collective on more than one process)."""
    if jax.process_count() == 1:
      return bool(self)
    from jax.experimental import multihost_utils  # noqa: PLC0415
    flags = multihost_utils.process_allgather(np.array([1 if self else 0], np.int32))
    return bool(np.max(flags))


# ------------------------------------------------------------------ setup


@dataclasses.dataclass
class Setup:
  """Everything the loop needs, built once from the config."""
  config: Any
  prepared: Any
  tokenizer: Any
  model_cfg: ModelConfig
  model: Decoder
  optimizer: Any
  mesh: Any
  state_shardings: Any
  abstract_state: Any
  finetune: Any = None  # llm_jax.finetune.hooks.Finetune when init_from or SFT data is set


def _prepare_data(config):
  from llm_jax.data import prepare as prepare_lib  # noqa: PLC0415
  prepare = prepare_lib.prepare
  if config.get("reuse_source_tokenizer") and config.get("init_from"):
    from llm_jax.finetune import hooks as finetune_hooks  # noqa: PLC0415
    prepare = finetune_hooks.prepare_data  # the source's tokenizer.model instead of a new one
  if jax.process_count() == 1:
    return prepare(config)
  from jax.experimental import multihost_utils  # noqa: PLC0415
  prepared = prepare(config) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("llm_jax prepared data")
  return prepared or prepare(config)


def build(config) -> Setup:
  """Data, tokenizer, resolved model config, mesh and state shardings (no parameters allocated)."""
  config_lib.validate(config, jax.device_count())
  prepared = _prepare_data(config)
  tokenizer = prepared.tokenizer()
  model_cfg = ModelConfig.from_config(config, tokenizer.vocab_size)
  if model_cfg.vocab_size < tokenizer.vocab_size:
    raise config_lib.ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the "
                                 f"tokenizer's {tokenizer.vocab_size} pieces ({prepared.tokenizer_path})")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.vocab_size = model_cfg.vocab_size  # config.json then needs no tokenizer to rebuild
  model = Decoder(model_cfg)
  optimizer = optimizer_lib.make_optimizer(config)
  mesh = sharding_lib.make_mesh(config)
  abstract, shardings = state_lib.state_shardings(model, optimizer, mesh, config)
  from llm_jax.finetune import hooks as finetune_hooks  # noqa: PLC0415
  finetune = finetune_hooks.Finetune.create(config, model, mesh, tokenizer, prepared.tokenizer_sha256)
  if finetune is not None and finetune.lora is not None:  # the state is the adapters
    abstract, shardings = finetune.state_shardings(optimizer)
  return Setup(config, prepared, tokenizer, model_cfg, model, optimizer, mesh, shardings, abstract,
               finetune)


def _make_loader(setup: Setup):
  from llm_jax.data import loader as loader_lib  # noqa: PLC0415
  c = setup.config
  # The block of batch rows this process's devices hold (processes holding the same rows load them all).
  index, count = sharding_lib.process_batch_slice(setup.mesh)
  if setup.finetune is not None and setup.finetune.sft_file:
    return setup.finetune.make_loader(index, count)
  return loader_lib.TrainLoader(
      setup.prepared.dir, "train", c.train.seq_len, c.train.global_batch_size, c.data.seed,
      process_index=index, process_count=count,
      segment_windows=c.data.segment_windows, mixture=c.data.mixture,
      window_offsets=c.data.window_offsets)


def _eval_batches(setup: Setup) -> list[dict[str, np.ndarray]]:
  from llm_jax.data import loader as loader_lib  # noqa: PLC0415
  c = setup.config
  index, count = sharding_lib.process_batch_slice(setup.mesh)
  return list(loader_lib.eval_batches(
      setup.prepared.dir, "val", c.train.seq_len, c.train.global_batch_size,
      max_batches=c.train.eval_batches or None, process_index=index, process_count=count))


def _check_profile(spec: str) -> None:
  try:
    profiling.parse_profile_steps(spec)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from e


# ------------------------------------------------------------------ the loop


class _Run:
  """Mutable bookkeeping of one training session."""

  def __init__(self, setup: Setup, workdir: str, writer, alerts, total: int, start: int,
               skipped: int):
    c = setup.config
    self.setup, self.workdir, self.writer, self.alerts = setup, workdir, writer, alerts
    self.total, self.step = total, start
    self.skipped, self.consecutive = skipped, 0
    self.tokens_per_step = c.train.global_batch_size * c.train.seq_len
    self.schedule = optimizer_lib.learning_rate_schedule(c)
    self.flops_per_token = setup.model_cfg.flops_per_token(c.train.seq_len)
    dev = jax.devices()[0]
    self.peak = metrics_lib.peak_flops(dev.device_kind, dev.platform)
    self.last_t: float | None = None
    self.timed_s, self.timed_steps, self.wait_s, self.waited_steps = 0.0, 0, 0.0, 0
    self.last_loss = math.nan
    self.last_val: float | None = None
    self.saved_step: int | None = None
    self.bar = None

  def finish(self, step: int, metrics, wait_s: float) -> dict | None:
    """Fetches one step's metrics (the host sync), applies the NaN policy, returns its log row."""
    m = jax.device_get(metrics)
    now = time.perf_counter()
    if self.last_t is not None:  # the first step of a session is compilation: not timed
      self.timed_s += now - self.last_t
      self.timed_steps += 1
    self.last_t = now
    self.wait_s += wait_s
    self.waited_steps += 1
    tr = self.setup.config.train
    loss = float(m["loss"])
    if not bool(m["finite"]):
      self.skipped += 1
      self.consecutive += 1
      what = f"non-finite loss or gradients at step {step} (loss={loss}, grad norm={float(m['grad_norm'])})"
      if tr.nan_policy == "abort":
        raise TrainingError(f"{what}; train.nan_policy=abort: stopping without saving, the last "
                            f"checkpoint (step {self.saved_step}) is untouched")
      log.warning("%s: update skipped (%d in a row, %d in all)", what, self.consecutive, self.skipped)
      if self.consecutive >= tr.max_consecutive_skips:
        raise TrainingError(f"{what}; {self.consecutive} non-finite steps in a row reached "
                            f"train.max_consecutive_skips={tr.max_consecutive_skips}: stopping; the "
                            f"last checkpoint is step {self.saved_step}")
    else:
      self.consecutive = 0
      self.last_loss = loss
    if self.bar is not None:
      self.bar.update(1)
    if step % max(1, tr.log_every) and step != self.total:
      return None
    return self.row(step, m)

  def row(self, step: int, m) -> dict:
    row = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
           "param_norm": float(m["param_norm"]),
           "lr": float(self.schedule(max(0, step - 1 - self.skipped))),
           "skipped_steps": self.skipped, "tokens_seen": step * self.tokens_per_step}
    if self.waited_steps:
      row["data_wait_s"] = self.wait_s / self.waited_steps
    if self.timed_steps:
      step_time = self.timed_s / self.timed_steps
      tps = self.tokens_per_step / step_time
      row.update(step_time_s=step_time, tokens_per_s=tps)
      mfu = metrics_lib.mfu(self.flops_per_token, tps, jax.device_count(), self.peak)
      if mfu is not None:
        row["mfu"] = mfu
      self.alerts.throughput(step, tps)
    row.update(metrics_lib.memory_stats())
    self.timed_s, self.timed_steps, self.wait_s, self.waited_steps = 0.0, 0, 0.0, 0
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row.get('tokens_per_s', 0):,.0f}",
                           refresh=False)
    return row

  def pause_timer(self):
    """Eval/sampling/checkpoint time is not step time."""
    self.last_t = time.perf_counter()


def eval_sums(params, batch, token_bytes_V, *, model, num_domains: int):
  """`step.eval_step`'s sums plus the UTF-8 bytes of the weighted targets, overall and per domain."""
  out = step_lib.eval_step(params, batch, model=model, num_domains=num_domains)
  targets_BL = batch["targets"]
  w_BL = batch.get("weights", jnp.ones(targets_BL.shape, jnp.float32)).astype(jnp.float32)
  bytes_BL = jnp.take(token_bytes_V, targets_BL, axis=0, mode="fill", fill_value=0)
  bytes_BL = bytes_BL.astype(jnp.float32) * w_BL
  dom = batch.get("domain_ids", jnp.zeros(targets_BL.shape, jnp.int32)).reshape(-1)
  return {**out, "bytes": jnp.sum(bytes_BL),
          "domain_bytes": jax.ops.segment_sum(bytes_BL.reshape(-1), dom, num_domains)}


def _token_bytes(tokenizer, vocab_size: int) -> np.ndarray:
  """[vocab_size] int32 UTF-8 bytes of each id (0 for specials and the padded embedding rows)."""
  tb = np.zeros(vocab_size, np.int32)
  src = np.asarray(tokenizer.token_bytes(), np.int32)[:vocab_size]
  tb[:len(src)] = src
  return tb


def _evaluate(params, eval_fn, batches, mesh, domains) -> dict[str, float]:
  """val_loss, val_ppl and val_bpb (bits per byte), per domain too when there are several."""
  if not batches:
    return {}
  # Every batch is dispatched before the one fetch; batch sums are added on the host in float64.
  outs = jax.device_get([eval_fn(params, sharding_lib.global_batch(b, mesh)) for b in batches])
  host = {k: np.sum([np.asarray(o[k], np.float64) for o in outs], axis=0) for k in outs[0]}
  tokens = float(host["tokens"])
  if tokens <= 0:
    return {}
  nll = float(host["nll_sum"])
  val = nll / tokens
  row = {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
  if "bytes" in host and host["bytes"] > 0:
    row["val_bpb"] = nll / (math.log(2) * float(host["bytes"]))
  if len(domains) > 1:
    for i, name in enumerate(domains):
      n = float(host["domain_tokens"][i])
      if n > 0:
        row[f"val_loss/{name}"] = float(host["domain_nll_sum"][i]) / n
      if "domain_bytes" in host and host["domain_bytes"][i] > 0:
        row[f"val_bpb/{name}"] = float(host["domain_nll_sum"][i]) / (
            math.log(2) * float(host["domain_bytes"][i]))
  return row


def train(config, workdir: str, *, batch_hook: Callable | None = None,
          loader_factory: Callable | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir` up to the budget; returns a summary dict.

  `batch_hook(step, batch) -> batch` (tests) sees each host batch before it goes to the devices;
  `loader_factory(setup)` replaces the data pipeline's TrainLoader.
  """
  t_start = time.time()
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  setup = build(config)
  c = setup.config
  tr = c.train
  total = config_lib.total_steps(c)
  _check_profile(tr.profile_steps)  # before anything slow

  # Every process checks (it only reads), so all stop together on a mismatch.
  run_dir.check_resume(workdir, c, setup.model_cfg, setup.prepared.tokenizer_sha256)
  ckpts = ckpt_lib.Checkpoints.for_training(workdir, c)
  latest = ckpts.latest_step()
  if is_main:
    run_dir.write(workdir, c, setup.prepared, start_step=latest or 0)
    log.info("model: %s parameters (%s without embeddings), %.3g training FLOPs/token",
             f"{setup.model_cfg.param_count():,}",
             f"{setup.model_cfg.param_count(include_embedding=False):,}",
             setup.model_cfg.flops_per_token(tr.seq_len))
    log.info("mesh %s over %d %s devices; parameters:\n%s", dict(setup.mesh.shape), jax.device_count(),
             jax.devices()[0].device_kind,
             sharding_lib.spec_table(setup.abstract_state.params, setup.state_shardings.params))

  loader = loader_factory(setup) if loader_factory else _make_loader(setup)
  target = ckpt_lib.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
  if latest is not None:
    start, state, data_state = ckpts.restore(target, fallback=tr.restore_fallback)
    loader.set_state(data_state)
    log.info("resumed from the checkpoint at step %d in %s", start, ckpts.directory)
  else:
    start = 0
    create = functools.partial(state_lib.create_state, setup.model, setup.optimizer, setup.mesh, c,
                               tr.seed)
    state = (setup.finetune.init_state(setup.optimizer, tr.seed, create) if setup.finetune is not None
             else create()[0])
  skipped = int(jax.device_get(state.skipped))
  if start >= total:
    log.info("the run is already at step %d of %d: nothing to do (raise train.steps or train.tokens "
             "to continue)", start, total)
    ckpts.close()
    return {"step": start, "total_steps": total, "status": "complete", "workdir": workdir}

  writer = metrics_lib.Writer(workdir, enabled=is_main, resume_step=start)
  alerts = metrics_lib.Alerts(writer, tr.throughput_alert, tr.plateau_evals)
  run = _Run(setup, workdir, writer, alerts, total, start, skipped)
  run.saved_step = latest
  stop = StopFlag().install()
  prefetch = Prefetcher(lambda: (next(loader), loader.get_state()))  # (batch, state after it)
  status = "complete"
  try:
    with sharding_lib.activate(setup.mesh, c):
      status = _loop(run, state, prefetch, ckpts, stop, batch_hook, start)
  finally:
    stop.restore()
    prefetch.close()
    if run.bar is not None:
      run.bar.close()
    writer.close()
    ckpts.close()
  summary = {"step": run.step, "total_steps": total, "status": status, "loss": run.last_loss,
             "val_loss": run.last_val, "skipped_steps": run.skipped, "workdir": workdir,
             "wall_s": time.time() - t_start}
  log.info("summary: %s", summary)
  return summary


def _loop(run: _Run, state, prefetch: Prefetcher, ckpts, stop: StopFlag, batch_hook,
          start: int) -> str:
  setup = run.setup
  c, tr, mesh = setup.config, setup.config.train, setup.mesh
  replicated = sharding_lib.replicated(mesh)
  (batch_np, data_state), wait_s = prefetch.get()
  if batch_hook is not None:
    batch_np = batch_hook(start, batch_np)
  batch_shardings = {k: sharding_lib.batch_sharding(mesh, v.ndim) for k, v in batch_np.items()}
  step_fn = jax.jit(
      functools.partial(step_lib.train_step, model=setup.model, optimizer=setup.optimizer, config=c),
      in_shardings=(setup.state_shardings, batch_shardings),
      out_shardings=(setup.state_shardings, replicated), donate_argnums=0)
  ft = setup.finetune
  model_params = ft.model_params if ft is not None else (lambda p: p)  # LoRA: base + adapters
  if ft is not None and ft.lora is not None:
    step_fn = ft.step_fn(setup.model, setup.optimizer, setup.state_shardings, batch_shardings,
                         replicated)
  num_domains = max(1, len(setup.prepared.domains))
  token_bytes_V = jax.device_put(_token_bytes(setup.tokenizer, setup.model_cfg.vocab_size), replicated)
  eval_jit = jax.jit(functools.partial(eval_sums, model=setup.model, num_domains=num_domains),
                     out_shardings=replicated)
  eval_fn = lambda params, batch: eval_jit(params, batch, token_bytes_V)  # noqa: E731
  eval_batches = _eval_batches(setup) if tr.eval_every > 0 else []
  sft_eval = (ft.sft_eval_batches(*sharding_lib.process_batch_slice(setup.mesh))
              if ft is not None and tr.eval_every > 0 else [])
  if tr.eval_every > 0 and not eval_batches:
    log.warning("the val split is empty: no evaluation")
  sampler = None
  if tr.sample_every > 0:
    sampler = metrics_lib.Sampler(setup.model_cfg, setup.tokenizer, tr.sample_prompts.split(","),
                                  tr.sample_tokens, seed=tr.seed, mesh=mesh)

  batch = sharding_lib.global_batch(batch_np, mesh)
  if tr.preflight and start == 0 and (ft is None or ft.lora is None):  # LoRA: the state is adapters
    figures = preflight_lib.run(state, batch, model=setup.model, config=c, tokenizer=setup.tokenizer,
                                eval_fn=eval_fn, state_shardings=setup.state_shardings,
                                batch_shardings=batch_shardings)
    run.writer.write(0, {"loss": figures["preflight_loss_before"], **figures})
  run.bar = metrics_lib.progress_bar(run.total, start, jax.process_index() == 0)
  log.info("training steps %d -> %d (%d tokens per step)", start, run.total, run.tokens_per_step)

  pending = None
  step = start
  status = "complete"
  # Every process traces its own devices into WORKDIR/tb/plugins/profile (train.profile_steps).
  profiler = profiling.StepProfiler(tr.profile_steps, os.path.join(run.workdir, metrics_lib.TB_DIR))
  try:
    while True:
      profiler.before(step)
      with profiler.annotate(step):
        state, metrics = step_fn(state, batch)
      profiler.after(step, state)
      step += 1
      run.step = step
      if pending is not None:
        row = run.finish(*pending)
        if row is not None:
          run.writer.write(pending[0], row)
      pending = (step, metrics, wait_s)

      at_end = step >= run.total
      stop_now = (bool(stop) if jax.process_count() == 1 else
                  (step % max(1, tr.log_every) == 0 or at_end) and stop.agreed())
      do_eval = tr.eval_every > 0 and (step % tr.eval_every == 0 or at_end) and eval_batches
      do_sample = sampler is not None and (step % tr.sample_every == 0 or at_end)
      do_save = step % max(1, tr.checkpoint_every) == 0 or at_end or stop_now
      if do_eval or do_sample or do_save:
        row = run.finish(*pending) or {}
        pending = None
        if do_eval:
          row.update(_evaluate(model_params(state.params), eval_fn, eval_batches, mesh,
                               setup.prepared.domains))
          if sft_eval:
            row["val_loss/sft"] = _evaluate(model_params(state.params), eval_fn, sft_eval, mesh,
                                            ["sft"]).get("val_loss")
          if "val_loss" in row:
            run.last_val = row["val_loss"]
            run.alerts.val_loss(step, row["val_loss"])
            log.info("step %d: loss %.4f, val loss %.4f", step, run.last_loss, row["val_loss"])
        if do_sample:
          texts = sampler(model_params(state.params))
          for prompt, text in zip(sampler.prompts, texts):
            log.info("sample at step %d: %r", step, text)
          run.writer.text(step, "samples", "\n\n".join(f"```\n{t}\n```" for t in texts))
          row["samples"] = texts
        if row:
          row.setdefault("loss", run.last_loss)
          run.writer.write(step, row)
        if do_save:
          ckpts.save(step, state, data_state)
          run.saved_step = step
        run.writer.flush()
        run.pause_timer()
      if at_end:
        break
      if stop_now:
        status = f"stopped by {stop.signal_name or 'another process'}"
        log.warning("%s at step %d; checkpoint saved. Run the same command to resume.", status, step)
        break
      (batch_np, data_state), wait_s = prefetch.get()
      if batch_hook is not None:
        batch_np = batch_hook(step, batch_np)
      batch = sharding_lib.global_batch(batch_np, mesh)
  finally:
    profiler.close()
  ckpts.wait()
  return status

"""The training loop: data -> sharded state -> jitted pure step -> hooks (eval, samples, checkpoints).

`train(config, workdir, extension=None)` is the whole job. It prepares data when missing, resumes from
the latest complete checkpoint in WORKDIR automatically, and returns a summary dict. What the run trains
and how (plain pretraining, or a variant such as fine-tuning) is the `extension`
(llm_jax.train.extension.TrainExtension). Step N is dispatched before step N-1's metrics are fetched, so
the host never waits on the device inside a step; it syncs only when a hook is due (llm_jax.train.hooks).
Process 0 alone writes files and logs metrics; every process loads only its rows of each global batch.
Nothing in the run directory changes until every resume check (model shapes, tokenizer, checkpoint,
data stream) has passed.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax

from llm_jax import config as config_lib
from llm_jax import sharding as sharding_lib
from llm_jax.train import checkpoint as ckpt_lib
from llm_jax.train import hooks as hooks_lib
from llm_jax.train import metrics as metrics_lib
from llm_jax.train import optimizer as optimizer_lib
from llm_jax.train import preflight as preflight_lib
from llm_jax.train import run_dir
from llm_jax.train import setup as setup_lib
from llm_jax.train import step as step_lib
from llm_jax.train.extension import TrainExtension
from llm_jax.train.prefetch import Prefetcher
from llm_jax.train.setup import Setup, build
from llm_jax.train.signals import StopFlag

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 75  # CLI exit code after a clean stop on SIGTERM/SIGINT (resume by running again)

__all__ = ["EXIT_INTERRUPTED", "Setup", "TrainingError", "build", "train"]


class TrainingError(RuntimeError):
  """The run stopped on a non-finite step (or too many in a row); the message names the step."""


class _Run:
  """Mutable bookkeeping of one training session: step timing, the NaN policy, the log rows."""

  def __init__(self, setup: Setup, workdir: str, writer, alerts, total: int, start: int, skipped: int):
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
    self.best_step: int | None = None
    self.best_val: float | None = None
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
        raise TrainingError(
          f"{what}; train.nan_policy=abort: stopping without saving, the last "
          f"checkpoint (step {self.saved_step}) is untouched"
        )
      log.warning("%s: update skipped (%d in a row, %d in all)", what, self.consecutive, self.skipped)
      if self.consecutive >= tr.max_consecutive_skips:
        raise TrainingError(
          f"{what}; {self.consecutive} non-finite steps in a row reached "
          f"train.max_consecutive_skips={tr.max_consecutive_skips}: stopping; the "
          f"last checkpoint is step {self.saved_step}"
        )
    else:
      self.consecutive = 0
      self.last_loss = loss
    if self.bar is not None:
      self.bar.update(1)
    if step % max(1, tr.log_every) and step != self.total:
      return None
    return self.row(step, m)

  def row(self, step: int, m) -> dict:
    row = {
      "loss": float(m["loss"]),
      "grad_norm": float(m["grad_norm"]),
      "param_norm": float(m["param_norm"]),
      "lr": float(self.schedule(max(0, step - 1 - self.skipped))),
      "skipped_steps": self.skipped,
      "tokens_seen": step * self.tokens_per_step,
    }
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
      self.bar.set_postfix(
        loss=f"{row['loss']:.3f}", tok_s=f"{row.get('tokens_per_s', 0):,.0f}", refresh=False
      )
    return row

  def pause_timer(self):
    """Hook time (eval, samples, checkpoints) is not step time."""
    self.last_t = time.perf_counter()


def _restore_or_init(setup: Setup, ckpts, loader, latest: int | None):
  """(start step, state): the latest readable checkpoint (loader state set from it), or a fresh state."""
  tr = setup.config.train
  if latest is None:
    state = setup.extension.init_state(setup, tr.seed)
    line = setup.extension.describe(state)
    if line:
      log.info("%s", line)
    return 0, state
  target = ckpt_lib.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
  start, state, data_state = ckpts.restore(target, fallback=tr.restore_fallback)
  loader.set_state(data_state)  # refuses a stream of other data settings, naming the field
  log.info("resumed from the checkpoint at step %d in %s", start, ckpts.directory)
  return start, state


def _default_hooks(setup: Setup, workdir: str, ckpts, alerts, make_sampler) -> list[hooks_lib.Hook]:
  tr = setup.config.train
  index, count = setup.process_slice()
  out: list[hooks_lib.Hook] = []
  if tr.eval_every > 0:
    batches = setup_lib.eval_batches(setup)
    if not batches:
      log.warning("the val split is empty: no evaluation")
    out.append(
      hooks_lib.EvalHook(setup, tr.eval_every, batches, setup.extension.extra_eval_sets(setup, index, count))
    )
    out.append(hooks_lib.BestHook(tr.eval_every, alerts, tr.get("early_stop_patience", 0), ckpts.best()))
  if tr.sample_every > 0 and make_sampler is not None:
    out.append(hooks_lib.SampleHook(setup, tr.sample_every, make_sampler(setup)))
  elif tr.sample_every > 0:
    log.info(
      "train.sample_every=%d but no sampler was given (the train command passes one): no samples",
      tr.sample_every,
    )
  keep_best = bool(tr.get("keep_best", True)) and tr.eval_every > 0
  out.append(hooks_lib.CheckpointHook(ckpts, tr.checkpoint_every, keep_best))
  out.append(hooks_lib.ProfileHook(tr.profile_steps, workdir))
  return out


def train(
  config,
  workdir: str,
  extension: TrainExtension | None = None,
  *,
  hooks: list[hooks_lib.Hook] = (),
  make_sampler: Callable | None = None,
  batch_hook: Callable | None = None,
  loader_factory: Callable | None = None,
) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir` up to the budget; returns a summary dict.

  `extension` decides what trains and how (default: plain pretraining); `hooks` run after the
  built-in ones. `make_sampler(setup) -> sampler(params) -> [text]` gives the samples of
  train.sample_every (llm_jax.generate.samples.for_training; none without it).
  `batch_hook(step, batch) -> batch` (tests) sees each host batch before it goes to
  the devices; `loader_factory(setup)` replaces the extension's loader.
  """
  t_start = time.time()
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise run_dir.RunDirError(f"--workdir {workdir} is not a directory (give a new or existing run dir)")
  is_main = jax.process_index() == 0
  setup = build(config, extension)
  c = setup.config
  total = config_lib.total_steps(c)

  # Every process checks (it only reads), so all stop together on a mismatch.
  run_dir.check_resume(
    workdir, c, setup.model_cfg, setup.prepared.tokenizer_sha256, getattr(setup.prepared, "manifest", None)
  )
  ckpts = ckpt_lib.Checkpoints.for_training(workdir, c)
  try:
    index, count = setup.process_slice()
    loader = loader_factory(setup) if loader_factory else setup.extension.make_loader(setup, index, count)
    start, state = _restore_or_init(setup, ckpts, loader, ckpts.latest_step())
    if start >= total:  # the run directory stays as it is (its config.json describes its checkpoints)
      log.info(
        "the run is already at step %d of %d: nothing to do (raise train.steps or train.tokens to continue)",
        start,
        total,
      )
      return _summary(None, start, total, "complete", workdir, t_start, ckpts.best())
    # Every resume check has passed: only now does the run directory change.
    if is_main:
      run_dir.write(workdir, c, setup.prepared, start_step=start, extra=setup.extension.run_record())
      _log_model(setup)
    return _session(
      setup, workdir, ckpts, loader, start, state, total, list(hooks), make_sampler, batch_hook, t_start
    )
  finally:
    ckpts.close()


def _log_model(setup: Setup) -> None:
  mc = setup.model_cfg
  log.info(
    "model: %s parameters (%s without embeddings), %.3g training FLOPs/token",
    f"{mc.param_count():,}",
    f"{mc.param_count(include_embedding=False):,}",
    mc.flops_per_token(setup.config.train.seq_len),
  )
  log.info(
    "mesh %s over %d %s devices; parameters:\n%s",
    dict(setup.mesh.shape),
    jax.device_count(),
    jax.devices()[0].device_kind,
    sharding_lib.spec_table(setup.abstract_state.params, setup.state_shardings.params),
  )
  fused = step_lib.uses_loss_kernel(setup.config, mesh=setup.mesh)
  log.info(
    "training loss: %s (train.loss_kernel=%s)",
    "the fused Pallas kernel" if fused else "XLA's fusions",
    setup.config.train.get("loss_kernel", "xla"),
  )


def _summary(
  run: _Run | None,
  step: int,
  total: int,
  status: str,
  workdir: str,
  t_start: float,
  best: tuple[int, float] | None,
) -> dict[str, Any]:
  out = {
    "step": step,
    "total_steps": total,
    "status": status,
    "workdir": workdir,
    "wall_s": time.time() - t_start,
  }
  if run is not None:
    out.update(loss=run.last_loss, val_loss=run.last_val, skipped_steps=run.skipped)
    if run.best_step is not None:
      best = (run.best_step, run.best_val)
  if best is not None:
    out.update(best_step=best[0], best_val_loss=best[1])
  return out


def _session(
  setup: Setup,
  workdir: str,
  ckpts,
  loader,
  start: int,
  state,
  total: int,
  extra_hooks: list,
  make_sampler,
  batch_hook,
  t_start: float,
) -> dict[str, Any]:
  c, is_main = setup.config, jax.process_index() == 0
  skipped = int(jax.device_get(state.skipped))
  writer = metrics_lib.Writer(workdir, enabled=is_main, resume_step=start)
  alerts = metrics_lib.Alerts(writer, c.train.throughput_alert, c.train.plateau_evals)
  run = _Run(setup, workdir, writer, alerts, total, start, skipped)
  run.saved_step = ckpts.latest_step()
  hooks = (
    _default_hooks(setup, workdir, ckpts, alerts, make_sampler) + setup.extension.hooks(setup) + extra_hooks
  )
  stop = StopFlag().install()
  prefetch = Prefetcher(lambda: (next(loader), loader.get_state()))  # (batch, loader state after it)
  try:
    with sharding_lib.activate(setup.mesh, c):
      status = _loop(run, state, prefetch, hooks, stop, batch_hook, start)
    ckpts.wait()
  finally:
    stop.restore()
    prefetch.close()
    for h in hooks:
      h.close()
    if run.bar is not None:
      run.bar.close()
    writer.close()
  summary = _summary(run, run.step, total, status, workdir, t_start, None)
  if is_main and "best_step" in summary:
    run_dir.update_record(workdir, best={"step": summary["best_step"], "val_loss": summary["best_val_loss"]})
  log.info("summary: %s", summary)
  return summary


def _preflight(setup: Setup, run: _Run, state, batch, batch_np, batch_shardings, hooks) -> None:
  evals = [h for h in hooks if isinstance(h, hooks_lib.EvalHook)]
  eval_fn = evals[0].eval_fn if evals else hooks_lib.EvalHook(setup, 0, [], {}).eval_fn
  figures = preflight_lib.run(
    state,
    batch,
    model=setup.model,
    config=setup.config,
    tokenizer=setup.tokenizer,
    eval_fn=eval_fn,
    optimizer=setup.optimizer,
    state_shardings=setup.state_shardings,
    batch_shardings=batch_shardings,
    host_batch=batch_np,
  )
  run.writer.write(0, {"loss": figures["preflight_loss_before"], **figures})


def _loop(run: _Run, state, prefetch: Prefetcher, hooks: list, stop: StopFlag, batch_hook, start: int) -> str:
  setup = run.setup
  tr, mesh = setup.config.train, setup.mesh
  (batch_np, data_state), wait_s = prefetch.get()
  if batch_hook is not None:
    batch_np = batch_hook(start, batch_np)
  batch_shardings = {k: sharding_lib.batch_sharding(mesh, v.ndim) for k, v in batch_np.items()}
  step_fn = setup.extension.train_step(setup, batch_shardings, sharding_lib.replicated(mesh))
  batch = sharding_lib.global_batch(batch_np, mesh)
  if tr.preflight and start == 0 and setup.extension.runs_preflight():
    _preflight(setup, run, state, batch, batch_np, batch_shardings, hooks)
  run.bar = metrics_lib.progress_bar(run.total, start, jax.process_index() == 0)
  log.info("training steps %d -> %d (%d tokens per step)", start, run.total, run.tokens_per_step)

  pending = None
  step = start
  while True:
    for h in hooks:
      h.before_step(step)
    state, metrics = step_fn(state, batch)
    for h in hooks:
      h.after_step(step, state)
    step += 1
    run.step = step
    if pending is not None:
      row = run.finish(*pending)
      if row is not None:
        run.writer.write(pending[0], row)
    pending = (step, metrics, wait_s)

    at_end = step >= run.total
    signalled = (
      bool(stop)
      if jax.process_count() == 1
      else (step % max(1, tr.log_every) == 0 or at_end) and stop.agreed()
    )
    ctx = hooks_lib.StepContext(step, state, data_state, at_end, signalled, run)
    if any(h.due(ctx) for h in hooks):
      ctx.row = run.finish(*pending) or {}
      pending = None
      for h in hooks:  # in order: a hook may make later ones due (a new best, an early stop)
        if h.due(ctx):
          h(ctx)
      if ctx.row:
        ctx.row.setdefault("loss", run.last_loss)
        run.writer.write(step, ctx.row)
      run.writer.flush()
      run.pause_timer()
    if at_end:
      return "complete"
    if ctx.stop_reason is not None:
      log.warning("%s; checkpoint saved", ctx.stop_reason)
      return "early stop"
    if signalled:
      status = f"stopped by {stop.signal_name or 'another process'}"
      log.warning("%s at step %d; checkpoint saved. Run the same command to resume.", status, step)
      return status
    (batch_np, data_state), wait_s = prefetch.get()
    if batch_hook is not None:
      batch_np = batch_hook(step, batch_np)
    batch = sharding_lib.global_batch(batch_np, mesh)

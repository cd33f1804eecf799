"""Periodic actions of the training loop as hooks with an `every` (evaluation, samples, the best-model
bookkeeping with its alerts and early stop, checkpoints, profiling).

After each step the loop builds a `StepContext`; if any hook is due, it fetches the step's metrics (the
one host sync), runs every due hook in order (each may add entries to `ctx.row`), writes the row, and
flushes. A hook is due after steps that are multiples of its `every`, after the last step (`at_end`),
and when the run is stopping (`on_stop`: a signal or a hook's `ctx.stop_reason`). `before_step` and
`after_step` run around every step's dispatch without a sync (profiling).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import jax

from llm_jax import sharding as sharding_lib
from llm_jax.train import checkpoint as ckpt_lib
from llm_jax.train import evaluation, profiling
from llm_jax.train import metrics as metrics_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StepContext:
  """What hooks see after a step: the state (on device), the loader state after it, the metrics row."""

  step: int
  state: Any
  data_state: dict
  at_end: bool
  signal: bool  # a SIGTERM / Ctrl-C (on any process) asked the run to stop
  run: Any  # the loop's bookkeeping (last_loss, last_val, best_step, best_val, writer, alerts)
  row: dict = dataclasses.field(default_factory=dict)
  stop_reason: str | None = None  # set by a hook to end the run after this step
  new_best: bool = False  # this step's evaluation is the best validation loss so far

  @property
  def stopping(self) -> bool:
    return self.signal or self.stop_reason is not None


class Hook:
  """A periodic action (Levanter style): due every `every` steps, at the end, and/or when stopping."""

  every: int = 0
  at_end: bool = True
  on_stop: bool = False

  def due(self, ctx: StepContext) -> bool:
    return (
      (self.every > 0 and ctx.step % self.every == 0)
      or (self.at_end and ctx.at_end)
      or (self.on_stop and ctx.stopping)
    )

  def __call__(self, ctx: StepContext) -> None:
    raise NotImplementedError

  def before_step(self, step: int) -> None:
    """Before step `step` is dispatched (no sync)."""

  def after_step(self, step: int, outputs) -> None:
    """After step `step` is dispatched, with its outputs (no sync unless the hook blocks)."""

  def close(self) -> None:
    """The loop ended (normally or not)."""


class FnHook(Hook):
  """A function of the StepContext run every `every` steps (and at the end)."""

  def __init__(self, fn: Callable[[StepContext], None], every: int, at_end: bool = True):
    self.fn, self.every, self.at_end = fn, int(every), at_end

  def __call__(self, ctx: StepContext) -> None:
    self.fn(ctx)


class EvalHook(Hook):
  """val_loss, val_ppl, val_bpb (per domain too) on the val split, and val_loss/NAME on extra sets."""

  def __init__(self, setup, every: int, batches: list, extra_sets: dict[str, list]):
    self.every = int(every)
    self.setup, self.batches, self.extra_sets = setup, batches, extra_sets
    replicated = sharding_lib.replicated(setup.mesh)
    num_domains = max(1, len(setup.prepared.domains))
    token_bytes_V = jax.device_put(
      evaluation.token_bytes(setup.tokenizer, setup.model_cfg.vocab_size), replicated
    )
    jitted = jax.jit(
      functools.partial(evaluation.eval_sums, model=setup.model, num_domains=num_domains),
      out_shardings=replicated,
    )
    self.eval_fn = lambda params, batch: jitted(params, batch, token_bytes_V)

  def due(self, ctx: StepContext) -> bool:
    return bool(self.batches) and self.every > 0 and super().due(ctx)

  def __call__(self, ctx: StepContext) -> None:
    s = self.setup
    params = s.extension.model_params(ctx.state.params)
    ctx.row.update(evaluation.evaluate(params, self.eval_fn, self.batches, s.mesh, s.prepared.domains))
    for name, batches in self.extra_sets.items():
      ctx.row[f"val_loss/{name}"] = evaluation.evaluate(params, self.eval_fn, batches, s.mesh, [name]).get(
        "val_loss"
      )
    if "val_loss" in ctx.row:
      ctx.run.last_val = ctx.row["val_loss"]
      log.info("step %d: loss %.4f, val loss %.4f", ctx.step, ctx.run.last_loss, ctx.row["val_loss"])


class BestHook(Hook):
  """After each evaluation: the plateau alert, the best validation loss so far, and early stopping."""

  def __init__(self, every: int, alerts, patience: int, best: tuple[int, float] | None):
    self.every, self.alerts, self.patience = int(every), alerts, int(patience)
    self.best_step, self.best_val = best if best is not None else (None, math.inf)
    self.since_best = 0

  def due(self, ctx: StepContext) -> bool:
    return "val_loss" in ctx.row

  def __call__(self, ctx: StepContext) -> None:
    val = ctx.row["val_loss"]
    self.alerts.val_loss(ctx.step, val)
    if val < self.best_val:
      self.best_step, self.best_val, self.since_best = ctx.step, val, 0
      ctx.new_best = True
    else:
      self.since_best += 1
    ctx.run.best_step, ctx.run.best_val = self.best_step, self.best_val
    if self.patience > 0 and self.since_best >= self.patience and not ctx.at_end:
      ctx.stop_reason = (
        f"early stop at step {ctx.step}: the validation loss has not improved on "
        f"{self.best_val:.4f} (step {self.best_step}) for {self.since_best} evaluations "
        f"(train.early_stop_patience={self.patience})"
      )
      log.warning("%s", ctx.stop_reason)


class SampleHook(Hook):
  """Sampled continuations of the configured prompts, to the log, metrics.jsonl and TensorBoard.

  `sampler(params) -> [text]` comes from outside the trainer (llm_jax.generate.samples.for_training).
  """

  def __init__(self, setup, every: int, sampler):
    self.every, self.setup, self.sampler = int(every), setup, sampler

  def due(self, ctx: StepContext) -> bool:
    return self.every > 0 and super().due(ctx)

  def __call__(self, ctx: StepContext) -> None:
    texts = self.sampler(self.setup.extension.model_params(ctx.state.params))
    for text in texts:
      log.info("sample at step %d: %r", ctx.step, text)
    ctx.run.writer.text(ctx.step, "samples", "\n\n".join(f"```\n{t}\n```" for t in texts))
    ctx.row["samples"] = texts


class CheckpointHook(Hook):
  """Saves (state, loader state) every `every` steps, at the end, when stopping, and at a new best."""

  on_stop = True

  def __init__(self, ckpts: ckpt_lib.Checkpoints, every: int, keep_best: bool):
    self.ckpts, self.every, self.keep_best = ckpts, max(1, int(every)), keep_best

  def due(self, ctx: StepContext) -> bool:
    return super().due(ctx) or (self.keep_best and ctx.new_best)

  def __call__(self, ctx: StepContext) -> None:
    metrics = {"val_loss": float(ctx.row["val_loss"])} if self.keep_best and "val_loss" in ctx.row else {}
    if not self.ckpts.save(ctx.step, ctx.state, ctx.data_state, metrics=metrics):
      raise ckpt_lib.CheckpointError(
        f"the checkpoint at step {ctx.step} was not saved: {self.ckpts.directory} already holds that step"
      )
    ctx.run.saved_step = ctx.step


class ProfileHook(Hook):
  """A JAX profiler trace of train.profile_steps into WORKDIR/tb/plugins/profile (every process)."""

  at_end = False

  def __init__(self, spec: str, workdir: str):
    self.profiler = profiling.StepProfiler(spec, os.path.join(workdir, metrics_lib.TB_DIR))
    self._annotation = None

  def due(self, ctx: StepContext) -> bool:
    return False

  def before_step(self, step: int) -> None:
    self.profiler.before(step)
    self._annotation = self.profiler.annotate(step)
    self._annotation.__enter__()

  def after_step(self, step: int, outputs) -> None:
    self._annotation.__exit__(None, None, None)
    self._annotation = None
    self.profiler.after(step, outputs)

  def close(self) -> None:
    self.profiler.close()

"""JAX profiler traces of chosen steps (`train.profile_steps = "START,STOP"`) into a TensorBoard dir.

    profiler = StepProfiler(config.train.profile_steps, os.path.join(workdir, "tb"))
    for step in ...:
      profiler.before(step)
      with profiler.annotate(step):
        state, metrics = train_step(state, batch)
      profiler.after(step, metrics)      # blocks on the last traced step, then writes the trace

Steps START..STOP-1 are traced; the trace lands in `<logdir>/plugins/profile/<time>/` where
TensorBoard's Profile tab (tensorboard-plugin-profile) or Perfetto (the .trace.json.gz) reads it.
"""

from __future__ import annotations

import contextlib
import logging

import jax


def parse_profile_steps(text: str) -> tuple[int, int] | None:
  """'START,STOP' -> (start, stop) with 0 <= start < stop; '' -> None; anything else raises."""
  text = (text or "").strip()
  if not text:
    return None
  parts = text.split(",")
  try:
    start, stop = (int(p) for p in parts)
  except ValueError as e:
    raise ValueError(f"train.profile_steps={text!r} must be 'START,STOP' (two integers)") from e
  if not 0 <= start < stop:
    raise ValueError(f"train.profile_steps={text!r}: need 0 <= START < STOP")
  return start, stop


class StepProfiler:
  """Starts a jax.profiler trace before step START and stops it after step STOP-1 has finished."""

  def __init__(self, profile_steps: str, logdir: str):
    self.window = parse_profile_steps(profile_steps)
    self.logdir = logdir
    self.active = False
    self.done = False

  def before(self, step: int) -> None:
    """Call before dispatching `step`."""
    if self.window and not self.active and not self.done and step >= self.window[0]:
      logging.info("profiling steps %d..%d into %s", step, self.window[1] - 1, self.logdir)
      jax.profiler.start_trace(self.logdir)
      self.active = True

  def annotate(self, step: int):
    """A step marker in the trace (TensorBoard's per-step view) while tracing; a no-op otherwise."""
    if self.active:
      return jax.profiler.StepTraceAnnotation("train", step_num=step)
    return contextlib.nullcontext()

  def after(self, step: int, outputs=None) -> None:
    """Call after dispatching `step` with its outputs; stops (after they are ready) at STOP-1."""
    if self.active and step >= self.window[1] - 1:
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.active, self.done = False, True
      logging.info("profile written under %s/plugins/profile", self.logdir)

  def close(self) -> None:
    """Stops a trace still running (a run shorter than STOP)."""
    if self.active:
      jax.profiler.stop_trace()
      self.active, self.done = False, True

"""A request as the engine sees it: its choices (one sequence each) and the caller's handle."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

from llm_jax import generate as G


class EngineBusy(RuntimeError):
  """More requests in flight than the engine admits (the server answers 429)."""


@dataclasses.dataclass
class Choice:
  """One sequence of a request (a request with n=3 has three)."""

  index: int
  prompt_ids: list[int]
  sampling: G.SamplingParams
  top_n: int = 0  # top log-probs per token wanted (0..5)
  text: Any = None  # generate.TextStream
  tokens: list[int] = dataclasses.field(default_factory=list)  # with the EOS that ended it, if one did
  logprobs: list[float] = dataclasses.field(default_factory=list)
  top: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  slot: int | None = None
  blocked_by: Any = None  # the output filter rule that cut this choice
  prefill_at: int | None = None  # a prompt prefilled in pieces: the position its next piece starts at
  arrays: dict | None = None  # its sampling arrays (generate.sampling_arrays) until its last piece


class Handle:
  """The caller's side of a request: events arrive on `queue` (an asyncio.Queue) of `loop`.

  Events: ("delta", index, text, tokens, logprobs, top) and ("done", index, finish_reason); after
  every choice is done, ("end",).
  """

  def __init__(self, request_id: str, choices: list[Choice], loop, queue, deadline: float):
    self.id = request_id
    self.choices = choices
    self.loop = loop
    self.queue = queue
    self.deadline = deadline
    self.submitted = time.monotonic()
    self.first_token_at: float | None = None
    self.cancelled = threading.Event()
    self.pending = len(choices)

  def cancel(self) -> None:
    """The client went away: stop decoding this request and free its slots."""
    self.cancelled.set()

  def record(self, choice: Choice, tokens: list, logprobs: list, top: list, metrics=None) -> None:
    """New tokens of `choice` (with their log-probs and top log-probs) added to it, the request's
    first token timed, the tokens counted in `metrics` (the engine's copy of a request, or the HTTP
    process's copy of one decoded in the engine's process: serve.worker)."""
    choice.tokens += tokens
    choice.logprobs += logprobs
    choice.top += top
    if self.first_token_at is None:
      self.first_token_at = time.monotonic()
    if metrics is not None:
      metrics.generated_tokens.inc(len(tokens))


def deliver(items: list[tuple[Handle, tuple]]) -> None:
  """Puts engine events on their requests' queues (runs on the event loop, posted by the engine)."""
  for handle, event in items:
    handle.queue.put_nowait(event)

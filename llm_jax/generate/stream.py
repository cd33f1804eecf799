"""From decoded ids to text: TextStream (incremental detokenization with stop sequences and a
hold-back for output filters), `stream` (one completion, piece by piece, for terminals) and
`generate` (a batch of prompts in one jitted loop, with text cut at stop sequences).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import jax
import numpy as np

from llm_jax.generate.decode import EOS_ID, decode_chunk, decode_loop, make_batch
from llm_jax.generate.sampling import SamplingParams
from llm_jax.model import ModelConfig


@dataclasses.dataclass
class Generation:
  """One finished sequence: new token ids, their log-probs, why it stopped, and text if decoded."""
  tokens: list[int]
  logprobs: list[float]
  finish_reason: str  # "stop" (EOS or a stop sequence) | "length"
  text: str | None = None


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
             sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(), *,
             tokenizer=None, eos_id: int = EOS_ID, vocab_limit: int | None = None,
             top_n: int = 0) -> list[Generation]:
  """Decodes a batch of token prompts in one jitted loop; with a tokenizer, also text cut at stops.

  Ids >= vocab_limit (default: the tokenizer's size) are never sampled (padded embedding rows).
  """
  if vocab_limit is None and tokenizer is not None:
    vocab_limit = tokenizer.vocab_size
  if isinstance(sampling, SamplingParams):
    sampling = [sampling] * len(prompts)
  batch = make_batch(prompts, sampling, cfg)
  _, outs = decode_loop(params, batch.start(params, cfg), cfg=cfg, max_steps=batch.max_steps,
                        eos_id=eos_id, vocab_limit=vocab_limit, top_n=top_n, greedy=batch.greedy,
                        span=batch.span)
  outs = jax.device_get(outs)
  results = []
  for i, sp in enumerate(sampling):
    n = int(outs["emitted"][i].sum())
    toks = [int(t) for t in outs["token"][i, :n]]
    lps = [float(x) for x in outs["logprob"][i, :n]]
    reason = "stop" if outs["eos"][i].any() else "length"
    gen = Generation(toks, lps, reason)
    if tokenizer is not None:
      stream = TextStream(tokenizer, sp.stop)
      kept = 0
      for t in toks:
        stream.push(t)
        if stream.finished:
          break
        kept += 1
      stream.close()
      if stream.finished:  # a stop sequence: drop the tokens from the one that completed it
        gen = Generation(toks[:kept], lps[:kept], "stop")
      gen.text = stream.text
    results.append(gen)
  return results


def stream(params, cfg: ModelConfig, tokenizer, prompt_ids: Sequence[int], sampling: SamplingParams,
           *, eos_id: int = EOS_ID, chunk: int = 1) -> Iterator[str]:
  """Yields text pieces of one completion as they are decoded (for terminals); honours stops."""
  batch = make_batch([prompt_ids], [sampling], cfg)
  state = batch.start(params, cfg)
  text = TextStream(tokenizer, sampling.stop)
  alive = np.arange(batch.tokens_BL.shape[0]) < 1
  while True:
    state, outs = decode_chunk(params, state, alive, cfg=cfg, steps=chunk, eos_id=eos_id,
                               vocab_limit=tokenizer.vocab_size, greedy=batch.greedy,
                               span=batch.span)
    outs = jax.device_get(outs)
    for j in range(chunk):
      if outs["emitted"][0, j]:
        piece = text.push(int(outs["token"][0, j]))
        if piece:
          yield piece
        if text.finished:
          return
    if not bool(jax.device_get(state.active_B)[0]):
      break
  rest = text.close()
  if rest:
    yield rest


class TextStream:
  """Incremental detokenization: push token ids, get the text that is safe to show so far.

  Holds back an incomplete UTF-8 byte sequence, any tail that could still become a stop sequence,
  and `hold_chars` more characters (so that an output filter can see text before a client does).
  `check(text) -> index | None` cuts the text at the returned index (a blocked output).
  """

  def __init__(self, tokenizer, stop: Sequence[str] = (), hold_chars: int = 0,
               check: Callable[[str], int | None] | None = None):
    self.tokenizer = tokenizer
    self.stop = tuple(s for s in stop if s)
    self.hold_chars = hold_chars
    self.check = check
    self.ids: list[int] = []
    self.text = ""  # decoded text (cut at a stop or a blocked match when finished)
    self.emitted = 0  # characters of `text` already returned
    self.finished = False
    self.reason: str | None = None  # "stop" or "blocked" when finished here

  def push(self, token_id: int) -> str:
    """Adds one id; returns newly safe text ('' when nothing is safe yet or after finishing)."""
    if self.finished:
      return ""
    self.ids.append(int(token_id))
    self.text = self.tokenizer.decode(self.ids)
    if self._cut():
      return self._take(len(self.text))
    safe = len(self.text) - _pending_replacement(self.text)
    safe = min(safe, len(self.text) - _stop_prefix_len(self.text, self.stop)) - self.hold_chars
    return self._take(safe)

  def close(self) -> str:
    """The end of the sequence: run the final checks and return the text still held back."""
    if not self.finished:
      self._cut()
    return self._take(len(self.text))

  def _cut(self) -> bool:
    cut = None
    start = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
    for s in self.stop:
      i = self.text.find(s, start)
      if i >= 0 and (cut is None or i < cut):
        cut, self.reason = i, "stop"
    if self.check is not None:
      j = self.check(self.text)
      if j is not None and (cut is None or j <= cut):
        cut, self.reason = j, "blocked"
    if cut is None:
      return False
    self.text = self.text[:max(cut, self.emitted)]
    self.finished = True
    return True

  def _take(self, upto: int) -> str:
    if upto <= self.emitted:
      return ""
    piece = self.text[self.emitted:upto]
    self.emitted = upto
    return piece


def _pending_replacement(text: str) -> int:
  """Trailing U+FFFD characters: bytes of a character whose remaining bytes have not arrived."""
  n = len(text) - len(text.rstrip("\ufffd"))
  return min(n, 3)


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
  """Length of the longest tail of `text` that is a proper prefix of some stop sequence."""
  best = 0
  for s in stops:
    for k in range(min(len(s) - 1, len(text)), best, -1):
      if text.endswith(s[:k]):
        best = k
        break
  return best

"""From decoded ids to text: TextStream (incremental detokenization in bounded work per id, with
stop sequences and a hold-back for output filters), `stream` (one completion, piece by piece, for
terminals) and `generate` (a batch of prompts in one jitted loop, with text cut at stop sequences).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np

from llm_jax.generate.batching import make_batch
from llm_jax.generate.decode import EOS_ID, decode_chunk, decode_loop
from llm_jax.generate.sampling import SamplingParams
from llm_jax.model import ModelConfig


@dataclasses.dataclass
class Generation:
  """One finished sequence: new token ids, their log-probs, why it stopped, and text if decoded."""

  tokens: list[int]
  logprobs: list[float]
  finish_reason: str  # "stop" (EOS or a stop sequence) | "length"
  text: str | None = None


def generate(
  params,
  cfg: ModelConfig,
  prompts: Sequence[Sequence[int]],
  sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
  *,
  tokenizer=None,
  eos_id: int = EOS_ID,
  vocab_limit: int | None = None,
  top_n: int = 0,
) -> list[Generation]:
  """Decodes a batch of token prompts in one jitted loop; with a tokenizer, also text cut at stops.

  Ids >= vocab_limit (default: the tokenizer's size) are never sampled (padded embedding rows).
  """
  if vocab_limit is None and tokenizer is not None:
    vocab_limit = tokenizer.vocab_size
  if isinstance(sampling, SamplingParams):
    sampling = [sampling] * len(prompts)
  batch = make_batch(prompts, sampling, cfg)
  _, outs = decode_loop(
    params,
    batch.start(params, cfg),
    cfg=cfg,
    eos_id=eos_id,
    vocab_limit=vocab_limit,
    top_n=top_n,
    **batch.loop_args(),
  )
  outs = jax.device_get(outs)
  results = []
  for i, sp in enumerate(sampling):
    n = int(outs["emitted"][i].sum())
    toks = [int(t) for t in outs["token"][i, :n]]
    lps = [float(x) for x in outs["logprob"][i, :n]]
    reason = "stop" if outs["eos"][i].any() else "length"
    gen = Generation(toks, lps, reason)
    if tokenizer is not None:
      stream = TextStream(tokenizer, sp.stop, context=prompts[i], stop_ids=sp.stop_token_ids)
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


def stream(
  params,
  cfg: ModelConfig,
  tokenizer,
  prompt_ids: Sequence[int],
  sampling: SamplingParams,
  *,
  eos_id: int = EOS_ID,
  chunk: int = 1,
) -> Iterator[str]:
  """Yields text pieces of one completion as they are decoded (for terminals); honours stops."""
  batch = make_batch([prompt_ids], [sampling], cfg)
  state = batch.start(params, cfg)
  text = TextStream(tokenizer, sampling.stop, context=prompt_ids, stop_ids=sampling.stop_token_ids)
  alive = np.arange(batch.tokens_BL.shape[0]) < 1
  while True:
    state, outs = decode_chunk(
      params,
      state,
      alive,
      cfg=cfg,
      steps=chunk,
      eos_id=eos_id,
      vocab_limit=tokenizer.vocab_size,
      greedy=batch.greedy,
      span=batch.span,
      filtered=batch.filtered,
    )
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


CONTEXT_IDS = 6  # prompt ids a completion is decoded after (as vLLM's incremental detokenizer)


def context_ids(tokenizer, prompt_ids: Sequence[int]) -> list[int]:
  """The prompt's last ids (up to CONTEXT_IDS) that its completion is decoded after, ending on a
  whole character (a completion that finishes a character begun in the prompt is decoded alone)."""
  ctx = [int(i) for i in prompt_ids[max(0, len(prompt_ids) - CONTEXT_IDS) :]]
  while ctx and tokenizer.decode(ctx).endswith("\ufffd"):
    ctx.pop()
  return ctx


def decode_after(tokenizer, context: Sequence[int], ids: Sequence[int]) -> str:
  """The text `ids` add after `context` (`context_ids`): decode(context + ids) less the context's
  own text. Tokenizers whose decoder drops the text's first space (SentencePiece models, their
  tokenizer.json conversions) keep a completion's first space, as decoding prompt and completion
  together does; without context, or where the joint text does not extend the context's, the text
  of `ids` alone."""
  if context:
    head = tokenizer.decode(context)
    text = tokenizer.decode([*context, *ids])
    if text.startswith(head):
      return text[len(head) :]
  return tokenizer.decode(ids)


class TextStream:
  """Incremental detokenization: push token ids, get the text that is safe to show so far.

  Holds back an incomplete UTF-8 byte sequence, any tail that could still become a stop sequence,
  and `hold_chars` more characters (so that an output filter can see text before a client does).
  `check(text) -> index | None` cuts the text at the returned index (a blocked output). `context`:
  the prompt's ids; the text is what the pushed ids add after its last few (`decode_after`).
  `stop_ids`: ids that finish the text as a stop sequence does (they add no text): a special token a
  chat template ends a turn with decodes to no text, so no stop sequence can see it.

  The work per id is bounded (not the length so far): ids are decoded in a short window that starts
  a few ids back (`decode(ids[p:])` minus the text of its settled context `ids[p:r]`), so tokenizers
  that drop a leading space or merge bytes across ids give the same text as decoding the whole list;
  a window whose text does not extend its context's falls back to decoding the whole list. Stop
  sequences are searched in the new text (plus the longest stop's length before it) only, and only
  recent text is kept as one string. `check` (output filters) still sees the whole text.
  """

  def __init__(
    self,
    tokenizer,
    stop: Sequence[str] = (),
    hold_chars: int = 0,
    check: Callable[[str], int | None] | None = None,
    context: Sequence[int] = (),
    stop_ids: Sequence[int] = (),
  ):
    self.tokenizer = tokenizer
    self.stop_ids = frozenset(int(i) for i in stop_ids)
    self._pre = context_ids(tokenizer, context)  # ids decoded before the first pushed one
    self.stop = tuple(s for s in stop if s)
    self.hold_chars = hold_chars
    self.check = check
    self.ids: list[int] = []
    self.emitted = 0  # characters of the text already returned
    self.finished = False
    self.reason: str | None = None  # "stop" or "blocked" when finished here
    self._max_stop = max((len(s) for s in self.stop), default=0)
    self._keep = max(self._max_stop, 4) + hold_chars  # recent characters kept in `_live`
    self._head: list[str] = []  # text before `_live` (never searched again)
    self._head_len = 0
    self._live = ""  # the text from character `_head_len` on
    self._stable = 0  # characters of `_live` that are the text of ids[:_r] (final)
    # decode window ids[_p:] (a negative _p starts in the context); ids[_p:_r] is its settled part
    self._p, self._r = -len(self._pre), 0
    self._ctx = tokenizer.decode(self._pre) if self._pre else ""  # decode(ids[_p:_r])

  @property
  def text(self) -> str:
    """The decoded text so far (cut at a stop or a blocked match when finished)."""
    if self._head:
      self._head = ["".join(self._head)]
    return (self._head[0] if self._head else "") + self._live

  def push(self, token_id: int) -> str:
    """Adds one id; returns newly safe text ('' when nothing is safe yet or after finishing)."""
    if self.finished:
      return ""
    if int(token_id) in self.stop_ids:
      return self._stop_at_id()
    self.ids.append(int(token_id))
    self._live = self._live[: self._stable] + self._tail()
    if self._cut():
      return self._take(self._head_len + len(self._live))
    self._settle()
    return self._take(self._safe())

  def extend(self, token_ids: Sequence[int]) -> tuple[str, int]:
    """Adds several ids with one decode; returns (newly safe text, ids kept). Equal to pushing them
    one by one: when that would finish (a stop, a blocked match) at id k, k ids are kept (the one
    that completed the stop is not) and the text is the same."""
    if self.finished or not token_ids:
      return "", 0
    at = next((k for k, t in enumerate(token_ids) if int(t) in self.stop_ids), None)
    if at is not None:  # the ids before a stop id, then the stop
      piece, kept = self.extend(token_ids[:at])
      return (piece, kept) if self.finished else (piece + self._stop_at_id(), at)
    if self.check is not None or any("\ufffd" in s for s in self.stop):  # one by one
      return self._one_by_one(token_ids)
    n = len(self.ids)
    self.ids.extend(int(t) for t in token_ids)
    live = self._live[: self._stable] + self._tail()
    start = max(0, self.emitted - self._max_stop) - self._head_len
    if any(live.find(s, start) >= 0 for s in self.stop):  # find the id that completes it
      del self.ids[n:]
      return self._one_by_one(token_ids)
    self._live = live
    self._settle()
    return self._take(self._safe()), len(token_ids)

  def close(self) -> str:
    """The end of the sequence: run the final checks and return the text still held back."""
    if not self.finished:
      self._cut(final=True)
    return self._take(self._head_len + len(self._live))

  def _stop_at_id(self) -> str:
    """A stop id arrived: the text so far is whole (final checks run, nothing held back)."""
    if not self._cut(final=True):
      self.finished, self.reason = True, "stop"
    return self._take(self._head_len + len(self._live))

  def _one_by_one(self, token_ids: Sequence[int]) -> tuple[str, int]:
    out = []
    for k, t in enumerate(token_ids):
      out.append(self.push(t))
      if self.finished:
        return "".join(out), k
    return "".join(out), len(token_ids)

  def _tail(self) -> str:
    """The text the unsettled ids ids[_r:] add (decoding the window, or everything if needed)."""
    window = self.tokenizer.decode(self._span(self._p, len(self.ids)))
    if window.startswith(self._ctx):
      return window[len(self._ctx) :]
    full = decode_after(self.tokenizer, self._pre, self.ids)  # the window's text depends on ids before it
    return full[self._head_len + self._stable :]

  def _span(self, p: int, r: int) -> list[int]:
    """ids[p:r], where a negative p starts that many ids from the context's end."""
    return (self._pre[p:] if p < 0 else []) + self.ids[max(p, 0) : r]

  def _settle(self) -> None:
    """Moves the window on once the text ends in a whole character; trims `_live`."""
    tail_len = len(self._live) - self._stable
    if tail_len == 0 or self._live.endswith("\ufffd"):
      return
    r = len(self.ids)
    added = self.tokenizer.decode(self.ids[self._r : r])
    if added:  # the new context starts at the old read position (it has text of its own)
      self._p, self._ctx = self._r, added
    else:
      self._ctx = self.tokenizer.decode(self._span(self._p, r))
    self._r, self._stable = r, len(self._live)
    drop = min(self._stable, self.emitted - self._head_len - self._keep)
    if drop > 256:
      self._head.append(self._live[:drop])
      self._head_len += drop
      self._live, self._stable = self._live[drop:], self._stable - drop

  def _safe(self) -> int:
    """Characters that may be shown: not an incomplete character's U+FFFD, nor a tail before it that
    could still become a stop sequence, nor the last `hold_chars`."""
    return self._head_len + len(self._live) - _held(self._live, self.stop) - self.hold_chars

  def _cut(self, final: bool = False) -> bool:
    """Finishes at the first stop sequence (or blocked match) in the new text. Before the end, not in
    an incomplete character's U+FFFD (a stop of U+FFFD would match the first byte of a character)."""
    cut = None
    start = max(0, self.emitted - self._max_stop)
    end = len(self._live) - (0 if final else _pending_replacement(self._live))
    for s in self.stop:
      i = self._live.find(s, start - self._head_len, end)
      if i >= 0 and (cut is None or i + self._head_len < cut):
        cut, self.reason = i + self._head_len, "stop"
    if self.check is not None:
      j = self.check(self.text)
      if j is not None and (cut is None or j <= cut):
        cut, self.reason = j, "blocked"
    if cut is None:
      return False
    self._live = self._live[: max(cut, self.emitted) - self._head_len]
    self.finished = True
    return True

  def _take(self, upto: int) -> str:
    if upto <= self.emitted:
      return ""
    piece = self._live[self.emitted - self._head_len : upto - self._head_len]
    self.emitted = upto
    return piece


def _pending_replacement(text: str) -> int:
  """Trailing U+FFFD characters: bytes of a character whose remaining bytes have not arrived."""
  n = len(text) - len(text.rstrip("\ufffd"))
  return min(n, 3)


def _held(text: str, stops: Sequence[str]) -> int:
  """Tail characters to hold back: an incomplete character's U+FFFD and the text before it that is a
  proper prefix of a stop sequence (the character it awaits may complete the stop)."""
  pending = _pending_replacement(text)
  return pending + _stop_prefix_len(text[: len(text) - pending] if pending else text, stops)


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
  """Length of the longest tail of `text` that is a proper prefix of some stop sequence."""
  best = 0
  for s in stops:
    for k in range(min(len(s) - 1, len(text)), best, -1):
      if text.endswith(s[:k]):
        best = k
        break
  return best

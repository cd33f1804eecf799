"""One decode chunk's outputs on the host: the packed device array as lists (one transfer), and what
one slot's rows of it mean for its sequence (new text, tokens, log-probs, and why it ended)."""

from __future__ import annotations

import jax
import numpy as np

from llm_jax.serve.prefill import unpack_chunk
from llm_jax.serve.sequences import Choice


def chunk_lists(packed, chunk: int, want_top: bool) -> dict[str, list]:
  """The chunk's outputs as Python lists [slot][step] (top-k lists only when a sequence asked)."""
  outs = unpack_chunk(np.asarray(jax.device_get(packed)), chunk)
  lists = {k: outs[k].tolist() for k in ("token", "logprob", "emitted", "eos", "active")}
  if want_top:
    lists.update(top_ids=outs["top_ids"].tolist(), top_logprobs=outs["top_logprobs"].tolist())
  return lists


def slot_update(choice: Choice, slot: int, o: dict, chunk: int):
  """(new text, new token ids, their log-probs, their top log-probs, finish reason or None) of one
  slot's chunk; feeds the new ids to the sequence's text stream (stops and filters apply there)."""
  reason = None
  steps, eos_step = [], None  # the chunk's steps that emitted a token; the step that drew EOS
  for j in range(chunk):
    if o["eos"][slot][j]:  # listed with its log-prob (not in the text), as vLLM lists it
      eos_step = j
      break
    if o["emitted"][slot][j]:
      steps.append(j)
  tokens = o["token"][slot]
  text, kept = choice.text.extend([tokens[j] for j in steps])
  if choice.text.finished:
    # A stop sequence: the id that completed it is kept (listed and counted, as EOS is and as vLLM
    # does: its characters before the stop are in the text). A blocked match: the id is dropped.
    reason = "content_filter" if choice.text.reason == "blocked" else "stop"
    steps, eos_step = steps[: kept + (reason == "stop")], None
  elif eos_step is not None:
    reason = "stop"
    steps.append(eos_step)
  elif not o["active"][slot]:
    reason = "length"
  if reason is not None and not choice.text.finished:
    text += choice.text.close()
    if choice.text.reason == "blocked":
      reason = "content_filter"
  new_tokens = [tokens[j] for j in steps]
  new_lps = [o["logprob"][slot][j] for j in steps]
  new_top = []
  if choice.top_n:
    ids, lps = o["top_ids"][slot], o["top_logprobs"][slot]
    new_top = [list(zip(ids[j][: choice.top_n], lps[j][: choice.top_n], strict=True)) for j in steps]
  return text, new_tokens, new_lps, new_top, reason

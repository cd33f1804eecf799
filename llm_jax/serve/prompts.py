"""Prompts as the server sees them: text to ids, the checks every prompt passes, scoring, offsets.

What a text prompt gets: the model's prompt prefix (model.json `prompt_prefix`: the document separator
EOS that training put before every document) and then its tokens. The prefix is fed to the model but
never echoed: `echo` returns the prompt's own tokens, and with `logprobs` the first of them has a null
log-prob (and null top log-probs), as in OpenAI's legacy format. A prompt of token ids is fed exactly
as sent (nothing is prepended). In text, the tokenizer's special pieces (`<s>`, `</s>`, `<pad>`,
`<unk>`) stand for their ids, as Hugging Face tokenizers read them (a tokenizer.json reads its own
added and special tokens: its encode of the whole text); `/tokenize` uses the same rule.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

from llm_jax.data.tokenizer import SPACE_MARK, char_index
from llm_jax.serve.schema import ApiError

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclasses.dataclass
class Prompt:
  """One prompt: the ids the model sees, where the echoed part starts, the echoed text, its scores."""

  ids: list[int]
  shown: int  # ids[shown:] are the prompt's own tokens (echoed); ids[:shown] the hidden prefix
  text: str
  logprobs: list[float | None] | None = None  # per shown token (first: None)
  offsets: list[int] | None = None  # per shown token, where it starts in `text` (None: from decoding)
  top: list[list[tuple[int, float]] | None] | None = None  # per shown token (first: None)

  @property
  def shown_ids(self) -> list[int]:
    return self.ids[self.shown :]


def special_pieces(tok) -> dict[str, int]:
  """The text of each special id (pad, bos, eos, unk, and a tokenizer.json's other special tokens,
  such as <|user|>) -> the id; a tokenizer without one (id -1, as a Hugging Face tokenizer without an
  unk token) has no piece for it."""
  ids = (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, *getattr(tok, "special_token_ids", ()))
  return {tok.id_to_piece(i): i for i in ids if i >= 0}


def encode_text(tok, text: str) -> list[int]:
  """Ids of `text`, reading the tokenizer's special pieces in it as their ids."""
  return [i for part in _parts(tok, text) for i in part[0]]


def _parts(tok, text: str) -> list[tuple[list[int], str, int]]:
  """(ids, text, start) of each part of `text`: a special piece written in it, or the text between.
  A tokenizer.json reads its special tokens in the text itself: one part (encoded apart, each part
  of a Metaspace tokenizer got a word-start piece of its own: '</s>🙂' read as [</s>, ▁, 🙂])."""
  if getattr(tok, "reads_special_tokens", False):
    return [(tok.encode(text), text, 0)] if text else []
  specials = special_pieces(tok)
  out, at = [], 0
  for part in re.split("(" + "|".join(re.escape(p) for p in specials) + ")", text):
    if part in specials:
      out.append(([specials[part]], part, at))
    elif part:
      out.append((tok.encode(part), part, at))
    at += len(part)
  return out


def encode_with_offsets(tok, token_bytes: np.ndarray, text: str) -> tuple[list[int], list[int]]:
  """`encode_text(tok, text)` and where each id starts in `text`: a special piece where its name is
  written (its id decodes to no text, so offsets from decoding the ids would not point there). The
  tokenizer's own offsets (`encode_offsets`: one encode; decoding every prefix took 2.5 s for a prompt
  of 3,500 tokens) unless its pieces are the text's bytes exactly (`exact_bytes`: byte-level BPE),
  where byte counts place them: byte counts that merely add up can mislead (a SentencePiece model's
  first space and a collapsed double space cancel out, and every token after sat one character off).
  Without either, offsets from decoding (`text_offsets`)."""
  parts = _parts(tok, text)
  ids = [i for part in parts for i in part[0]]
  offsets = []
  for p_ids, part, at in parts:
    got = _byte_offsets(token_bytes, p_ids, part, at) if getattr(tok, "exact_bytes", False) else None
    if got is None and hasattr(tok, "encode_offsets"):
      own_ids, starts = tok.encode_offsets(part)
      if own_ids == p_ids:
        got = [at + s for s in starts]
    offsets += got if got is not None else text_offsets(tok, token_bytes, p_ids, part, at)
  return ids, offsets


def _token_text(tok, i: int, piece: str) -> str:
  """The text token `i` adds inside a text: its decoding alone, with the space its SentencePiece
  word-start mark stands for (decoders of SentencePiece models drop a text's first space)."""
  text = tok.decode([i])
  if piece.startswith(SPACE_MARK) and not text.startswith(" "):
    text = " " + text
  return text


def token_str(tok, i: int) -> str:
  """A token as text for log-prob listings: its text, 'bytes:\\xNN' for a byte piece, or the piece
  name of a special id (so that distinct ids get distinct strings)."""
  piece = tok.id_to_piece(i)
  m = _BYTE_PIECE.match(piece)
  if m:
    return f"bytes:\\x{m.group(1).lower()}"
  text = _token_text(tok, i, piece)
  return text if text else piece


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
  """GPT-2's byte-level BPE alphabet: the character that stands for each byte -> the byte."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  rest = [b for b in range(256) if b not in printable]
  return {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(rest)}


def token_utf8(tok, i: int) -> list[int]:
  """The bytes token `i` adds to the text (OpenAI's logprobs `bytes`): a byte piece's byte, the
  bytes of a byte-level BPE piece (a part of a character included), none for a special id, else the
  UTF-8 of its text."""
  piece = tok.id_to_piece(i)
  m = _BYTE_PIECE.match(piece)
  if m:
    return [int(m.group(1), 16)]
  text = _token_text(tok, i, piece)
  if "\ufffd" in text and piece:  # not valid UTF-8 alone: a byte-level piece holds its raw bytes
    alphabet = _byte_level_alphabet()
    if all(ch in alphabet for ch in piece):
      return [alphabet[ch] for ch in piece]
  return list(text.encode("utf-8"))


def top_dict(tok, row: list[tuple[int, float]], chosen: int, chosen_lp: float) -> dict[str, float]:
  """OpenAI's top_logprobs entry: the top tokens and always the chosen one (up to logprobs + 1).
  Ids with the same text share a key, which keeps the best of their log-probs."""
  out: dict[str, float] = {}
  for i, v in [*row, (chosen, chosen_lp)]:
    key = token_str(tok, i)
    out[key] = max(out.get(key, -np.inf), float(v))
  return out


def text_offsets(
  tok, token_bytes: np.ndarray, ids: list[int], text: str, base: int = 0, start: int = 0
) -> list[int]:
  """Where each token of `ids[start:]` starts in `text` (the decoded `ids`), in characters, plus `base`.

  A token's offset is the number of characters whose UTF-8 bytes end before the token's first byte
  (a token that starts inside a character gets that character's offset); special ids add no bytes.
  When the byte counts do not add up to `text` (a tokenizer that drops or adds characters when
  decoding, e.g. a SentencePiece-style tokenizer.json whose decoder strips the first space), offsets
  come from decoding each prefix instead: one decode per token from `start` (a stream lists its new
  tokens only; decoding every prefix at every chunk took 36 s of the event loop for 2,000 tokens).
  """
  if len(ids) <= start:
    return []
  got = _byte_offsets(token_bytes, ids, text, base, start)
  if got is None:
    return [base + _common_prefix(tok.decode(ids[:k]), text) for k in range(start, len(ids))]
  return got


def _byte_offsets(token_bytes: np.ndarray, ids: list[int], text: str, base: int, start: int = 0):
  """`text_offsets` from the ids' byte counts; None when they do not add up to `text`."""
  nbytes = token_bytes[np.clip(np.asarray(ids, np.int64), 0, len(token_bytes) - 1)]
  if int(nbytes.sum()) != len(text.encode("utf-8")):
    return None
  starts = np.concatenate([[0], np.cumsum(nbytes)[:-1]])[start:]
  return [base + int(x) for x in char_index(text, starts)]


def _common_prefix(a: str, b: str) -> int:
  n = min(len(a), len(b))
  i = 0
  while i < n and a[i] == b[i]:
    i += 1
  return i


def make_prompts(st, prompt, record: dict, offsets: bool = False) -> list[Prompt]:
  """The request's prompts (a text, ids, or a batch of either) after the id and filter checks;
  `offsets`: with each text prompt's token offsets (for echo with logprobs)."""
  tok = st.loaded.tokenizer
  if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
    prompt = [prompt]
  if len(prompt) > st.settings.max_prompts:
    raise ApiError(
      400,
      f"prompt: {len(prompt)} prompts in one request, at most {st.settings.max_prompts}",
      param="prompt",
      code="invalid_value",
    )
  out = []
  for k, p in enumerate(prompt):
    where = f"prompt[{k}]" if len(prompt) > 1 else "prompt"
    if isinstance(p, str):
      prefix = list(st.loaded.prompt_prefix)
      if offsets:
        ids, starts = encode_with_offsets(tok, st.token_bytes, p)
        out.append(Prompt(prefix + ids, len(prefix), p, offsets=starts))
      else:
        out.append(Prompt(prefix + encode_text(tok, p), len(prefix), p))
    else:
      bad = [i for i in p if not 0 <= i < tok.vocab_size]
      if bad:
        raise ApiError(
          400,
          f"{where}: token ids {bad[:5]} are outside [0, {tok.vocab_size})",
          param="prompt",
          code="invalid_value",
        )
      out.append(Prompt(list(p), 0, tok.decode(p)))
    if not out[-1].shown_ids:
      raise ApiError(400, f"{where}: empty", param="prompt", code="invalid_value")
  texts = [p.text for p in out]
  record.update(prompt_tokens=sum(len(p.ids) for p in out), prompt=texts[0] if len(texts) == 1 else texts)
  for p in out:
    rule = st.settings.filters.check_input(p.text)
    if rule is not None:
      record["blocked_by"] = rule.name
      raise ApiError(
        400,
        f"prompt blocked by input filter {rule.name!r}: {rule.reason}",
        param="prompt",
        code="input_blocked",
      )
  return out


def check_lengths(st, prompts: list[Prompt], max_tokens: int, param: str = "prompt") -> None:
  """400 when a prompt, or a prompt with `max_tokens` new tokens, does not fit the limits."""
  max_prompt, max_total = st.limits()
  for k, p in enumerate(prompts):
    where = f"{param}[{k}]" if len(prompts) > 1 else param
    if len(p.ids) > max_prompt:
      raise ApiError(
        400,
        f"{where}: {len(p.ids)} tokens, the limit is {max_prompt}",
        param=param,
        code="context_length_exceeded",
      )
    if len(p.ids) + max_tokens > max_total:
      raise ApiError(
        400,
        f"max_tokens: {where} ({len(p.ids)} tokens) + max_tokens ({max_tokens}) "
        f"exceeds {max_total} tokens; lower max_tokens to {max_total - len(p.ids)}",
        param="max_tokens",
        code="context_length_exceeded",
      )


def score(st, p: Prompt) -> None:
  """Fills `p.logprobs` and `p.top` for its shown tokens (one forward pass; runs off the event loop)."""
  lps, top_lp, top_ids = st.engine.score(p.ids)
  # position t (t >= 1) is row t - 1; the first shown token gets None whatever precedes it
  rows = range(p.shown + 1, len(p.ids))
  p.logprobs = [None] + [float(lps[t - 1]) for t in rows]
  p.top = [None] + [
    [(int(i), float(v)) for i, v in zip(top_ids[t - 1], top_lp[t - 1], strict=True)] for t in rows
  ]

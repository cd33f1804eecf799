"""An OpenAI (legacy) completion: one JSON body, or a server-sent event stream.

Choice `i * n + j` is the j-th choice of prompt i. With `echo` a choice's text starts with its prompt
(the prompt's own text, without the hidden prefix, see `serve.prompts`), and with `logprobs` its
listing starts with the prompt's tokens: the first one's log-prob and top log-probs are null, the
others are the model's (one forward pass over the prompt). `top_logprobs` entries hold the `logprobs`
most likely tokens and always the chosen one (with `logprobs: 0`, the chosen one alone). A generated
EOS is listed with its log-prob (its text is empty). `text_offset` counts characters of the returned
text; a stream lists each token with the chunk whose text it starts in (or with the finishing chunk),
so its listings joined equal the whole response's.
"""

from __future__ import annotations

from llm_jax.generate import context_ids, decode_after
from llm_jax.serve.prompts import Prompt, text_offsets, token_str, top_dict
from llm_jax.serve.responder import Responder
from llm_jax.serve.sequences import Choice


class CompletionResponse(Responder):
  """Engine events as an OpenAI completion (one JSON body or an SSE stream)."""

  chunk_object = "text_completion"

  def __init__(
    self, st, req, handle, choices: list[Choice], prompts: list[Prompt], record: dict, request_id: str
  ):
    super().__init__(st, req, handle, choices, sum(len(p.ids) for p in prompts), record, request_id)
    self.prompts = prompts
    tok = st.loaded.tokenizer
    self.contexts = [context_ids(tok, p.ids) for p in prompts]  # what each completion decodes after
    self.streamed: list[list[int]] = [[] for _ in choices]  # streamed ids, per choice
    self.unlisted: list[list[tuple]] = [[] for _ in choices]  # (id, logprob, top row) not yet listed

  def _prompt(self, c: Choice) -> Prompt:
    return self.prompts[c.index // self.req.n]

  def _decoded(self, index: int, ids: list[int]) -> str:
    """The text of choice `index`'s ids `ids` as its stream decodes it: after its prompt's end."""
    return decode_after(self.st.loaded.tokenizer, self.contexts[index // self.req.n], ids)

  def _listing(
    self,
    ids: list[int],
    lps: list,
    tops: list,
    text: str,
    base: int,
    decoded: str | None = None,
    offsets: list[int] | None = None,
  ) -> dict:
    """tokens, token_logprobs, top_logprobs and text_offset of `ids`, sent as `text` at `base`."""
    tok, k = self.st.loaded.tokenizer, self.req.logprobs
    top = None
    if k is not None:  # logprobs 0: each entry holds the chosen token alone (as vLLM)
      top = [
        None if row is None else top_dict(tok, row[:k], t, lp)
        for t, lp, row in zip(ids, lps, tops, strict=True)
      ]
    if offsets is None:
      offsets = text_offsets(
        tok, self.st.token_bytes, ids, tok.decode(ids) if decoded is None else decoded, base
      )
    offsets = [min(o, base + len(text)) for o in offsets]
    return {
      "tokens": [token_str(tok, t) for t in ids],
      "token_logprobs": list(lps),
      "top_logprobs": top,
      "text_offset": offsets,
    }

  def _prompt_listing(self, p: Prompt) -> dict:
    ids = p.shown_ids
    return self._listing(
      ids,
      p.logprobs or [None] * len(ids),
      p.top or [None] * len(ids),
      p.text,
      0,
      decoded=p.text,
      offsets=p.offsets,
    )

  def _logprobs(self, c: Choice) -> dict | None:
    if self.req.logprobs is None:
      return None
    p = self._prompt(c)
    base = len(p.text) if self.req.echo else 0
    gen = self._listing(
      c.tokens,
      c.logprobs,
      c.top or [[] for _ in c.tokens],
      self.texts[c.index],
      base,
      decoded=self._decoded(c.index, c.tokens),
    )
    if not self.req.echo:
      return gen
    head = self._prompt_listing(p)
    return {
      k: (head[k] or [None] * len(p.shown_ids)) + (gen[k] or [None] * len(c.tokens))
      if (head[k] is not None or gen[k] is not None)
      else None
      for k in head
    }

  def _choice(self, c: Choice) -> dict:
    text = (self._prompt(c).text if self.req.echo else "") + self.texts[c.index]
    out = {
      "text": text,
      "index": c.index,
      "logprobs": self._logprobs(c),
      "finish_reason": self.reasons[c.index],
    }
    if c.blocked_by is not None:
      out["content_filter"] = {"name": c.blocked_by.name, "reason": c.blocked_by.reason}
    return out

  def body(self) -> dict:
    return {**self.envelope([self._choice(c) for c in self.choices]), "usage": self.usage()}

  def _chunk(
    self, index: int, text: str, finish: str | None = None, logprobs=None, extra: dict | None = None
  ) -> dict:
    choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}
    if extra:
      choice.update(extra)
    return self.envelope([choice])

  def preamble(self) -> list[dict]:
    if not self.req.echo:
      return []
    return [
      self._chunk(
        c.index,
        self._prompt(c).text,
        logprobs=(self._prompt_listing(self._prompt(c)) if self.req.logprobs is not None else None),
      )
      for c in self.choices
    ]

  def delta(self, index: int, text: str, tokens: list[int], lps: list[float], top) -> dict | None:
    logprobs = None
    if self.req.logprobs is not None:
      self.streamed[index] += tokens
      self.unlisted[index] += zip(tokens, lps, top or [[] for _ in tokens], strict=True)
      logprobs = self._stream_listing(index, final=False)
      if not text and not logprobs["tokens"]:
        return None
    return self._chunk(index, text, logprobs=logprobs)

  def _stream_listing(self, index: int, final: bool) -> dict:
    """The listing of the tokens not yet listed whose place in the whole text is known: those that
    start in the text sent so far (a token that starts in text held back, a part of a character or
    a possible stop, waits for a later chunk), or all of them at the end, within the whole text.
    Offsets count the whole text across chunks, as the whole response's do."""
    tok, ids, rows = self.st.loaded.tokenizer, self.streamed[index], self.unlisted[index]
    base = len(self.prompts[index // self.req.n].text) if self.req.echo else 0
    sent = base + len(self.texts[index])
    decoded = self._decoded(index, ids)
    offsets = text_offsets(tok, self.st.token_bytes, ids, decoded, base, start=len(ids) - len(rows))
    n = len(rows) if final else next((k for k, o in enumerate(offsets) if o >= sent), len(rows))
    listed, self.unlisted[index] = rows[:n], rows[n:]
    return self._listing(
      [t for t, _, _ in listed],
      [lp for _, lp, _ in listed],
      [row for _, _, row in listed],
      "",
      sent,  # offsets within the text sent (the whole text, at the end)
      offsets=offsets[:n],
    )

  def finish(self, c: Choice, reason: str) -> list[dict]:
    extra = (
      {"content_filter": {"name": c.blocked_by.name, "reason": c.blocked_by.reason}}
      if c.blocked_by is not None
      else None
    )
    logprobs = None
    if self.req.logprobs is not None and self.unlisted[c.index]:
      logprobs = self._stream_listing(c.index, final=True)
    return [self._chunk(c.index, "", finish=reason, logprobs=logprobs, extra=extra)]

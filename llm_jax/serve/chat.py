"""POST /v1/chat/completions: messages rendered with the model's SFT chat template, then the engine.

The template is the one the model was fine-tuned with (`llm_jax.finetune.sft`): model.json's
`chat_template` for a package, config.finetune.sft for an SFT run directory, else the SFT defaults
(turn template `<|{role}|>\\n{content}\\n`). The prompt is tokenized exactly as SFT training tokenized
a conversation: BOS, then each message's header, content and tail as separate pieces, then the
assistant's header (the generation prompt). Message text is never read as special tokens. The reply
ends at EOS or where the model starts another user turn (the user header is a stop sequence); the
template's tail after the assistant's content (a newline by default) is not part of the content.
With a tokenizer.json whose special tokens the template uses, the reply also ends at the tail's
special tokens (an end-of-turn token) and at a user header that is a special token (`stop_ids_of`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator

from llm_jax.finetune import sft
from llm_jax.serve.prompts import Prompt, token_str, token_utf8
from llm_jax.serve.responder import Responder
from llm_jax.serve.schema import ApiError, SamplingRequest, _check_unicode
from llm_jax.serve.sequences import Choice


class TextPart(BaseModel):
  """A content part; only text parts are accepted."""

  model_config = ConfigDict(extra="forbid")
  type: Literal["text"]
  text: str


class ChatMessage(BaseModel):
  model_config = ConfigDict(extra="forbid")
  role: Literal["system", "user", "assistant", "developer"]  # developer: OpenAI's newer name of system
  content: str | list[TextPart]
  name: str | None = None

  @property
  def text(self) -> str:
    return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

  @field_validator("role")
  @classmethod
  def _role(cls, v):
    return "system" if v == "developer" else v

  @field_validator("content")
  @classmethod
  def _valid(cls, v):
    if isinstance(v, str):
      return _check_unicode(v)
    for part in v:
      _check_unicode(part.text)
    return v


class ChatRequest(SamplingRequest):
  """Fields of the OpenAI chat completions API this server honours."""

  messages: list[ChatMessage] = Field(min_length=1)
  max_tokens: int | None = Field(None, ge=1)  # default: the room left in the context
  max_completion_tokens: int | None = Field(None, ge=1)
  logprobs: StrictBool | None = None
  top_logprobs: int | None = Field(None, ge=0, le=5)

  @field_validator("top_logprobs")
  @classmethod
  def _top_needs_logprobs(cls, v, info: ValidationInfo):
    # (logprobs missing from info.data: it was invalid itself, and that error is reported)
    if v is not None and "logprobs" in info.data and not info.data["logprobs"]:
      raise ValueError("needs logprobs: true (as in OpenAI's API)")
    return v


def templates_of(loaded) -> sft.Templates:
  """The SFT templates of the served model (model.json / run config), else the defaults."""
  t = loaded.chat_template or {}
  default = sft.Templates()
  out = sft.Templates(prompt=t.get("prompt") or default.prompt, turn=t.get("turn") or default.turn)
  out.check()
  return out


def _split(turn: str, role: str) -> tuple[str, str]:
  head, _, tail = turn.format(role=role, content="\x00").partition("\x00")
  return head, tail


def render_chat(tok, templates: sft.Templates, messages: list[ChatMessage]) -> Prompt:
  """The prompt of a conversation: BOS + the rendered messages + the assistant's header."""
  record = {"messages": [{"role": m.role, "content": m.text} for m in messages]}
  pieces = [p for p, _ in sft.render(record, templates)] + [_split(templates.turn, "assistant")[0]]
  ids = [tok.bos_id]
  for piece in pieces:
    ids += tok.encode(piece)
  return Prompt(ids, 0, "".join(pieces))


def stops_of(templates: sft.Templates) -> tuple[str, ...]:
  """The stop sequences chat adds: the user turn's header (stripped), where one is written."""
  head = _split(templates.turn, "user")[0].strip()
  return (head,) if head else ()


def stop_ids_of(tok, templates: sft.Templates) -> tuple[int, ...]:
  """The ids chat stops at: the special tokens of the template's tail after the assistant's content
  (an end-of-turn token such as <|eot_id|>), and the user header's first id where it is a special
  token of the user turn alone (<|user|>, not a header token every role shares). Special tokens
  decode to no text, so the header as a stop sequence never matched them."""
  special = set(getattr(tok, "special_token_ids", ()))
  tail = tok.encode(_split(templates.turn, "assistant")[1])
  user, assistant = (tok.encode(_split(templates.turn, role)[0]) for role in ("user", "assistant"))
  ids = [i for i in tail if i in special]
  if user and user[0] in special and assistant[:1] != user[:1]:
    ids.append(user[0])
  return tuple(dict.fromkeys(ids))


def prepare(st, req: ChatRequest, record: dict) -> tuple[Prompt, int]:
  """(prompt, max new tokens) after the filter and length checks."""
  prompt = render_chat(st.loaded.tokenizer, st.templates, req.messages)
  record.update(prompt_tokens=len(prompt.ids), prompt=prompt.text)
  rule = st.settings.filters.check_input(prompt.text)
  if rule is not None:
    record["blocked_by"] = rule.name
    raise ApiError(
      400,
      f"messages blocked by input filter {rule.name!r}: {rule.reason}",
      param="messages",
      code="input_blocked",
    )
  max_prompt, max_total = st.limits()
  if len(prompt.ids) > max_prompt:
    raise ApiError(
      400,
      f"messages: {len(prompt.ids)} tokens once rendered, the limit is {max_prompt}",
      param="messages",
      code="context_length_exceeded",
    )
  room = max_total - len(prompt.ids)
  want = req.max_completion_tokens or req.max_tokens
  if want is not None and want > room:
    param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    raise ApiError(
      400,
      f"{param}: messages ({len(prompt.ids)} tokens) + {want} exceeds {max_total} "
      f"tokens; lower {param} to {room}",
      param=param,
      code="context_length_exceeded",
    )
  return prompt, want or room


class ChatResponse(Responder):
  """Engine events as an OpenAI chat completion (one JSON body or an SSE stream of chunks)."""

  chunk_object = "chat.completion.chunk"

  def __init__(
    self, st, req: ChatRequest, handle, choices: list[Choice], prompt: Prompt, record: dict, request_id: str
  ):
    super().__init__(
      st, req, handle, choices, len(prompt.ids), record, "chatcmpl-" + request_id.partition("-")[2]
    )
    self.tail = _split(st.templates.turn, "assistant")[1]
    self.held = [""] * len(choices)  # streamed text held back: it may be the template's tail

  def _content(self, text: str, reason: str | None) -> str:
    if reason == "stop" and self.tail and text.endswith(self.tail):
      return text[: -len(self.tail)]
    return text

  def _logprobs(self, tokens: list[int], lps: list[float], top) -> dict | None:
    if not self.req.logprobs:
      return None
    tok, k = self.st.loaded.tokenizer, self.req.top_logprobs or 0

    def entry(i, lp):
      return {"token": token_str(tok, i), "logprob": float(lp), "bytes": token_utf8(tok, i)}

    rows = top or [[] for _ in tokens]
    return {
      "content": [
        {**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in row[:k]]}
        for t, lp, row in zip(tokens, lps, rows, strict=True)
      ]
    }

  def body(self) -> dict:
    choices = [
      {
        "index": c.index,
        "message": {
          "role": "assistant",
          "content": self._content(self.texts[c.index], self.reasons[c.index]),
        },
        "logprobs": self._logprobs(c.tokens, c.logprobs, c.top),
        "finish_reason": self.reasons[c.index],
      }
      for c in self.choices
    ]
    return {**self.envelope(choices, "chat.completion"), "usage": self.usage()}

  def _chunk(self, index: int, delta: dict, finish: str | None = None, logprobs=None) -> dict:
    return self.envelope([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])

  def preamble(self) -> list[dict]:
    return [self._chunk(c.index, {"role": "assistant", "content": ""}) for c in self.choices]

  def delta(self, index: int, text: str, tokens: list[int], lps: list[float], top) -> dict | None:
    held = self.held[index] + text
    keep = len(self.tail)
    send, self.held[index] = (held[:-keep], held[-keep:]) if keep else (held, "")
    logprobs = self._logprobs(tokens, lps, top)
    if not send and logprobs is None:
      return None
    return self._chunk(index, {"content": send}, logprobs=logprobs)

  def finish(self, c: Choice, reason: str) -> list[dict]:
    rest = self._content(self.held[c.index], reason)
    self.held[c.index] = ""
    out = [self._chunk(c.index, {"content": rest})] if rest else []
    return out + [self._chunk(c.index, {}, finish=reason)]

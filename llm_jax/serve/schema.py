"""The request body of POST /v1/completions (OpenAI-compatible) and the JSON error shape.

A prompt is a text, a list of token ids, or a batch of either (a list of texts or of id lists, as
lm-evaluation-harness sends them); choice `i * n + j` is the j-th choice of prompt i.

Every field is bounded by what the engine can represent: integers that go into int32/uint32 arrays
stay inside those types, numbers are finite (JSON's NaN/Infinity extensions are 400), and text is
valid Unicode (a lone surrogate, which cannot be encoded to UTF-8, is 400). Bounds that depend on
the model (top_k within the vocabulary, prompt length, token ids) are checked by the route.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator

INT32_MAX = 2**31 - 1
MAX_STOPS = 16  # OpenAI takes 4; lm-evaluation-harness sends more (its `until`), vLLM any number


def _check_unicode(v):
  """`v` (a string or a list of them) unchanged, or a ValueError naming a lone surrogate."""
  for i, s in enumerate([v] if isinstance(v, str) else v if isinstance(v, list) else []):
    if not isinstance(s, str):
      continue
    try:
      s.encode("utf-8")
    except UnicodeEncodeError as e:
      where = f"string {i}, " if isinstance(v, list) else ""
      raise ValueError(
        f"contains a lone surrogate (U+{ord(s[e.start]):04X}) at {where}character "
        f"{e.start}: text must be valid Unicode"
      ) from None
  return v


class StreamOptions(BaseModel):
  """`stream_options` of a streamed request: `include_usage` adds a last chunk with `usage`."""

  model_config = ConfigDict(extra="forbid")

  include_usage: StrictBool = False


class SamplingRequest(BaseModel):
  """The fields completions and chat completions share; unknown fields are rejected (400)."""

  model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

  model: str | None = None
  temperature: float = Field(1.0, ge=0.0, le=2.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  top_k: int = Field(0, ge=-1, le=INT32_MAX)  # 0 or -1 (vLLM's "off"): off
  repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
  stop: str | list[str] | None = None
  stop_token_ids: list[Annotated[int, Field(ge=0, le=INT32_MAX)]] | None = Field(
    None, max_length=64
  )  # vLLM's
  seed: int | None = Field(None, ge=0, le=2**32 - 1)
  n: int = Field(1, ge=1)
  stream: StrictBool = False
  stream_options: StreamOptions | None = None
  user: str | None = Field(None, max_length=256)
  # Accepted for client compatibility; only their neutral values.
  presence_penalty: float | None = None
  frequency_penalty: float | None = None
  logit_bias: dict[str, float] | None = None

  @field_validator("top_k")
  @classmethod
  def _top_k(cls, v):
    return max(v, 0)

  @field_validator("stop")
  @classmethod
  def _stops(cls, v):
    if v is None:
      return []
    v = [v] if isinstance(v, str) else v
    if len(v) > MAX_STOPS:
      raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(v)}")
    if any(not s or len(s) > 64 for s in v):
      raise ValueError("stop sequences must be 1 to 64 characters")
    return _check_unicode(v)

  @field_validator("stream_options")
  @classmethod
  def _stream_options(cls, v, info: ValidationInfo):
    if v is not None and info.data.get("stream") is False:  # as vLLM: only with a stream
      raise ValueError("allowed only with stream: true")
    return v

  @field_validator("model", "user")
  @classmethod
  def _valid_text(cls, v):
    return v if v is None else _check_unicode(v)

  @field_validator("presence_penalty", "frequency_penalty")
  @classmethod
  def _penalties(cls, v):
    if v not in (None, 0, 0.0):
      raise ValueError("not supported; use repetition_penalty")
    return v

  @field_validator("logit_bias")
  @classmethod
  def _logit_bias(cls, v):
    if v:
      raise ValueError("logit_bias is not supported")
    return v


class CompletionRequest(SamplingRequest):
  """Fields of the OpenAI completions API this server honours."""

  prompt: str | list[int] | list[str] | list[list[int]]
  # 0 only with echo: the prompt is scored, nothing generated; null (the openai client's None) is 16
  max_tokens: int | None = Field(16, ge=0)
  logprobs: int | None = Field(None, ge=0, le=5)
  echo: StrictBool = False
  best_of: int | None = None  # accepted: 1 only
  suffix: str | None = None  # accepted: empty only

  @field_validator("prompt")
  @classmethod
  def _prompts(cls, v):
    if isinstance(v, list) and not v:
      raise ValueError("the prompt is an empty list")
    return _check_unicode(v)

  @field_validator("max_tokens")
  @classmethod
  def _max_tokens(cls, v):
    return 16 if v is None else v

  @field_validator("best_of")
  @classmethod
  def _best_of(cls, v):
    if v not in (None, 1):
      raise ValueError("best_of is not supported (use n)")
    return v

  @field_validator("suffix")
  @classmethod
  def _suffix(cls, v):
    if v:
      raise ValueError("suffix (insertion) is not supported")
    return _check_unicode(v) if v is not None else v


def error_body(
  message: str, *, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
  """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
  return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ApiError(Exception):
  """An HTTP error with an OpenAI-style JSON body."""

  def __init__(
    self,
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    type_: str = "invalid_request_error",
    headers: dict | None = None,
  ):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
    self.headers = headers or {}

  def body(self) -> dict:
    return error_body(self.message, type_=self.type, param=self.param, code=self.code)

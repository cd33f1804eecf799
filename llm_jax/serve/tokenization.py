"""/tokenize, /detokenize and /tokenizer_info, with vLLM's request and response shapes.

lm-evaluation-harness's `tokenizer_backend=remote` reads them: it takes the EOS id as
`/tokenize("</s>")[0]` (special pieces in text are read as their ids, see `serve.prompts`) and its
prefix token from `bos_token`, which here is the piece of the model's prompt prefix: `</s>` for a
model pretrained with EOS between documents (as GPT-2's tokenizer reports `<|endoftext|>` for both).

    POST /tokenize    {"prompt": str, "add_special_tokens": true, "return_token_strs": false}
                      or {"messages": [...], "add_generation_prompt": true}
                   -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize  {"tokens": [int]} -> {"prompt": str}
    GET  /tokenizer_info -> {"tokenizer_class", "bos_token", "eos_token", "pad_token", "unk_token",
                             "model_max_length", "vocab_size", "prompt_prefix", "chat_template"}

With `add_special_tokens` (the default, as in vLLM) a text gets the ids a completion prompt of that
text is fed (the prompt prefix first); lm-eval sends false. Messages get the ids chat completions
feed the model (BOS, the rendered turns, the assistant's header).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from llm_jax.data.chat_template import jinja_chat_template
from llm_jax.serve.chat import ChatMessage, _split, render_chat
from llm_jax.serve.prompts import encode_text, token_str
from llm_jax.serve.schema import ApiError, _check_unicode


class TokenizeRequest(BaseModel):
  """vLLM's TokenizeCompletionRequest or TokenizeChatRequest."""

  model_config = ConfigDict(extra="forbid")
  model: str | None = None
  prompt: str | None = None
  messages: list[ChatMessage] | None = Field(None, min_length=1)
  add_special_tokens: StrictBool | None = None  # default: true for a prompt, false for messages
  add_generation_prompt: StrictBool = True
  return_token_strs: StrictBool = False

  @model_validator(mode="after")
  def _one_input(self):
    if (self.prompt is None) == (self.messages is None):
      raise ValueError("send either 'prompt' (a text) or 'messages'")
    if self.prompt is not None:
      _check_unicode(self.prompt)
    return self


class DetokenizeRequest(BaseModel):
  model_config = ConfigDict(extra="forbid")
  model: str | None = None
  tokens: list[int]


def tokenize(st, req: TokenizeRequest) -> dict:
  """The ids of a text or a conversation."""
  tok = st.loaded.tokenizer
  if req.messages is not None:
    prompt = render_chat(tok, st.templates, req.messages)
    ids = prompt.ids
    if not req.add_generation_prompt:
      head = tok.encode(_split(st.templates.turn, "assistant")[0])
      ids = ids[: len(ids) - len(head)]
    if req.add_special_tokens is False:
      ids = ids[1:]  # without BOS
  else:
    ids = encode_text(tok, req.prompt)
    if req.add_special_tokens is not False:
      ids = list(st.loaded.prompt_prefix) + ids
  out = {
    "count": len(ids),
    "max_model_len": st.loaded.model_config.max_seq_len,
    "tokens": ids,
    "token_strs": [token_str(tok, i) for i in ids] if req.return_token_strs else None,
  }
  return out


def detokenize(st, req: DetokenizeRequest) -> dict:
  """The text of token ids (special ids decode to nothing)."""
  tok = st.loaded.tokenizer
  bad = [i for i in req.tokens if not 0 <= i < tok.vocab_size]
  if bad:
    raise ApiError(
      400, f"tokens: ids {bad[:5]} are outside [0, {tok.vocab_size})", param="tokens", code="invalid_value"
    )
  return {"prompt": tok.decode(req.tokens)}


def tokenizer_info(st) -> dict:
  """The tokenizer's special pieces, limits and chat template (vLLM's TokenizerInfoResponse)."""
  tok, loaded = st.loaded.tokenizer, st.loaded
  prefix = loaded.prompt_prefix
  return {
    "tokenizer_class": type(tok).__name__,
    "bos_token": tok.id_to_piece(prefix[0]) if prefix else tok.id_to_piece(tok.bos_id),
    "eos_token": tok.id_to_piece(tok.eos_id),
    "pad_token": tok.id_to_piece(tok.pad_id),
    "unk_token": tok.id_to_piece(tok.unk_id) if tok.unk_id >= 0 else None,  # None: it has none
    "model_max_length": loaded.model_config.max_seq_len,
    "vocab_size": tok.vocab_size,
    "prompt_prefix": list(prefix),
    "chat_template": jinja_chat_template(st.templates.turn, tok.id_to_piece(tok.bos_id)),
  }

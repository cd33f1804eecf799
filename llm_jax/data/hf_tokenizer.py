"""Hugging Face tokenizers behind the interface of llm_jax.data.tokenizer.Tokenizer.

- `tokenizer.json` (GPT-2 byte-level BPE, LLaMA-3 style BPE, converted SentencePiece models) through the
  `tokenizers` library: `HFTokenizer`.
- `tokenizer.model` (SentencePiece): `Tokenizer` itself when it has the project's fixed special ids,
  else `SentencePieceTokenizer` (a LLaMA-2 style model: unk 0, bos 1, eos 2, no pad).

Every tokenizer here has encode, encode_batch, encode_offsets (ids and where each starts in the text),
decode (special ids decode to nothing), id_to_piece,
token_bytes (UTF-8 bytes each id adds to the text, for bits per byte), vocab_size, sha256, path, the
special ids pad/bos/eos/unk (-1 where the tokenizer has none; pad falls back to eos), `prompt_prefix`
(ids put before a text prompt) and `save_hf(out_dir)`, which writes files `transformers`' AutoTokenizer
loads offline. `load_tokenizer(path)` opens any of them from a file or a checkpoint directory: it is the
one loader of prepared data, run directories and packages. `save_tokenizer(tok, out_dir)` writes a
tokenizer's files where `load_tokenizer` finds them again with the same ids, and `identity(tok)` names it
for cache keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2

from llm_jax.data.chat_template import jinja_chat_template
from llm_jax.data.errors import DataError
from llm_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPACE_MARK, UNK_ID, Tokenizer

TOKENIZER_JSON, TOKENIZER_MODEL = "tokenizer.json", "tokenizer.model"
TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP = "tokenizer_config.json", "special_tokens_map.json"
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_SPECIAL_NAMES = ("bos", "eos", "unk", "pad")


def _read_json(path: str) -> dict:
  """A JSON object from `path` ({} when the file does not exist)."""
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"cannot read {path}: {e}") from e
  if not isinstance(data, dict):
    raise DataError(f"{path} is not a JSON object")
  return data


def _token_text(value) -> str | None:
  """The content of a special token as tokenizer_config.json writes it (a string or an AddedToken dict)."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def read_tokenizer_config(directory: str) -> dict:
  """tokenizer_config.json of a checkpoint directory, with special_tokens_map.json's tokens filled in."""
  config = _read_json(os.path.join(directory, TOKENIZER_CONFIG))
  for key, value in _read_json(os.path.join(directory, SPECIAL_TOKENS_MAP)).items():
    config.setdefault(key, value)
  return config


def _ordered_ids(pad: int, bos: int, eos: int, unk: int) -> tuple[int, int, int, int]:
  return (eos if pad < 0 else pad), (eos if bos < 0 else bos), eos, unk


class HFTokenizer:
  """A `tokenizer.json` tokenizer (Hugging Face `tokenizers`) with the project's Tokenizer interface."""

  def __init__(
    self,
    tokenizer_json: str,
    hf_config: dict | None = None,
    path: str = "",
    special_ids: dict[str, int] | None = None,
  ):
    self.path = path
    self.sha256 = hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()
    self._json = tokenizer_json
    try:
      self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # the library raises its own Exception type for every parse error
      raise DataError(f"{path or '<tokenizer.json>'} is not a Hugging Face tokenizer.json: {e}") from e
    spec = json.loads(tokenizer_json)  # once: LLaMA-3's is 9 MB
    self._decoder = spec.get("decoder") or {}
    self._unk_piece = (spec.get("model") or {}).get("unk_token")
    self.hf_config = dict(hf_config or {})
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self._special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    self.special_token_ids = sorted(self._special)  # every special added token (<|user|>, ...)
    ids = {name: self._special_id(name, (special_ids or {}).get(name)) for name in _SPECIAL_NAMES}
    if ids["eos"] < 0:
      raise DataError(
        f"{path or '<tokenizer.json>'}: no end-of-text token; set eos_token in "
        f"{TOKENIZER_CONFIG} (or eos_token_id in config.json)"
      )
    self.pad_id, self.bos_id, self.eos_id, self.unk_id = _ordered_ids(
      ids["pad"], ids["bos"], ids["eos"], ids["unk"]
    )
    self.has_pad = ids["pad"] >= 0  # else pad_id is EOS, which an export must not name as pad
    self._token_bytes = None
    # its pieces are the text's bytes exactly (a byte-level BPE without a normalizer): byte counts
    # place tokens in a text; otherwise the library's offsets do
    self.exact_bytes = self._byte_level() and not spec.get("normalizer")

  # `encode` reads the added and special tokens written in a text itself (as transformers does)
  reads_special_tokens = True

  def _special_id(self, name: str, fallback: int | None) -> int:
    """The id of tokenizer_config.json's `<name>_token`, else `fallback` (config.json), else -1."""
    text = _token_text(self.hf_config.get(f"{name}_token"))
    if text is not None:
      i = self._tok.token_to_id(text)
      if i is None:
        raise DataError(
          f"{self.path or '<tokenizer.json>'}: {name}_token {text!r} of "
          f"{TOKENIZER_CONFIG} is not in the vocabulary"
        )
      return int(i)
    if name == "unk":
      unk = self._unk_piece
      if unk is not None and self._tok.token_to_id(unk) is not None:
        return int(self._tok.token_to_id(unk))
    return int(fallback) if fallback is not None and fallback >= 0 else -1

  @classmethod
  def load(cls, path: str, special_ids: dict[str, int] | None = None) -> HFTokenizer:
    """Loads tokenizer.json (a file, or a directory holding it and its tokenizer_config.json)."""
    directory, file = (
      (path, os.path.join(path, TOKENIZER_JSON))
      if os.path.isdir(path)
      else (os.path.dirname(path) or ".", path)
    )
    try:
      with open(file, encoding="utf-8") as f:
        text = f.read()
    except OSError as e:
      raise DataError(f"cannot read tokenizer {file!r}: {e}") from e
    return cls(text, read_tokenizer_config(directory), path=os.path.abspath(file), special_ids=special_ids)

  @property
  def prompt_prefix(self) -> list[int]:
    """Ids before a text prompt: those the tokenizer's post-processor puts first (LLaMA: BOS), else BOS."""
    with_special = self._tok.encode("a", add_special_tokens=True).ids
    plain = self._tok.encode("a", add_special_tokens=False).ids
    if len(with_special) > len(plain) and with_special[-len(plain) :] == plain:
      return [int(i) for i in with_special[: len(with_special) - len(plain)]]
    return [self.bos_id]

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no BOS/EOS added)."""
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def encode_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """Token ids of `text` and the character of `text` each starts at (the library's alignment)."""
    enc = self._tok.encode(text, add_special_tokens=False)
    return list(enc.ids), [int(a) for a, _ in enc.offsets]

  def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
    """Token ids of many texts (the library parallelizes by itself)."""
    del num_threads
    return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of token ids; special ids decode to nothing."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def id_to_piece(self, i: int) -> str:
    """The token string of one id."""
    return self._tok.id_to_token(int(i)) or ""

  def _byte_level(self) -> bool:
    """Whether pieces are written in GPT-2's byte-to-character alphabet (a ByteLevel decoder)."""
    decoder = self._decoder
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(d.get("type") == "ByteLevel" for d in parts)

  def token_bytes(self) -> np.ndarray:
    """[vocab_size] int32: UTF-8 bytes each id adds to decoded text (0 for special tokens)."""
    if self._token_bytes is None:
      out = np.zeros(self.vocab_size, np.int32)
      byte_level = self._byte_level()
      added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
      for i in range(self.vocab_size):
        piece = self._tok.id_to_token(i)
        if i in self._special or piece is None:
          continue
        if i in added:  # added tokens are stored as plain text
          out[i] = len(added[i].encode("utf-8"))
        elif byte_level:  # one character of the byte alphabet per byte
          out[i] = len(piece)
        elif _BYTE_PIECE.match(piece):
          out[i] = 1
        else:
          out[i] = len(piece.replace(SPACE_MARK, " ").encode("utf-8"))
      self._token_bytes = out
    return self._token_bytes.copy()

  def save_hf(self, out_dir: str) -> list[str]:
    """Writes tokenizer.json and tokenizer_config.json for AutoTokenizer; returns the file names."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, TOKENIZER_JSON), "w", encoding="utf-8") as f:
      f.write(self._json)
    config = dict(self.hf_config)
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    for name in _SPECIAL_NAMES:  # plain strings: what every transformers version reads
      if name == "pad" and not self.has_pad:
        continue
      i = getattr(self, f"{name}_id")
      text = _token_text(config.get(f"{name}_token"))
      if text is None and i >= 0:
        text = self._tok.id_to_token(i)
      if text is not None:
        config[f"{name}_token"] = text
    with open(os.path.join(out_dir, TOKENIZER_CONFIG), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    return [TOKENIZER_JSON, TOKENIZER_CONFIG]

  def __repr__(self):
    return f"HFTokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]}, path={self.path!r})"


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model with its own special ids (e.g. LLaMA-2: unk 0, bos 1, eos 2, no pad)."""

  def __init__(
    self, model_proto: bytes, path: str = "", hf_config: dict | None = None, named: dict | None = None
  ):
    self.path = path
    self.sha256 = hashlib.sha256(model_proto).hexdigest()
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = int(self._sp.get_piece_size())
    self._token_bytes = None
    self.hf_config = dict(hf_config or {})
    ids = {**_sp_ids(self._sp), **(named or {})}  # tokenizer_config.json's names win
    if ids["eos"] < 0:
      raise DataError(f"tokenizer {path or '<bytes>'} has no end-of-text piece (eos_id is -1)")
    self.pad_id, self.bos_id, self.eos_id, self.unk_id = _ordered_ids(
      ids["pad"], ids["bos"], ids["eos"], ids["unk"]
    )
    self.has_pad = ids["pad"] >= 0

  @property
  def prompt_prefix(self) -> list[int]:
    """Ids before a text prompt: BOS."""
    return [self.bos_id]


def _sp_proto(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      proto = f.read()
  except OSError as e:
    raise DataError(f"cannot read tokenizer model {path!r}: {e}") from e
  if not proto:
    raise DataError(f"tokenizer model {path!r} is empty")
  return proto


def _sp_ids(sp) -> dict[str, int]:
  return {"pad": int(sp.pad_id()), "bos": int(sp.bos_id()), "eos": int(sp.eos_id()), "unk": int(sp.unk_id())}


def _named_sp_ids(sp, hf_config: dict, path: str) -> dict[str, int]:
  """The pieces tokenizer_config.json names as bos/eos/unk/pad_token; a name that is no piece of the
  model (e.g. an added token of added_tokens_decoder, which a tokenizer.model cannot hold) raises
  naming it: read silently, its id was the model's own (eos </s> where the config says <|im_end|>)."""
  out = {}
  for name in _SPECIAL_NAMES:
    text = _token_text(hf_config.get(f"{name}_token"))
    if text is None:
      continue
    i = int(sp.piece_to_id(text))
    if sp.id_to_piece(i) != text:
      added = text in {_token_text(t) for t in (hf_config.get("added_tokens_decoder") or {}).values()}
      raise DataError(
        f"{os.path.join(os.path.dirname(path), TOKENIZER_CONFIG)}: {name}_token {text!r} is no piece of "
        f"{path}"
        + (
          " (an added token: llm_jax reads added tokens from a tokenizer.json only; convert the "
          "tokenizer with transformers' save_pretrained, which writes one)"
          if added
          else ""
        )
      )
    out[name] = i
  return out


def load_sentencepiece(path: str, hf_config: dict | None = None) -> Tokenizer:
  """A .model file: Tokenizer when it has the project's special ids, else SentencePieceTokenizer
  (with the special pieces tokenizer_config.json names)."""
  proto = _sp_proto(path)
  try:
    sp = spm.SentencePieceProcessor(model_proto=proto)
  except RuntimeError as e:
    raise DataError(f"{path!r} is not a SentencePiece model: {e}") from e
  ids = _sp_ids(sp)
  named = _named_sp_ids(sp, hf_config or {}, path)
  if {**ids, **named} == {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "unk": UNK_ID}:
    return Tokenizer(proto, path=os.path.abspath(path))
  return SentencePieceTokenizer(proto, path=os.path.abspath(path), hf_config=hf_config, named=named)


def load_tokenizer(path: str, special_ids: dict[str, int] | None = None):
  """A tokenizer from tokenizer.json, a .model file, or a directory with either (tokenizer.json first).

  `special_ids` ({"bos": id, ...}, e.g. from a model's config.json) fill in special tokens that
  tokenizer_config.json does not name.
  """
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, TOKENIZER_JSON)):
      return HFTokenizer.load(path, special_ids=special_ids)
    if os.path.exists(os.path.join(path, TOKENIZER_MODEL)):
      return load_sentencepiece(os.path.join(path, TOKENIZER_MODEL), read_tokenizer_config(path))
    raise DataError(f"{path} holds no tokenizer: neither {TOKENIZER_JSON} nor {TOKENIZER_MODEL}")
  if path.endswith(".json"):
    return HFTokenizer.load(path, special_ids=special_ids)
  return load_sentencepiece(path, read_tokenizer_config(os.path.dirname(os.path.abspath(path))))


def is_own(tokenizer) -> bool:
  """Whether `tokenizer` is llm_jax's own SentencePiece model (pad 0, bos 1, eos 2, unk 3)."""
  return type(tokenizer) is Tokenizer


def identity(tokenizer) -> str:
  """What names a tokenizer in cache keys: its sha256 for llm_jax's own SentencePiece model (as before),
  else the sha256 of (file sha256, kind, special ids), so ids chosen by tokenizer_config.json count."""
  if is_own(tokenizer):
    return tokenizer.sha256
  ids = {name: int(getattr(tokenizer, f"{name}_id")) for name in _SPECIAL_NAMES}
  desc = {"sha256": tokenizer.sha256, "kind": type(tokenizer).__name__, "special_ids": ids}
  return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def save_tokenizer(tokenizer, out_dir: str) -> str:
  """Writes the tokenizer's files into out_dir; returns the main file's path (what load_tokenizer opens).

  llm_jax's own SentencePiece model is copied alone as tokenizer.model; any other tokenizer is written as
  its Hugging Face files (tokenizer.json or tokenizer.model, with a tokenizer_config.json naming every
  special token, so the ids do not depend on a model's config.json).
  """
  os.makedirs(out_dir, exist_ok=True)
  if is_own(tokenizer):
    path = os.path.join(out_dir, TOKENIZER_MODEL)
    if os.path.abspath(tokenizer.path) != os.path.abspath(path):
      shutil.copyfile(tokenizer.path, path + ".partial")
      os.replace(path + ".partial", path)
    return path
  return os.path.join(out_dir, save_hf_tokenizer(tokenizer, out_dir)[0])


def tokenizer_files(main_path: str) -> list[str]:
  """The files of a tokenizer saved by save_tokenizer: its main file and tokenizer_config.json if any."""
  config = os.path.join(os.path.dirname(main_path), TOKENIZER_CONFIG)
  return [main_path] + ([config] if os.path.exists(config) else [])


def prompt_prefix(tokenizer) -> list[int]:
  """Ids put before a text prompt: the tokenizer's own (BOS for Hugging Face models), else EOS, the
  document separator llm_jax's training puts before every document."""
  prefix = getattr(tokenizer, "prompt_prefix", None)
  return [int(i) for i in prefix] if prefix is not None else [int(tokenizer.eos_id)]


def _sp_hf_config(tokenizer: Tokenizer, model_max_length: int | None) -> dict:
  """tokenizer_config.json for a SentencePiece model: LlamaTokenizer, no BOS/EOS added by encode."""
  model = _sp_model_bytes(tokenizer)
  sp = spm.SentencePieceProcessor(model_proto=model)
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model)
  config: dict[str, Any] = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": False,
    "add_eos_token": False,
    "legacy": False,
    "add_prefix_space": bool(proto.normalizer_spec.add_dummy_prefix),
    "clean_up_tokenization_spaces": False,
  }
  for name in _SPECIAL_NAMES:
    i = getattr(tokenizer, f"{name}_id")
    if 0 <= i < sp.get_piece_size() and (name != "pad" or sp.pad_id() >= 0):
      config[f"{name}_token"] = sp.id_to_piece(i)
  if model_max_length:
    config["model_max_length"] = int(model_max_length)
  return config


def _sp_model_bytes(tokenizer: Tokenizer) -> bytes:
  if not tokenizer.path or not os.path.exists(tokenizer.path):
    raise DataError(f"{tokenizer!r} has no model file on disk to export")
  return _sp_proto(tokenizer.path)


def save_hf_tokenizer(
  tokenizer, out_dir: str, model_max_length: int | None = None, chat_turn: str | None = None
) -> list[str]:
  """Writes the files AutoTokenizer loads offline for any tokenizer here; returns their names.

  `chat_turn`: the SFT turn template the model was fine-tuned with, written as tokenizer_config.json's
  Jinja `chat_template` (in place of any the source tokenizer had: the model now answers in this one).
  """
  if isinstance(tokenizer, HFTokenizer):
    names = tokenizer.save_hf(out_dir)
    config = _read_json(os.path.join(out_dir, TOKENIZER_CONFIG))
  elif isinstance(tokenizer, Tokenizer):
    os.makedirs(out_dir, exist_ok=True)
    shutil.copyfile(tokenizer.path, os.path.join(out_dir, TOKENIZER_MODEL))
    config = dict(getattr(tokenizer, "hf_config", {}) or {}) or _sp_hf_config(tokenizer, model_max_length)
    names = [TOKENIZER_MODEL, TOKENIZER_CONFIG]
  else:
    raise DataError(f"cannot export tokenizer of type {type(tokenizer).__name__} to the Hugging Face format")
  if model_max_length:
    config.setdefault("model_max_length", int(model_max_length))
  if chat_turn:
    config["chat_template"] = jinja_chat_template(chat_turn, tokenizer.id_to_piece(tokenizer.bos_id))
  with open(os.path.join(out_dir, TOKENIZER_CONFIG), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return names

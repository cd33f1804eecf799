"""SentencePiece tokenizer: training on the corpus, exact round trips, fixed special ids, token bytes."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import (
  sentencepiece_model_pb2,  # needs protobuf (grain, orbax and tensorboardX need it too)
)

from llm_jax.data.errors import DataError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# Encoders' control pieces (data.tokenizer.encoder_pieces=True): ids 4, 5, 6, after the fixed ones. As
# control symbols, text never encodes to them and they decode to nothing.
ENCODER_PIECES = ("[MASK]", "[CLS]", "[SEP]")
# SentencePiece writes spaces as U+2581 inside pieces; a literal U+2581 in text cannot round-trip,
# so the cleaner replaces it (see cleaning.py).
SPACE_MARK = "\u2581"
# SentencePiece's unigram trainer gives different models for different thread counts; prepare() trains
# with this fixed count so the tokenizer does not depend on the machine's cores.
TRAIN_THREADS = 4
_TRAIN_CHUNK_CHARS = 4000  # training "sentences" are document chunks of at most this many characters


class Tokenizer:
  """A loaded SentencePiece model with the project's fixed special ids."""

  pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID
  has_pad = True  # a pad id of its own (Hugging Face tokenizers without one use EOS: has_pad False)

  def __init__(self, model_proto: bytes, path: str = ""):
    self.path = path
    self.sha256 = hashlib.sha256(model_proto).hexdigest()
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = int(self._sp.get_piece_size())
    self._token_bytes = None
    self.mask_id, self.cls_id, self.sep_id = (self.special_id(p) for p in ENCODER_PIECES)
    for name, want in (("pad", PAD_ID), ("bos", BOS_ID), ("eos", EOS_ID), ("unk", UNK_ID)):
      got = getattr(self._sp, f"{name}_id")()
      if got != want:
        raise DataError(
          f"tokenizer {path or '<bytes>'}: {name}_id is {got}, expected {want}; "
          "it was not trained by llm_jax.data.tokenizer.train_tokenizer"
        )

  @classmethod
  def load(cls, path: str) -> Tokenizer:
    """Loads a .model file written by `train_tokenizer`."""
    try:
      with open(path, "rb") as f:
        proto = f.read()
    except OSError as e:
      raise DataError(f"cannot read tokenizer model {path!r}: {e}") from e
    if not proto:
      raise DataError(f"tokenizer model {path!r} is empty")
    try:
      return cls(proto, path=os.path.abspath(path))
    except RuntimeError as e:
      raise DataError(f"{path!r} is not a SentencePiece model: {e}") from e

  def special_id(self, piece: str) -> int | None:
    """The id of a control piece such as '[MASK]', or None when this tokenizer has none."""
    i = int(self._sp.piece_to_id(piece))
    return i if i != UNK_ID and self._sp.is_control(i) else None

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no BOS/EOS added)."""
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
    """Token ids of many texts, encoded by SentencePiece's own thread pool."""
    return self._sp.encode(list(texts), num_threads=max(1, num_threads))

  def decode(self, ids: Iterable[int]) -> str:
    """Text of token ids; special ids decode to nothing."""
    return self._sp.decode([int(i) for i in ids])

  def encode_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """Token ids of `text` and the character of `text` each starts at (SentencePiece's own
    alignment to the input: a piece of bytes of one character starts at that character)."""
    pieces = self._sp.encode(text, return_type="proto").pieces
    return [p.id for p in pieces], [int(c) for c in char_index(text, [p.begin for p in pieces])]

  def id_to_piece(self, i: int) -> str:
    """The piece string of one id."""
    return self._sp.id_to_piece(int(i))

  def token_bytes(self) -> np.ndarray:
    """[vocab_size] int32: UTF-8 bytes each id adds to decoded text (0 for specials, 1 for <0xXX>)."""
    if self._token_bytes is None:
      out = np.zeros(self.vocab_size, np.int32)
      for i in range(self.vocab_size):
        if self._sp.is_control(i) or self._sp.is_unknown(i):
          continue
        if self._sp.is_byte(i):
          out[i] = 1
        else:
          out[i] = len(self._sp.id_to_piece(i).replace(SPACE_MARK, " ").encode("utf-8"))
      self._token_bytes = out
    return self._token_bytes.copy()

  def __repr__(self):
    return f"Tokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]}, path={self.path!r})"


def _chunks(texts: Iterable[str], lowercase: bool) -> Iterator[str]:
  """Training sentences: documents cut at line ends into chunks SentencePiece will not skip."""
  for text in texts:
    if lowercase:
      text = text.lower()
    start = 0
    while start < len(text):
      end = min(len(text), start + _TRAIN_CHUNK_CHARS)
      if end < len(text):
        cut = text.rfind("\n", start, end)
        end = cut + 1 if cut > start else end
      yield text[start:end]
      start = end


def _lowercase_rules() -> str:
  """A SentencePiece normalization TSV that folds case without changing UTF-8 lengths."""
  lines = []
  for cp in range(0x110000):
    if 0xD800 <= cp <= 0xDFFF:
      continue
    ch = chr(cp)
    lo = ch.lower()
    if lo != ch and len(lo) == 1 and len(lo.encode()) == len(ch.encode()):
      lines.append(f"{cp:X}\t{ord(lo):X}")
  return "\n".join(lines) + "\n"


def _canonical(proto: bytes) -> bytes:
  """The model bytes without the trainer's thread count, so the sha256 does not depend on the machine."""
  m = sentencepiece_model_pb2.ModelProto()
  m.ParseFromString(proto)
  m.trainer_spec.ClearField("num_threads")
  return m.SerializeToString()


def train_tokenizer(
  texts: Iterable[str],
  out_path: str,
  *,
  vocab_size: int,
  model_type: str = "bpe",
  character_coverage: float = 0.9995,
  lowercase: bool = False,
  max_sentence_length: int = 16384,
  input_sentence_size: int = 2_000_000,
  num_threads: int = TRAIN_THREADS,
  seed: int = 0,
  control_pieces: Sequence[str] = (),
) -> Tokenizer:
  """Trains SentencePiece on `texts` and writes `out_path` atomically; returns the loaded tokenizer.

  `control_pieces` (e.g. ENCODER_PIECES) take the ids after the four fixed ones, in order.
  """
  if model_type not in ("bpe", "unigram", "char"):
    raise DataError(f"data.tokenizer.type={model_type!r} is not one of bpe, unigram, char")
  if vocab_size < 260 + 4:  # char too (it said "cannot be supported ...; lower vocab_size")
    raise DataError(
      f"data.tokenizer.vocab_size={vocab_size} is too small: byte fallback alone needs "
      "256 pieces plus 4 special ids; use at least 300"
    )
  kwargs = dict(
    vocab_size=vocab_size,
    model_type=model_type,
    character_coverage=character_coverage,
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    byte_fallback=True,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    split_by_whitespace=True,
    pad_id=PAD_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    pad_piece="<pad>",
    bos_piece="<s>",
    eos_piece="</s>",
    unk_piece="<unk>",
    max_sentence_length=max_sentence_length,
    input_sentence_size=input_sentence_size,
    shuffle_input_sentence=True,
    num_threads=max(1, num_threads),
    minloglevel=2,
  )
  if control_pieces:
    kwargs["control_symbols"] = list(control_pieces)
  if model_type == "char":
    kwargs["hard_vocab_limit"] = False  # a char vocab is as large as the characters covered
  if lowercase:
    rules = tempfile.NamedTemporaryFile("w", suffix=".tsv", delete=False, encoding="utf-8")
    rules.write(_lowercase_rules())
    rules.close()
    kwargs["normalization_rule_tsv"] = rules.name
  else:
    kwargs["normalization_rule_name"] = "identity"
  count = [0]

  def sentences():
    for s in _chunks(texts, lowercase):
      count[0] += 1
      yield s

  model = io.BytesIO()
  spm.set_random_generator_seed(seed + 1)  # the input-sentence sample is reproducible
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_writer=model, **kwargs)
  except RuntimeError as e:
    msg = str(e)
    if count[0] == 0:
      raise DataError(
        "the training split is empty: no text to train the tokenizer on; check "
        "data.corpus and the filters (data.min_doc_chars, data.val_fraction)"
      ) from e
    if "Vocabulary size" in msg or "vocab_size" in msg:
      raise DataError(
        f"data.tokenizer.vocab_size={vocab_size} cannot be supported by this corpus "
        f"({msg.strip().splitlines()[-1]}); lower data.tokenizer.vocab_size or add "
        "text"
      ) from e
    raise DataError(f"SentencePiece training failed: {msg}") from e
  finally:
    if lowercase:
      os.unlink(kwargs["normalization_rule_tsv"])
  proto = _canonical(model.getvalue())
  tmp = f"{out_path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(proto)
  os.replace(tmp, out_path)
  tok = Tokenizer(proto, path=os.path.abspath(out_path))
  logging.info(
    "trained %s tokenizer: %d pieces from %d sentences -> %s", model_type, tok.vocab_size, count[0], out_path
  )
  return tok


def char_index(text: str, byte_at) -> np.ndarray:
  """The character of `text` each UTF-8 byte offset in `byte_at` falls in (len(text) past the end)."""
  char_end = np.cumsum([len(ch.encode("utf-8")) for ch in text])  # byte where each char ends
  return np.searchsorted(char_end, np.asarray(byte_at, np.int64), side="right")

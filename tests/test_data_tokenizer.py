"""Tokenizer: exact round trips, byte accounting, fixed ids, model types, vocab-size errors."""

import random

import numpy as np
import pytest

from llm_jax.data.errors import DataError
from llm_jax.data.tokenizer import Tokenizer, train_tokenizer

HARD = [
  "",
  " ",
  "\n",
  "\t",
  "a\n\nb\n\n\n",
  "tab\tseparated\tcolumns\t",
  "runs   of     spaces  ",
  "def f(x):\n    if x:\n\treturn  x\n        # deep\n",
  "emoji 😀🚀👍🏽 and ZWJ 👩‍💻",
  "中文字符 日本語のテキスト 한국어",
  "accents: café naïve résumé Ærø ß",
  "  leading and trailing  \n",
  "digits 1234567890 3.14159",
  "</s> <s> <pad> <unk> literal specials",
  "mixed\r\n?",
  "ﬁ ligature and NBSP\u00a0kept",
]


def _corpus(seed=0):
  rng = random.Random(seed)
  words = ["return", "import", "class", "def", "the", "of", "é", "日本"]
  words += [
    "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(300)
  ]
  docs = []
  for _ in range(80):
    lines = []
    for _ in range(rng.randint(3, 10)):
      indent = " " * rng.choice([0, 0, 4, 8]) + rng.choice(["", "\t"])
      lines.append(indent + " ".join(rng.choice(words) for _ in range(rng.randint(1, 8))))
    docs.append("\n".join(lines) + "\n")
  return docs


@pytest.fixture(scope="module", params=["bpe", "unigram", "char"])
def tok(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param) / "t.model"
  size = 300 if request.param == "unigram" else 400
  return train_tokenizer(_corpus(), str(path), vocab_size=size, model_type=request.param)


@pytest.mark.parametrize("text", HARD)
def test_round_trip_and_bytes(tok, text):
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


def test_special_ids_and_load(tok):
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
  tb = tok.token_bytes()
  assert tb.shape == (tok.vocab_size,) and tb[:4].sum() == 0
  again = Tokenizer.load(tok.path)
  assert again.sha256 == tok.sha256 and len(again.sha256) == 64
  assert again.encode("def f(x):\n    return x") == tok.encode("def f(x):\n    return x")
  assert tok.eos_id not in tok.encode("</s>")  # text never produces control ids


def test_bpe_learns_indentation_and_newline_pieces(tmp_path):
  t = train_tokenizer(_corpus() * 3, str(tmp_path / "b.model"), vocab_size=400)
  pieces = {t.id_to_piece(i) for i in range(t.vocab_size)}
  assert any("\n" in p for p in pieces)
  assert "\u2581\u2581\u2581\u2581" in pieces  # four spaces of indentation


def test_lowercase_folds_case_keeping_byte_counts(tmp_path):
  t = train_tokenizer(_corpus(), str(tmp_path / "l.model"), vocab_size=400, lowercase=True)
  text = "Hello WORLD Été\n\tX"
  ids = t.encode(text)
  assert t.decode(ids) == text.lower()
  assert int(t.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


def test_vocab_too_large_names_the_key(tmp_path):
  with pytest.raises(DataError, match="data.tokenizer.vocab_size"):
    train_tokenizer(_corpus()[:3], str(tmp_path / "x.model"), vocab_size=5000)
  with pytest.raises(DataError, match="data.tokenizer.vocab_size"):
    train_tokenizer(_corpus(), str(tmp_path / "y.model"), vocab_size=100)


@pytest.mark.parametrize("model_type", ["bpe", "char"])
def test_vocab_below_the_byte_pieces_says_use_at_least_300(tmp_path, model_type):
  """Below 256 byte pieces + 4 special ids every tokenizer type fails saying how large to go (a char
  tokenizer said 'cannot be supported by this corpus ...; lower data.tokenizer.vocab_size')."""
  with pytest.raises(DataError, match="vocab_size=100 is too small.*at least 300"):
    train_tokenizer(["hello world " * 50], str(tmp_path / "t.model"), vocab_size=100, model_type=model_type)


def test_load_errors_name_the_file(tmp_path):
  with pytest.raises(DataError, match="nope.model"):
    Tokenizer.load(str(tmp_path / "nope.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(DataError, match="bad.model"):
    Tokenizer.load(str(bad))


def test_token_bytes_matches_decoded_pieces(tok):
  tb = tok.token_bytes()
  rng = np.random.default_rng(0)
  for i in rng.integers(4, tok.vocab_size, 50):
    piece_text = tok.decode([int(i)])
    if not tok.id_to_piece(int(i)).startswith("<0x"):
      assert len(piece_text.encode("utf-8")) == tb[i], tok.id_to_piece(int(i))

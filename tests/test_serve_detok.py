"""The server's incremental detokenizer (generate.TextStream) against decoding the whole id list.

Random id sequences (whole words, multi-byte characters, byte-fallback pieces, special ids) through
three kinds of tokenizer: llm_jax's SentencePiece (byte fallback), a byte-level BPE (the GPT-2
fixture) and a Metaspace BPE with byte fallback whose decoder drops the leading space (LLaMA-style).
The reference is the previous TextStream, which decoded the whole list for every id (with its
hold-back rule fixed: a stop prefix before an incomplete character is held too).
"""

import importlib
import random

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from llm_jax import generate as G
from llm_jax.data.hf_tokenizer import HFTokenizer, load_tokenizer
from llm_jax.data.tokenizer import train_tokenizer
from llm_jax.serve.prompts import text_offsets

stream_lib = importlib.import_module("llm_jax.generate.stream")  # the package exports a function `stream`
WORDS = (
  "the cat sat on a mat über café naïve 日本語 ünïcödé ½ € 🙂 def return import self print ( ) : , ."
).split()


class FullDecodeStream:
  """The TextStream before incremental decoding (each id re-decodes the whole list), as reference."""

  def __init__(self, tokenizer, stop=(), hold_chars=0, check=None, context=()):
    self.tokenizer, self.stop, self.hold_chars, self.check = tokenizer, tuple(stop), hold_chars, check
    self.ids, self.text, self.emitted, self.finished, self.reason = [], "", 0, False, None
    self.context = list(context)  # the whole prompt: the text is what the ids add after it

  def push(self, token_id):
    if self.finished:
      return ""
    self.ids.append(int(token_id))
    head = self.tokenizer.decode(self.context)
    whole = self.tokenizer.decode(self.context + self.ids)
    self.text = whole[len(head) :] if whole.startswith(head) else self.tokenizer.decode(self.ids)
    if self._cut():
      return self._take(len(self.text))
    return self._take(len(self.text) - stream_lib._held(self.text, self.stop) - self.hold_chars)

  def close(self):
    if not self.finished:
      self._cut(final=True)
    return self._take(len(self.text))

  def _cut(self, final=False):
    cut = None
    start = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
    # before the end, not in an incomplete character's trailing U+FFFD (up to 3)
    end = (
      len(self.text) if final else len(self.text) - min(3, len(self.text) - len(self.text.rstrip("\ufffd")))
    )
    for s in self.stop:
      i = self.text.find(s, start, end)
      if i >= 0 and (cut is None or i < cut):
        cut, self.reason = i, "stop"
    if self.check is not None:
      j = self.check(self.text)
      if j is not None and (cut is None or j <= cut):
        cut, self.reason = j, "blocked"
    if cut is None:
      return False
    self.text = self.text[: max(cut, self.emitted)]
    self.finished = True
    return True

  def _take(self, upto):
    piece = self.text[self.emitted : upto] if upto > self.emitted else ""
    self.emitted = max(self.emitted, upto)
    return piece


def _texts(n=60, seed=0):
  rng = random.Random(seed)
  return [" ".join(rng.choice(WORDS) for _ in range(80)) + "\n" for _ in range(n)]


def _metaspace(tmp_path):
  tk = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
  tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
  tk.decoder = decoders.Sequence(
    [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
  )
  specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
  tk.train_from_iterator(
    _texts(), trainers.BpeTrainer(vocab_size=340, special_tokens=specials, show_progress=False)
  )
  return HFTokenizer(tk.to_str(), {"eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"})


@pytest.fixture(scope="module", params=["sentencepiece", "gpt2", "metaspace"])
def tok(request, tmp_path_factory):
  d = tmp_path_factory.mktemp("detok")
  if request.param == "sentencepiece":
    return train_tokenizer(_texts(), str(d / "tok.model"), vocab_size=330)
  if request.param == "gpt2":
    return load_tokenizer("tests/fixtures/hf/gpt2")
  return _metaspace(d)


def _random_ids(tok, rng, n):
  """Word tokens, raw UTF-8 byte pieces (whole and split characters, stray bytes) and special ids."""
  ids = []
  while len(ids) < n:
    r = rng.random()
    if r < 0.55:
      ids += tok.encode(rng.choice([" ", ""]) + rng.choice(WORDS))
    elif r < 0.75:  # a multi-byte character, possibly as byte-fallback pieces
      ids += tok.encode(rng.choice(["é", "日", "🙂", "€", " ü"]))
    elif r < 0.9:
      ids.append(rng.randrange(tok.vocab_size))
    else:
      ids.append(rng.choice([tok.eos_id, tok.bos_id, tok.unk_id]))
  return [i for i in ids if i >= 0][:n]


def test_pushes_equal_full_decoding(tok):
  """Piece for piece equal to the full-decode reference; the text equals decode(all ids)."""
  rng = random.Random(1)
  for trial in range(40):
    ids = _random_ids(tok, rng, rng.randrange(1, 120))
    new, ref = G.TextStream(tok), FullDecodeStream(tok)
    for i in ids:
      assert new.push(i) == ref.push(i), (trial, ids)
    assert new.close() == ref.close()
    assert new.text == tok.decode(ids) == ref.text
    assert new.emitted == len(new.text)


def test_a_completion_decodes_after_its_prompt(tok):
  """With the prompt as context, the text is what the ids add to the prompt's text, piece for piece
  as the full-decode reference that decodes prompt and ids together (the metaspace tokenizer's decoder
  drops a text's first space: decoded alone, a completion lost the space before its first word)."""
  rng = random.Random(5)
  word_first = 0
  for trial in range(40):
    prompt = ([tok.bos_id] if rng.random() < 0.5 else []) + tok.encode(
      " ".join(rng.choice(WORDS[:6]) for _ in range(rng.randrange(1, 12)))
    )
    ids = _random_ids(tok, rng, rng.randrange(1, 60))
    if rng.random() < 0.5:
      ids = tok.encode(" " + rng.choice(WORDS[:6])) + ids
    new, ref = G.TextStream(tok, context=prompt), FullDecodeStream(tok, context=prompt)
    for i in ids:
      assert new.push(i) == ref.push(i), (trial, prompt, ids)
    assert new.close() == ref.close()
    whole, head = tok.decode(prompt + ids), tok.decode(prompt)
    assert whole.startswith(head) and new.text == whole[len(head) :] == ref.text, (trial, prompt, ids)
    word_first += new.text.startswith(" ")
    chunked = G.TextStream(tok, context=prompt)
    out = "".join(chunked.extend(ids[k : k + 5])[0] for k in range(0, len(ids), 5)) + chunked.close()
    assert out == new.text
  assert word_first > 10


def test_chunks_with_stops_equal_one_by_one(tok):
  """`extend` over random chunk sizes: the same text, kept ids and finish as pushing one by one;
  stops are taken from the text so that they span chunk boundaries."""
  rng = random.Random(2)
  crossing = 0
  for trial in range(60):
    ids = _random_ids(tok, rng, rng.randrange(4, 100))
    full = tok.decode(ids)
    stops = []
    for _ in range(rng.randrange(0, 3)):
      a = rng.randrange(len(full))
      stops.append(full[a : a + rng.randrange(1, 6)])
    stops = [s for s in stops if s.strip("\ufffd")]
    hold = rng.choice([0, 0, 3])
    new, ref = G.TextStream(tok, stops, hold_chars=hold), FullDecodeStream(tok, stops, hold)
    got, want, pos = [], [], 0
    while pos < len(ids) and not new.finished:
      k = rng.randrange(1, 9)
      piece, kept = new.extend(ids[pos : pos + k])
      got.append(piece)
      for j, i in enumerate(ids[pos : pos + k]):
        want.append(ref.push(i))
        if ref.finished:
          assert kept == j and new.finished and new.reason == ref.reason, (trial, stops)
          crossing += j > 0
          break
      else:
        assert kept == len(ids[pos : pos + k]) and not new.finished
      assert "".join(got) == "".join(want), (trial, stops)
      pos += k
    assert new.close() == ref.close()
    assert new.text == ref.text
    if not stops and not new.finished:
      assert new.text == full
  assert crossing > 3  # stops completed inside a chunk, after earlier ids of it


def test_long_sequence_keeps_bounded_state():
  """Thousands of ids: the text matches full decoding and only recent text stays live."""
  tok = load_tokenizer("tests/fixtures/hf/gpt2")
  rng = random.Random(3)
  ids = _random_ids(tok, rng, 3000)
  s = G.TextStream(tok, stop=["\x00never"])
  out = "".join(s.extend(ids[i : i + 4])[0] for i in range(0, len(ids), 4)) + s.close()
  assert out == tok.decode(ids) == s.text
  assert len(s._live) < 600 and s._p > len(ids) - 50


def test_filter_check_sees_whole_text_and_cuts():
  tok = load_tokenizer("tests/fixtures/hf/gpt2")
  ids = tok.encode(" the cat sat on a mat and the cat sat again")

  def check(text):
    return text.find("mat") if "mat" in text else None

  new, ref = G.TextStream(tok, hold_chars=4, check=check), FullDecodeStream(tok, hold_chars=4, check=check)
  piece, kept = new.extend(ids)
  want, taken = "", 0
  while not ref.finished:
    want += ref.push(ids[taken])
    taken += 1
  assert (piece, kept) == (want, taken - 1) and new.reason == "blocked" == ref.reason
  assert new.text == ref.text == " the cat sat on a "


class _CharTok:
  """Each id is one character (id 300 is half of a two-byte character: decodes to U+FFFD)."""

  def decode(self, ids):
    out = "".join("\ufffd" if i == 300 else chr(i) for i in ids)
    return out.replace("\ufffd" + chr(301), "é")


def test_stop_prefix_before_an_incomplete_character_is_held():
  """Stop "aé" with é arriving in two ids: "a" is held while é is incomplete (it used to be sent,
  so the client saw the start of the stop sequence)."""
  s = G.TextStream(_CharTok(), stop=["aé"])
  out = s.push(ord("x")) + s.push(ord("a")) + s.push(300) + s.push(301) + s.close()
  assert s.finished and s.reason == "stop" and out == "x" == s.text
  s = G.TextStream(_CharTok(), stop=["aé"])
  out = s.push(ord("a")) + s.push(300) + s.push(ord("b")) + s.close()
  assert not s.finished and out == "a\ufffdb"


def test_tokenizer_without_unk_serves_text_and_tokenizer_routes():
  """A Hugging Face tokenizer with no unk token (the LLaMA-3 style fixture: unk_id -1): text prompts,
  /tokenize and /tokenizer_info work (id_to_piece(-1) raised OverflowError in every one of them)."""
  from types import SimpleNamespace

  from llm_jax.serve import prompts, tokenization

  tok = load_tokenizer("tests/fixtures/hf/llama")
  assert tok.unk_id == -1
  eos = tok.id_to_piece(tok.eos_id)
  assert prompts.encode_text(tok, "the cat" + eos) == tok.encode("the cat") + [tok.eos_id]
  st = SimpleNamespace(
    loaded=SimpleNamespace(
      tokenizer=tok, prompt_prefix=tok.prompt_prefix, model_config=SimpleNamespace(max_seq_len=64)
    ),
    templates=SimpleNamespace(turn="<|{role}|>\n{content}\n"),
  )
  req = tokenization.TokenizeRequest(prompt="the cat", return_token_strs=True)
  assert tokenization.tokenize(st, req)["tokens"] == tok.prompt_prefix + tok.encode("the cat")
  info = tokenization.tokenizer_info(st)
  assert info["unk_token"] is None and info["eos_token"] == eos
  assert info["bos_token"] == tok.id_to_piece(tok.prompt_prefix[0])


def test_top_logprobs_keep_the_best_of_tokens_with_one_text():
  """Ids whose text is the same (byte-level pieces of partial characters all read U+FFFD) share one
  top_logprobs key: it keeps the highest log-prob, not the last written (rows come best first)."""
  from llm_jax.serve.prompts import token_str, top_dict

  tok = load_tokenizer("tests/fixtures/hf/gpt2")
  same = [i for i in range(tok.vocab_size) if token_str(tok, i) == "\ufffd"][:3]
  other = tok.encode(" the")[0]
  assert len(same) == 3
  row = [(same[0], -0.5), (other, -1.0), (same[1], -2.0)]
  assert top_dict(tok, row, same[1], -2.0) == {"\ufffd": -0.5, token_str(tok, other): -1.0}
  # the chosen token outside the row, sharing a key with a better one: the best is kept too
  assert top_dict(tok, row[:2], same[2], -3.0) == {"\ufffd": -0.5, token_str(tok, other): -1.0}
  assert top_dict(tok, row[1:], same[0], -0.5)["\ufffd"] == -0.5


@pytest.mark.parametrize("path", ["tests/fixtures/hf/gpt2", "tests/fixtures/hf/llama"])
def test_token_utf8_of_byte_level_pieces_joins_to_the_text(path):
  """The bytes of each token of a byte-level BPE (pieces of multi-byte characters included, which
  decode alone to U+FFFD) join to the text's UTF-8 (chat logprobs' `bytes`)."""
  from llm_jax.serve.prompts import token_utf8

  tok = load_tokenizer(path)
  text = " ".join(WORDS)
  ids = tok.encode(text)
  assert any(tok.decode([i]) == "\ufffd" for i in ids)  # some ids are parts of characters
  assert b"".join(bytes(token_utf8(tok, i)) for i in ids) == text.encode("utf-8")
  assert token_utf8(tok, tok.eos_id) == []  # a special id adds no text


def _completion_events(tok, prompt_ids, ids, stop, chunk=3):
  """The engine's events for `ids` decoded in chunks of `chunk` (serve.chunk.slot_update), and the
  choice they fill."""

  from llm_jax.serve.chunk import slot_update
  from llm_jax.serve.sequences import Choice, Handle

  choice = Choice(0, prompt_ids, G.SamplingParams(stop=stop), top_n=1)
  choice.text = G.TextStream(tok, stop=list(stop), context=prompt_ids)  # as Engine.submit makes it
  handle = Handle("r", [choice], None, None, 0.0)
  events, reason = [], None
  for at in range(0, len(ids), chunk):
    steps = ids[at : at + chunk]
    lps = [-0.5 - 0.1 * (at + j) for j in range(len(steps))]
    o = {
      "token": [steps],
      "logprob": [lps],
      "emitted": [[1] * len(steps)],
      "eos": [[0] * len(steps)],
      "active": [at + chunk < len(ids)],
      "top_ids": [[[t] for t in steps]],
      "top_logprobs": [[[v] for v in lps]],
    }
    text, new, new_lps, new_top, reason = slot_update(choice, 0, o, len(steps))
    handle.record(choice, new, new_lps, new_top)
    events.append(("delta", 0, text, new, new_lps, new_top))
    if reason is not None:
      break
  choice.finish_reason = reason
  return choice, events + [("done", 0, reason), ("end",)]


@pytest.mark.parametrize("echo", [False, True])
@pytest.mark.parametrize("stop", [(), ("t ü",), ("\u00e9 na",)])
@pytest.mark.parametrize("one_write", [False, True])
@pytest.mark.parametrize("kind", ["gpt2", "metaspace"])
def test_streamed_listing_equals_the_body(echo, stop, one_write, kind, tmp_path):
  """A completion stream's logprobs (text_offset above all) joined equal the whole body's, with parts
  of characters held back, a stop cutting the text, and the events arriving one at a time or all in
  one write (the request ended before the stream began to send: offsets were clipped to the text
  seen so far). With the metaspace tokenizer (its decoder drops a text's first space) the completion
  keeps its first space and the listing's offsets point into that text."""
  import asyncio
  import time
  from types import SimpleNamespace

  from llm_jax.serve.completion import CompletionResponse
  from llm_jax.serve.prompts import Prompt
  from llm_jax.serve.schema import CompletionRequest

  tok = load_tokenizer("tests/fixtures/hf/gpt2") if kind == "gpt2" else _metaspace(tmp_path)
  ids = tok.encode(" " + " ".join(WORDS))
  prompt_ids = [tok.eos_id] + tok.encode("a")
  st = SimpleNamespace(
    loaded=SimpleNamespace(tokenizer=tok),
    token_bytes=tok.token_bytes(),
    metrics=SimpleNamespace(ttft=SimpleNamespace(observe=lambda s: None)),
    name="m",
  )
  req = CompletionRequest(prompt="a", logprobs=1, echo=echo, stream=True, max_tokens=len(ids))

  class Request:
    async def receive(self):
      await asyncio.Event().wait()

  async def reply(stream: bool):
    choice, events = _completion_events(tok, prompt_ids, ids, stop)
    handle = SimpleNamespace(queue=asyncio.Queue(), deadline=time.monotonic() + 60, submitted=0.0)
    handle.cancel = lambda: None
    prompt = Prompt(prompt_ids, 1, "a")
    resp = CompletionResponse(st, req, handle, [choice], [prompt], {}, "cmpl-x")
    if not stream or one_write:
      for e in events:
        handle.queue.put_nowait(e)
      if not stream:
        return await resp.collect(Request())
    else:

      async def feed():
        for e in events:
          await asyncio.sleep(0.001)
          handle.queue.put_nowait(e)

      asyncio.get_running_loop().create_task(feed())
    return [
      json.loads(x[6:])
      for out in [s async for s in resp.sse(Request())]
      for x in out.split("\n\n")
      if x.startswith("data: {")
    ]

  import json

  whole = asyncio.run(reply(False))["choices"][0]
  chunks = [c for e in asyncio.run(reply(True)) for c in e["choices"]]
  shown = whole["text"][1:] if echo else whole["text"]
  if stop:
    assert whole["finish_reason"] == "stop" and shown == " " + " ".join(WORDS).split(stop[0])[0]
  else:
    assert shown == " " + " ".join(WORDS)
  listing = whole["logprobs"]
  for k in range(1 if echo else 0, len(listing["tokens"])):  # a new token's text is at its offset
    t, o = listing["tokens"][k], listing["text_offset"][k]
    if not t.startswith("bytes:") and "\ufffd" not in t and o < len(whole["text"]):
      assert whole["text"][o : o + len(t)] == t[: len(whole["text"]) - o], (k, t, o)
  assert "".join(c["text"] for c in chunks) == whole["text"]
  for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
    assert [x for c in chunks if c["logprobs"] for x in c["logprobs"][key]] == whole["logprobs"][key], key


def test_offsets_of_a_stream_s_new_tokens_decode_only_those():
  """Where a tokenizer's decoding drops characters (a tokenizer.json whose decoder strips the first
  space), offsets come from decoding prefixes; a stream asks for its new tokens' only, one decode each
  (it decoded every prefix at every chunk: 36 s of the event loop for 2,000 tokens)."""

  class StripsTheFirstSpace:
    calls = 0

    def decode(self, ids):
      self.calls += 1
      return "".join(" " + chr(97 + i % 26) for i in ids)[1:]

  tok, ids = StripsTheFirstSpace(), list(range(40))
  token_bytes = np.full(64, 2, np.int32)  # each token: a space and a letter
  text = tok.decode(ids)
  whole = text_offsets(tok, token_bytes, ids, text, base=5)
  assert whole[:3] == [5, 6, 8] and whole[-1] == 5 + len(text) - 2  # token k > 0 starts at 2k - 1
  tok.calls = 0
  assert text_offsets(tok, token_bytes, ids, text, base=5, start=36) == whole[36:]
  assert tok.calls == 4


def test_offsets_after_an_added_special_token_in_a_prompt(tmp_path):
  """A tokenizer.json's special token other than pad/bos/eos/unk (<|user|>) written in a prompt is
  read as its id and the tokens after it start where they are written (they all got the special
  token's own offset: its id decodes to no text, so the offsets from decoding prefixes fell short)."""
  from hf_tokenizers import byte_level_bpe

  from llm_jax.serve.prompts import encode_with_offsets

  raw = byte_level_bpe(tmp_path, ["the cat sat on the mat " * 20, "a dog ran " * 20], vocab_size=300)
  raw.add_special_tokens(["<|user|>"])
  raw.save(str(tmp_path / "tokenizer.json"))
  tok = load_tokenizer(str(tmp_path))
  text = "the cat <|user|> sat"
  ids, offsets = encode_with_offsets(tok, tok.token_bytes(), text)
  user = tok.encode("<|user|>")
  assert len(user) == 1 and user[0] in ids
  k = ids.index(user[0])
  assert offsets[k] == text.index("<|user|>") and offsets[k + 1] == text.index(" sat"), (ids, offsets)


def test_token_bytes_of_word_pieces_join_to_the_completion(tmp_path):
  """Chat logprobs' `bytes` and `token` of a completion's tokens join to its text with a tokenizer
  whose decoder drops a text's first space (metaspace): a word piece carries the space it stands for
  (decoded alone, " sat" lost it, so the bytes did not join to the text)."""
  from llm_jax.serve.prompts import token_str, token_utf8

  tok = _metaspace(tmp_path)
  prompt = tok.encode("the cat")
  whole = tok.encode("the cat sat on a mat über café")
  assert whole[: len(prompt)] == prompt
  ids = whole[len(prompt) :]
  text = G.decode_after(tok, G.context_ids(tok, prompt), ids)
  assert text == " sat on a mat über café"
  assert b"".join(bytes(token_utf8(tok, i)) for i in ids) == text.encode("utf-8")
  assert "".join(token_str(tok, i) for i in ids) == text


def test_stop_ids_finish_the_text_before_the_id(tok):
  """`stop_ids` (vLLM's stop_token_ids, chat's special turn tokens): the text is that of the ids
  before the first stop id, held-back text included; `extend` keeps the ids before it."""
  rng = random.Random(7)
  for trial in range(30):
    ids = _random_ids(tok, rng, rng.randrange(3, 80))
    k = rng.randrange(1, len(ids))
    stop_id = ids[k]
    k = ids.index(stop_id)
    one = G.TextStream(tok, stop=["\x00never"], stop_ids=[stop_id], hold_chars=rng.choice([0, 3]))
    out = "".join(one.push(i) for i in ids)
    assert one.finished and one.reason == "stop" and out == one.text == tok.decode(ids[:k]), trial
    chunked = G.TextStream(tok, stop=["\x00never"], stop_ids=[stop_id])
    got, kept, pos = "", 0, 0
    while not chunked.finished:
      piece, n = chunked.extend(ids[pos : pos + 4])
      got, kept, pos = got + piece, kept + n, pos + 4
    assert got == out and kept == k, trial


@pytest.mark.parametrize("kind", ["metaspace", "llama2"])
def test_prompt_offsets_come_from_the_tokenizer_s_own_alignment(kind, tmp_path):
  """Echoed prompt offsets with tokenizers whose byte counts do not add up to the text (their
  decoders drop the first space): equal to decoding every prefix, without decoding at all (a 3,500-token
  prompt spent 2.5 s decoding prefixes, one scoring request of lm-eval)."""
  from hf_tokenizers import llama2_sentencepiece

  from llm_jax.serve.prompts import _common_prefix, encode_with_offsets

  if kind == "metaspace":
    tok = _metaspace(tmp_path)
  else:
    tok = load_tokenizer(llama2_sentencepiece(tmp_path / "l2", _texts(), vocab_size=330))

  class Counting:
    decodes = 0

    def __getattr__(self, name):
      return getattr(tok, name)

    def decode(self, ids):
      Counting.decodes += 1
      return tok.decode(ids)

  rng, compared = random.Random(4), 0
  for _ in range(30):
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 40)))
    ids = tok.encode(text)
    if tok.decode(ids) != text:  # a normalizer changed it (½): decoding prefixes is no reference
      continue
    want = [_common_prefix(tok.decode(ids[:k]), text) for k in range(len(ids))]
    assert _byte_offsets_differ(tok, ids, text)
    got_ids, got = encode_with_offsets(Counting(), tok.token_bytes(), text)
    assert got_ids == ids and got == want, text
    compared += 1
  assert compared >= 10 and Counting.decodes == 0


def _byte_offsets_differ(tok, ids, text):
  return int(tok.token_bytes()[ids].sum()) != len(text.encode("utf-8"))


def test_a_replacement_character_stop_waits_for_the_character_to_finish():
  """A stop of U+FFFD matches an invalid byte, not the first byte of a character still arriving
  (it cut "aé" at "a" when é came in two ids)."""
  s = G.TextStream(_CharTok(), stop=["\ufffd"])
  out = s.push(ord("a")) + s.push(300) + s.push(301) + s.close()
  assert not s.finished and out == "aé" == s.text
  s = G.TextStream(_CharTok(), stop=["\ufffd"])
  out = s.push(ord("a")) + s.push(300) + s.push(ord("b"))
  assert s.finished and s.reason == "stop" and out == "a" == s.text
  s = G.TextStream(_CharTok(), stop=["\ufffd"])
  out = s.push(ord("a")) + s.push(300) + s.close()  # the sequence ended on the stray byte
  assert s.finished and s.reason == "stop" and out == "a" == s.text


def test_a_tokenizer_json_reads_special_tokens_in_a_prompt_itself(tmp_path):
  """A text prompt with special tokens gets the ids the tokenizer's own encode gives (as transformers
  and vLLM feed them): split at special pieces and encoded apart, each part of a Metaspace tokenizer
  got a word-start piece of its own ('</s>🙂' became [</s>, ▁, 🙂])."""
  from llm_jax.serve.prompts import encode_text, encode_with_offsets

  tok = _metaspace(tmp_path)
  for text in ("</s>🙂", "<s>the cat", "a</s>b", "the cat</s> sat on<s>a mat"):
    assert encode_text(tok, text) == tok.encode(text), text
    ids, offsets = encode_with_offsets(tok, tok.token_bytes(), text)
    assert ids == tok.encode(text) and offsets == tok.encode_offsets(text)[1], text
  ids, offsets = encode_with_offsets(tok, tok.token_bytes(), "the cat</s> sat")
  assert offsets[ids.index(tok.eos_id)] == len("the cat")  # where its name is written


@pytest.mark.parametrize(
  "kind, text",
  [("llama2", "the  cat sat"), ("llama2", "cafe\u0301 cat"), ("nfkc", "é cafe\u0301"), ("nfkc", "e\u0301 a")],
)
def test_prompt_offsets_where_normalizing_and_the_first_space_cancel_out(kind, text, tmp_path):
  """Byte counts that add up only by chance (the first space a SentencePiece model adds, against a
  collapsed double space or an NFC-composed é) put every token one character off: the tokenizer's
  own alignment is used for any tokenizer but a byte-level BPE."""
  from hf_tokenizers import llama2_sentencepiece
  from tokenizers import normalizers

  from llm_jax.serve.prompts import encode_with_offsets

  if kind == "llama2":
    tok = load_tokenizer(llama2_sentencepiece(tmp_path / "l2", _texts(), vocab_size=330))
  else:
    raw = tokenizers.Tokenizer.from_str(_metaspace(tmp_path)._json)
    raw.normalizer = normalizers.NFKC()
    tok = HFTokenizer(raw.to_str(), {"eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"})
  ids, offsets = encode_with_offsets(tok, tok.token_bytes(), text)
  assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))  # the counts add up...
  assert offsets == tok.encode_offsets(text)[1] and offsets[0] == 0  # ...but mislead


def test_a_short_prompt_is_the_whole_context(tmp_path):
  """A prompt shorter than CONTEXT_IDS is all context (the slice went negative: a 5-id prompt kept
  its last id, and with a metaspace tokenizer the completion lost its first space)."""
  tok = _metaspace(tmp_path)
  for n in range(1, stream_lib.CONTEXT_IDS + 1):
    prompt = ([tok.bos_id] + tok.encode("the cat sat on a mat"))[:n]
    assert G.context_ids(tok, prompt) == prompt, n
  prompt = [tok.bos_id] + tok.encode("the cat")
  assert 2 <= len(prompt) < stream_lib.CONTEXT_IDS
  ids = tok.encode("the cat sat")[len(prompt) - 1 :]
  s = G.TextStream(tok, context=prompt)
  out = "".join(s.push(i) for i in ids) + s.close()
  assert out == tok.decode(prompt + ids)[len(tok.decode(prompt)) :] and out.startswith(" ")

"""Host time per decode chunk of the server's engine (CPU microbenchmark, not a test).

Times `Engine._handle_outputs` (reading a chunk's outputs back, detokenizing, stop checks, events)
for `--slots` busy slots over synthetic chunks whose tokens are real text's ids, as sequences grow
to `--tokens` tokens; nothing runs on a device. The same file runs against an older checkout (whose
engine read a dict of outputs and decoded each stream's whole id list per token), for a before/after
pair from one machine:

    python bench/serve_host.py [--slots 32] [--chunk 4] [--tokens 128,512] [--stop '\n\n\n']
    PYTHONPATH=/path/to/older/checkout python bench/serve_host.py     # before
"""

from __future__ import annotations

import glob
import os
import platform
import statistics
import tempfile
import time

import numpy as np
from absl import app, flags

from llm_jax import generate as G
from llm_jax.data.tokenizer import Tokenizer, train_tokenizer
from llm_jax.model import ModelConfig
from llm_jax.model.params import init_params
from llm_jax.serve import engine as engine_lib
from llm_jax.serve import prefill as prefill_lib
from llm_jax.serve.sequences import Choice, Handle

_SLOTS = flags.DEFINE_integer("slots", 32, "Busy slots.")
_CHUNK = flags.DEFINE_integer("chunk", 16, "Decode steps per chunk (--decode_chunk).")
_TOKENS = flags.DEFINE_list("tokens", ["128", "512"], "Tokens per sequence (one figure each).")
_STOP = flags.DEFINE_string("stop", "\n\n\n", "A stop sequence every request carries ('' none).")
_TOKENIZER = flags.DEFINE_string(
  "tokenizer",
  "",
  "SentencePiece model (default: 2,000 pieces "
  "trained on the repo's .py/.md files, as bench/gpu_serve.sh does).",
)
_REPEAT = flags.DEFINE_integer("repeat", 5, "Runs per figure (the median is printed).")


class _Loop:
  """An event loop stand-in: counts the wake-ups the engine posts."""

  def __init__(self):
    self.calls = 0

  def call_soon_threadsafe(self, fn, *args):
    self.calls += 1


class _Queue:
  def put_nowait(self, event):
    pass


def _tokenizer():
  """The tokenizer (--tokenizer, else trained here) and the repo's text its ids are taken from."""
  files = sorted(glob.glob("**/*.py", recursive=True) + glob.glob("**/*.md", recursive=True))
  texts = [open(f, encoding="utf-8", errors="replace").read() for f in files]
  if _TOKENIZER.value:
    return Tokenizer.load(_TOKENIZER.value), texts
  path = os.path.join(tempfile.mkdtemp(), "tok.model")
  return train_tokenizer(texts, path, vocab_size=2000, num_threads=2), texts


def _outputs(engine, token_ids: np.ndarray):
  """One chunk's outputs in the engine's own format (packed array, or the older dict + active)."""
  b, s = token_ids.shape
  if hasattr(prefill_lib, "unpack_chunk"):
    top = np.zeros((b, 2 * s * engine_lib.TOP_LOGPROBS), np.int32)
    lp = np.full((b, s), -1.5, np.float32).view(np.int32)
    packed = np.concatenate(
      [token_ids, lp, np.ones((b, s), np.int32), np.ones((b, 1), np.int32), top], axis=1
    )
    return (packed,)
  t = engine_lib.TOP_LOGPROBS
  outs = {
    "token": token_ids,
    "logprob": np.full((b, s), -1.5, np.float32),
    "emitted": np.ones((b, s), bool),
    "eos": np.zeros((b, s), bool),
    "top_logprobs": np.zeros((b, s, t), np.float32),
    "top_ids": np.zeros((b, s, t), np.int32),
  }
  return outs, np.ones((b,), bool)


def _run(engine, stream_ids: list[np.ndarray], n_tokens: int) -> tuple[float, int]:
  """Seconds per chunk over sequences of n_tokens, and the wake-ups posted per chunk."""
  loop = _Loop()
  sp = G.SamplingParams(max_new_tokens=n_tokens, stop=(_STOP.value,) if _STOP.value else ())
  owners = []
  for slot in range(engine.slots):
    c = Choice(0, [1], sp)
    h = Handle(f"r{slot}", [c], loop, _Queue(), time.monotonic() + 3600)
    c.text = G.TextStream(engine.tokenizer, sp.stop)
    c.slot = slot
    owners.append((h, c))
  chunk = engine.chunk
  times = []
  for start in range(0, n_tokens, chunk):
    ids = np.stack([s[start : start + chunk] for s in stream_ids]).astype(np.int32)
    args = _outputs(engine, ids)
    t0 = time.perf_counter()
    engine._handle_outputs(*args, owners)
    if hasattr(engine, "_flush"):
      engine._flush()
    times.append(time.perf_counter() - t0)
  return sum(times) / len(times), loop.calls / len(times)


def main(argv) -> int:
  del argv
  tok, texts = _tokenizer()
  big = max(int(t) for t in _TOKENS.value)
  corpus = tok.encode("\n".join(texts))
  rng = np.random.default_rng(0)
  stream_ids = []
  for _ in range(_SLOTS.value):  # real text's ids, so pieces, spaces and bytes are realistic
    a = int(rng.integers(0, len(corpus) - big - 1))
    stream_ids.append(np.array(corpus[a : a + big], np.int32))
  cfg = ModelConfig(
    vocab_size=tok.vocab_size,
    num_layers=1,
    d_model=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    max_seq_len=max(1024, big + 8),
  )
  print(
    f"{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
    f"engine from {os.path.dirname(engine_lib.__file__)}"
  )
  print(
    f"{_SLOTS.value} slots, chunk {_CHUNK.value}, stop {_STOP.value!r}, tokenizer {tok.vocab_size} pieces"
  )
  for n in [int(t) for t in _TOKENS.value]:
    per_chunk, calls = [], 0.0
    for _ in range(_REPEAT.value):
      engine = engine_lib.Engine(
        init_params(cfg), cfg, tok, slots=_SLOTS.value, max_concurrent=_SLOTS.value, chunk=_CHUNK.value
      )
      s, calls = _run(engine, stream_ids, n)
      per_chunk.append(s)
    med = statistics.median(per_chunk)
    print(
      f"{n:5d} tokens per sequence: host time per chunk {1e3 * med:7.3f} ms "
      f"(min {1e3 * min(per_chunk):.3f}, max {1e3 * max(per_chunk):.3f}; "
      f"{1e6 * med / (_SLOTS.value * _CHUNK.value):.1f} us per token; "
      f"{calls:.0f} event-loop wake-ups per chunk)"
    )
  return 0


if __name__ == "__main__":
  app.run(main)

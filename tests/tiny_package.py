"""A model package of random weights and a small SentencePiece tokenizer, for the server tests."""

import functools
import random

import jax
import numpy as np

from llm_jax.artifacts import package
from llm_jax.data.tokenizer import train_tokenizer
from llm_jax.model import Decoder, ModelConfig
from llm_jax.model.params import init_params

# the server tests' model: one layer, 32 positions, large enough weights to vary the tokens it draws
SERVER_CFG = ModelConfig(
  vocab_size=384,
  num_layers=1,
  d_model=32,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  mlp_dim=64,
  max_seq_len=32,
  init_std=0.3,
)
WORDS = "the cat sat on a mat and def return import class self print data model".split()


def write_tiny_package(d, cfg, name: str = "pkg", vocab_size: int = 300, **package_kw):
  """(package path, tokenizer) of `cfg`'s random weights in d/name, the tokenizer in d/tok.model."""
  rng = random.Random(0)
  texts = [" ".join(rng.choice(WORDS) for _ in range(150)) + "\n" for _ in range(40)]
  tok = train_tokenizer(texts, str(d / "tok.model"), vocab_size=vocab_size)
  package.write_package(str(d / name), init_params(cfg), cfg, tok.path, step=1, **package_kw)
  return d / name, tok


@functools.partial(jax.jit, static_argnames="cfg")
def forward(params, tokens, cfg: ModelConfig):
  """Logits of the plain model (no cache) at every position."""
  return Decoder(cfg).apply({"params": params}, tokens)


def recompute(params, cfg: ModelConfig, prompt, n: int, vocab_limit: int = 300, eos_id: int = 2) -> list[int]:
  """Greedy tokens by full forward passes of the plain model (no cache), ids below `vocab_limit`."""
  seq, new = list(prompt), []
  for _ in range(n):
    padded = np.zeros((1, cfg.max_seq_len), np.int32)
    padded[0, : len(seq)] = seq
    t = int(np.argmax(np.asarray(forward(params, padded, cfg))[0, len(seq) - 1, :vocab_limit]))
    if t == eos_id:
      break
    new.append(t)
    seq.append(t)
  return new

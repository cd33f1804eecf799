"""Any corpus (`--corpus=GLOB`) tokenized with the run's own tokenizer into scored windows.

Documents are read by llm_jax.data.sources (globs of .txt/.md/.jsonl or 'stdlib'; domain = parent folder
or the JSONL 'domain' field), cleaned with the training normalizer, encoded, each followed by EOS, and
concatenated in order after one leading EOS, matching the training shards' layout
([EOS] doc0 [EOS] doc1 [EOS] ...). Windows of seq_len + 1 tokens start every seq_len tokens, so every
token after the first is a target exactly once; the tail window is padded with weight 0.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import numpy as np

from llm_jax.data import cleaning, sources


@dataclasses.dataclass
class TokenizedCorpus:
  """A corpus as one token stream with the domain id of every token."""

  tokens: np.ndarray  # [N] int32
  domain_ids: np.ndarray  # [N] int32
  domains: list
  documents: int
  spec: str


def tokenize(spec: str, tokenizer, *, max_docs: int = 0) -> TokenizedCorpus:
  """Reads, cleans and encodes every document of a corpus spec (in order) with `tokenizer`."""
  docs, _ = sources.read(spec, bad=sources.BadRecords("fail", hint="; fix or remove that record"))
  if max_docs:
    docs = docs[:max_docs]
  texts = [cleaning.normalize(d.text).strip("\n") for d in docs]
  keep = [i for i, t in enumerate(texts) if t.strip()]
  domains = sorted({docs[i].domain for i in keep})
  index = {d: i for i, d in enumerate(domains)}
  ids = tokenizer.encode_batch([texts[i] for i in keep]) if keep else []
  toks, doms = [np.asarray([tokenizer.eos_id], np.int32)], [np.zeros(1, np.int32)]
  for i, doc_ids in zip(keep, ids, strict=True):
    seq = np.asarray(list(doc_ids) + [tokenizer.eos_id], np.int32)
    toks.append(seq)
    doms.append(np.full(len(seq), index[docs[i].domain], np.int32))
  if len(toks) == 1:
    raise ValueError(f"corpus {spec!r} has no non-empty documents to score")
  out = TokenizedCorpus(np.concatenate(toks), np.concatenate(doms), domains, len(keep), spec)
  logging.info("corpus %s: %d documents, %d tokens, domains %s", spec, len(keep), len(out.tokens), domains)
  return out


def num_windows(num_tokens: int, seq_len: int) -> int:
  """Windows needed so every token after the first is a target once."""
  return max(0, -(-(num_tokens - 1) // seq_len))


def batches(
  corpus: TokenizedCorpus,
  seq_len: int,
  batch_size: int,
  max_windows: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict]:
  """Batches of windows: inputs/targets/domain_ids [b, L] and weights (0 on padding).

  batch_size is global; process p gets rows [p*b, (p+1)*b) of each batch, b = batch_size / process_count.
  """
  n = num_windows(len(corpus.tokens), seq_len)
  if max_windows is not None:
    n = min(n, max_windows)
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(
      f"eval batch_size={batch_size} must be a positive multiple of process_count={process_count}"
    )
  b = batch_size // process_count
  for first in range(0, n, batch_size):
    start = first + process_index * b
    rows = max(0, min(b, n - start))
    inputs = np.zeros((b, seq_len), np.int32)
    targets = np.zeros((b, seq_len), np.int32)
    domain_ids = np.zeros((b, seq_len), np.int32)
    weights = np.zeros((b, seq_len), np.float32)
    for r in range(rows):
      a = (start + r) * seq_len
      seg = corpus.tokens[a : a + seq_len + 1]
      m = len(seg) - 1
      inputs[r, :m] = seg[:-1]
      targets[r, :m] = seg[1:]
      domain_ids[r, :m] = corpus.domain_ids[a + 1 : a + 1 + m]
      weights[r, :m] = 1.0
    yield {"inputs": inputs, "targets": targets, "domain_ids": domain_ids, "weights": weights}

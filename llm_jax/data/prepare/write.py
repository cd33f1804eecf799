"""Stages "train_tokenizer" and "tokenize_and_write": the tokenizer (trained on the training split, or a
given one copied), then every split encoded into token shards with a document listing."""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import tqdm

from llm_jax.data import hf_tokenizer
from llm_jax.data import manifest as manifest_lib
from llm_jax.data import shards as shards_lib
from llm_jax.data.prepare.clean import Record
from llm_jax.data.tokenizer import ENCODER_PIECES, Tokenizer, train_tokenizer

_ENCODE_BATCH = 512


def tokenizer(train: list[Record], t, out_dir: str, given=None):
  """`given` (a loaded tokenizer) saved as it is, else a SentencePiece model trained on the training split
  (config t); returned as loaded from out_dir."""
  if given is not None:
    return hf_tokenizer.load_tokenizer(hf_tokenizer.save_tokenizer(given, out_dir))
  path = os.path.join(out_dir, manifest_lib.TOKENIZER)
  return train_tokenizer(
    (r.doc.text for r in train),
    path,
    vocab_size=t.vocab_size,
    model_type=t.type,
    character_coverage=t.character_coverage,
    lowercase=t.lowercase,
    max_sentence_length=t.max_sentence_length,
    input_sentence_size=t.input_sentence_size,
    control_pieces=ENCODER_PIECES if t.get("encoder_pieces", False) else (),
  )


@dataclasses.dataclass
class Written:
  """What the shard writer produced, for the manifest."""

  shards: list = dataclasses.field(default_factory=list)
  document_lists: list = dataclasses.field(default_factory=list)
  per_domain: dict = dataclasses.field(default_factory=dict)  # split -> domain -> documents/tokens/bytes


def _write_split(
  split: str,
  rs: list[Record],
  tok: Tokenizer,
  dom_id: dict,
  out_dir: str,
  shard_tokens: int,
  workers: int,
  progress: bool,
  out: Written,
) -> None:
  writer = shards_lib.ShardWriter(out_dir, split, tok.vocab_size, shard_tokens, eos_id=tok.eos_id)
  counts = collections.defaultdict(lambda: {"documents": 0, "tokens": 0, "bytes": 0})
  list_path = os.path.join(out_dir, f"{split}-documents.jsonl")
  bar = tqdm.tqdm(total=len(rs), desc=f"tokenize {split}", unit="doc", disable=not progress)
  with open(list_path + ".partial", "w", encoding="utf-8") as listing:
    for start in range(0, len(rs), _ENCODE_BATCH):
      batch = rs[start : start + _ENCODE_BATCH]
      encoded = tok.encode_batch([r.doc.text for r in batch], num_threads=workers)
      for r, ids in zip(batch, encoded, strict=True):
        doc = r.doc
        nbytes = len(doc.text.encode("utf-8"))
        writer.add(ids, dom_id[doc.domain], nbytes)
        c = counts[doc.domain]
        c["documents"] += 1
        c["tokens"] += len(ids) + 1
        c["bytes"] += nbytes
        listing.write(
          json.dumps(
            {
              "id": doc.id,
              "sha256": r.key,
              "domain": doc.domain,
              "source": doc.source,
              "license": doc.license,
              "tokens": len(ids) + 1,
              "bytes": nbytes,
            },
            ensure_ascii=False,
          )
          + "\n"
        )
      bar.update(len(batch))
  bar.close()
  writer.flush()
  os.replace(list_path + ".partial", list_path)
  out.shards += writer.records
  out.document_lists.append(
    {"split": split, "path": os.path.basename(list_path), "sha256": shards_lib.file_sha256(list_path)}
  )
  out.per_domain[split] = dict(counts)


def shards(
  by_split: dict[str, list[Record]],
  tok: Tokenizer,
  domains: list[str],
  out_dir: str,
  shard_tokens: int,
  workers: int,
  progress: bool,
) -> Written:
  """Encodes every non-empty split into shards and `{split}-documents.jsonl`."""
  dom_id = {name: i for i, name in enumerate(domains)}
  out = Written()
  for split, rs in by_split.items():
    if rs:  # data.val_fraction=0 without data.val_corpus: no validation split
      _write_split(split, rs, tok, dom_id, out_dir, shard_tokens, workers, progress, out)
  return out

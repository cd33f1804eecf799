"""A corpus to fine-tune a speculative-decoding draft on (sequence-level distillation): the model's
own continuations of prompts cut at random places from a text, one JSONL document per prompt,
`{"text": prompt + continuation, "prompt": prompt}`, which `python -m llm_jax.train` reads as a corpus.

    done = write_corpus(open_model("packages/big"), ["data/train.txt"], "distill.jsonl", prompts=8192)

The command (`python -m llm_jax.finetune.distill`, distill/__main__.py) has the whole recipe.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import numpy as np

from llm_jax import cli
from llm_jax.generate import SamplingParams, generate
from llm_jax.model import default_levers, unstack_layers


def prompt_windows(ids_per_text: Sequence[Sequence[int]], n: int, length: int, seed: int) -> list[list[int]]:
  """`n` windows of `length` token ids, each inside one text, their starts drawn uniformly (seeded)
  over every text's possible starts; texts shorter than `length` + 1 give none."""
  room = np.array([max(len(ids) - length, 0) for ids in ids_per_text], np.int64)
  at = np.random.default_rng(seed).integers(0, room.sum(), n) if room.sum() else np.zeros(0, np.int64)
  text = np.searchsorted(np.cumsum(room), at, side="right")
  start = at - (np.cumsum(room) - room)[text]
  return [list(ids_per_text[t][s : s + length]) for t, s in zip(text, start, strict=True)]


def write_corpus(
  model,
  texts: Sequence[str],
  out: str,
  *,
  prompts: int = 8192,
  prompt_tokens: int = 32,
  new_tokens: int = 200,
  batch: int = 256,
  temperature: float = 0.0,
  seed: int = 0,
  overwrite: bool = False,
) -> dict:
  """Writes `prompts` documents of `model`'s (an artifacts.OpenedModel) continuations to `out`;
  returns {"documents", "generated_tokens", "seconds"}. Raises ValueError naming the text or the
  setting at fault, FileExistsError for an existing `out` without `overwrite`."""
  cfg = model.model_config
  if min(prompts, prompt_tokens, new_tokens, batch) < 1:
    raise ValueError(
      f"prompts ({prompts}), prompt_tokens ({prompt_tokens}), new_tokens ({new_tokens}) and batch ({batch})"
      " must be at least 1"
    )
  if prompt_tokens + new_tokens > cfg.max_seq_len:
    raise ValueError(
      f"prompt_tokens ({prompt_tokens}) + new_tokens ({new_tokens}) exceed the model's context"
      f" ({cfg.max_seq_len})"
    )
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"{out} exists (--overwrite replaces it)")
  tok = model.tokenizer
  ids = []
  for path in texts:
    ids.append(tok.encode(cli.read_text(path, "--text")))
  windows = prompt_windows(ids, prompts, prompt_tokens, seed)
  if not windows:
    raise ValueError(
      f"no text holds more than --prompt_tokens={prompt_tokens} tokens: "
      + ", ".join(f"{p} ({len(i)} tokens)" for p, i in zip(texts, ids, strict=True))
    )
  params, dcfg = unstack_layers(model.params, cfg, levers=default_levers(model.params))
  t0, tokens, tmp = time.perf_counter(), 0, f"{out}.tmp{os.getpid()}"
  stops = set(model.stop_ids)  # the model's other end-of-text ids end a continuation as EOS does
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      for b in range(0, len(windows), batch):
        chunk = windows[b : b + batch]
        sampling = [
          SamplingParams(max_new_tokens=new_tokens, temperature=temperature, seed=seed + b + i)
          for i in range(len(chunk))
        ]
        gens = generate(params, dcfg, chunk, sampling, eos_id=tok.eos_id, vocab_limit=tok.vocab_size)
        for p, gen in zip(chunk, gens, strict=True):
          new = gen.tokens[: next((k for k, t in enumerate(gen.tokens) if t in stops), len(gen.tokens))]
          f.write(json.dumps({"text": tok.decode(p + new), "prompt": tok.decode(p)}) + "\n")
          tokens += len(new)
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return {"documents": len(windows), "generated_tokens": tokens, "seconds": time.perf_counter() - t0}

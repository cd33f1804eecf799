"""A distillation corpus for a draft model: the target model's own continuations of prompts cut at
random places from a text, written as JSONL documents (`{"text": prompt + continuation}`) that
`python -m llm_jax.train` reads as a corpus. A draft fine-tuned on them (`--config.init_from=DRAFT
--config.reuse_source_tokenizer=True --config.data.corpus=OUT`) learns what the target says after
such prompts, not only what the text says: sequence-level distillation (Kim and Rush 2016), which
raises the share of proposals the target accepts in speculative decoding.

    python bench/distill_corpus.py --model RUN_OR_PKG --text train.txt --out distill.jsonl \
        [--prompts 4096] [--prompt_tokens 32] [--new_tokens 200] [--batch 256] [--temperature 0]

Greedy by default (the continuations the target decodes greedily, which greedy speculative
decoding has to match); `--temperature T` samples instead. Prompts are cut from --text only: give
the training split, never the text the benchmark's prompts come from.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from llm_jax import generate as G
from llm_jax.artifacts import open_model
from llm_jax.model import default_levers, unstack_layers


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", required=True)
  ap.add_argument("--text", required=True, help="the text prompts are cut from (a training split)")
  ap.add_argument("--out", required=True, help="the JSONL file to write")
  ap.add_argument("--prompts", type=int, default=4096)
  ap.add_argument("--prompt_tokens", type=int, default=32)
  ap.add_argument("--new_tokens", type=int, default=200)
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--temperature", type=float, default=0.0)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  model = open_model(args.model)
  params, cfg = unstack_layers(model.params, model.model_config, levers=default_levers(model.params))
  tok = model.tokenizer
  ids = tok.encode(open(args.text, encoding="utf-8").read())
  if len(ids) <= args.prompt_tokens:
    raise SystemExit(f"{args.text}: {len(ids)} tokens, no room for prompts of {args.prompt_tokens}")
  starts = np.random.default_rng(args.seed).integers(0, len(ids) - args.prompt_tokens, args.prompts)
  t0, written, tokens = time.perf_counter(), 0, 0
  with open(args.out, "w", encoding="utf-8") as f:
    for b in range(0, args.prompts, args.batch):
      prompts = [ids[s : s + args.prompt_tokens] for s in starts[b : b + args.batch]]
      sampling = [
        G.SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature, seed=args.seed + b + i)
        for i in range(len(prompts))
      ]
      for p, gen in zip(
        prompts, G.generate(params, cfg, prompts, sampling, vocab_limit=tok.vocab_size), strict=True
      ):
        f.write(json.dumps({"text": tok.decode(p + gen.tokens)}) + "\n")
        written, tokens = written + 1, tokens + len(gen.tokens)
  print(
    f"{jax.devices()[0].device_kind}: {written} documents, {tokens:,} generated tokens"
    f" in {time.perf_counter() - t0:.1f} s -> {args.out}"
  )


if __name__ == "__main__":
  main()

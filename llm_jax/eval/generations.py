"""Free-form samples for a fixed prompt list with a fixed seed, through llm_jax.generate (KV-cache
decoding)."""

from __future__ import annotations

from collections.abc import Sequence

from llm_jax import generate as generate_lib


def sample(
  scorer,
  tokenizer,
  prompts: Sequence[str],
  max_tokens: Sequence[int],
  prefix_ids=(),
  seed: int = 0,
  temperature: float = 0.8,
  top_k: int = 40,
) -> list[str]:
  """Continuations of `prompts` (stopping at EOS or max_tokens); row i uses seed + i, so a given
  checkpoint always gives the same texts."""
  if not prompts:
    return []
  cfg = scorer.model.cfg
  ids, sampling = [], []
  for i, (p, n) in enumerate(zip(prompts, max_tokens, strict=True)):
    n = max(1, min(int(n), cfg.max_seq_len - 1))
    ids.append((list(prefix_ids) + tokenizer.encode(p))[-(cfg.max_seq_len - n) :])
    sampling.append(
      generate_lib.SamplingParams(
        temperature=float(temperature), top_k=int(top_k), max_new_tokens=n, seed=seed + i
      )
    )
  gens = generate_lib.generate(
    scorer.params, cfg, ids, sampling, tokenizer=tokenizer, eos_id=tokenizer.eos_id
  )
  return [g.text for g in gens]

"""Samples during training: sampled continuations of a few prompts, every train.sample_every steps.

The training loop takes them through its `make_sampler` argument (`for_training`), which the train
command passes: the trainer itself knows nothing of decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from llm_jax.generate.batching import make_batch
from llm_jax.generate.decode import decode_loop, start
from llm_jax.generate.sampling import SamplingParams


class Sampler:
  """Sampled continuations of a few prompts through llm_jax.generate's KV-cache decoder, every N steps.

  Prompts start with the document separator (EOS), as documents do in training. Ids the tokenizer does
  not have (the padded embedding rows) are never sampled. The prefill and decode loop are one jitted
  function, compiled on first use and reused; row i always uses seed `seed + i`, so samples of
  different steps differ by the weights only.
  """

  def __init__(
    self,
    model_cfg,
    tokenizer,
    prompts: Sequence[str],
    num_tokens: int,
    temperature: float = 0.8,
    seed: int = 0,
    mesh=None,
  ):
    self.tokenizer = tokenizer
    self.prompts = [p for p in prompts if p]
    keep = max(1, model_cfg.max_seq_len // 2 - 1)  # prompt tokens kept (the end of a long prompt)
    self.prompt_ids = [tokenizer.encode(p)[-keep:] for p in self.prompts]
    ids = [[tokenizer.eos_id] + row for row in self.prompt_ids]
    longest = max((len(row) for row in ids), default=1)
    self.num_tokens = int(min(num_tokens, model_cfg.max_seq_len - longest))
    self._fn = None
    if not self.prompts or self.num_tokens <= 0:
      return
    sampling = [
      SamplingParams(temperature=float(temperature), max_new_tokens=self.num_tokens, seed=int(seed) + i)
      for i in range(len(ids))
    ]
    batch = make_batch(ids, sampling, model_cfg)
    self._args = (batch.tokens_BL, batch.lengths_B, batch.arrays)
    eos_id, vocab_limit, steps = int(tokenizer.eos_id), int(tokenizer.vocab_size), self.num_tokens

    def run(params, tokens_BL, lengths_B, arrays):
      state = start(params, tokens_BL, lengths_B, **arrays, cfg=model_cfg)
      _, outs = decode_loop(
        params,
        state,
        cfg=model_cfg,
        max_steps=steps,
        eos_id=eos_id,
        vocab_limit=vocab_limit,
        span=batch.span,
        filtered=batch.filtered,
      )
      return outs["token"], outs["emitted"]

    # Replicated output: every process can read it (all processes run the sampler together).
    out = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self._fn = jax.jit(run, out_shardings=out)

  def sample_ids(self, params) -> list[list[int]]:
    """The new token ids of each prompt (up to EOS or num_tokens); deterministic in (seed, params)."""
    if self._fn is None:
      return []
    tokens_BT, emitted_BT = jax.device_get(self._fn(params, *self._args))
    return [[int(t) for t in tokens_BT[r, : int(emitted_BT[r].sum())]] for r in range(len(self.prompts))]

  def __call__(self, params) -> list[str]:
    """One continuation per prompt, the prompt included."""
    samples = self.sample_ids(params)
    return [self.tokenizer.decode(p + new) for p, new in zip(self.prompt_ids, samples, strict=True)]


def for_training(setup) -> Sampler:
  """The sampler of a training run: train.sample_prompts / sample_tokens / seed on its mesh."""
  tr = setup.config.train
  return Sampler(
    setup.model_cfg,
    setup.tokenizer,
    tr.sample_prompts.split(","),
    tr.sample_tokens,
    seed=tr.seed,
    mesh=setup.mesh,
  )

"""Free-form samples for a fixed prompt list with a fixed seed (full recompute each step; small and exact)."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import sharding as sharding_lib


def _next_tokens(params, tokens_BL, last_B, key, *, model, temperature: float, top_k: int,
                 vocab_limit: int):
  """Samples one token per row from the logits at each row's last position (ids < vocab_limit)."""
  logits_BLV = model.apply({"params": params}, tokens_BL).astype(jnp.float32)
  logits_BV = jnp.take_along_axis(logits_BLV, last_B[:, None, None], axis=1)[:, 0]
  logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < vocab_limit, logits_BV, -jnp.inf)
  if temperature <= 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if top_k > 0:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(logits_BV.shape[0]))
  return jax.vmap(jax.random.categorical)(keys, logits_BV).astype(jnp.int32)


def sample(scorer, tokenizer, prompts: Sequence[str], max_tokens: Sequence[int], prefix_ids=(),
           seed: int = 0, temperature: float = 0.8, top_k: int = 40) -> list[str]:
  """Continuations of `prompts` (stopping at EOS or max_tokens), reproducible for a given seed."""
  if not prompts:
    return []
  model, mesh = scorer.model, scorer.mesh
  length = model.cfg.max_seq_len
  rows = len(prompts) + (-len(prompts)) % scorer.rows_multiple
  tokens = np.zeros((rows, length), np.int32)
  pos = np.zeros(rows, np.int32)
  budget = np.zeros(rows, np.int32)
  for r, (p, n) in enumerate(zip(prompts, max_tokens)):
    n = min(int(n), length - 1)
    ids = (list(prefix_ids) + tokenizer.encode(p))[-(length - n):]
    tokens[r, :len(ids)] = ids
    pos[r] = len(ids)
    budget[r] = n
  fn = jax.jit(functools.partial(_next_tokens, model=model, temperature=float(temperature),
                                 top_k=int(min(top_k, tokenizer.vocab_size)),
                                 vocab_limit=int(tokenizer.vocab_size)))
  outs: list[list[int]] = [[] for _ in range(rows)]
  done = budget == 0
  base = jax.random.key(seed)
  with sharding_lib.activate(mesh, scorer.config):
    step = 0
    while not done.all():
      batch = sharding_lib.global_batch({"t": tokens}, mesh)["t"]
      nxt = np.asarray(fn(scorer.params, batch, jnp.asarray(np.maximum(pos - 1, 0)),
                          jax.random.fold_in(base, step)))
      for r in np.flatnonzero(~done):
        tok = int(nxt[r])
        if tok == tokenizer.eos_id:
          done[r] = True
          continue
        outs[r].append(tok)
        tokens[r, pos[r]] = tok
        pos[r] += 1
        if len(outs[r]) >= budget[r] or pos[r] >= length:
          done[r] = True
      step += 1
  return [tokenizer.decode(o) for o in outs[:len(prompts)]]

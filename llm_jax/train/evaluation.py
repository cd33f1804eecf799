"""Held-out evaluation inside the training loop: loss, perplexity and bits per byte, per domain too."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import sharding as sharding_lib
from llm_jax.train import step as step_lib


def eval_sums(params, batch, token_bytes_V, *, model, num_domains: int):
  """`step.eval_step`'s sums plus the UTF-8 bytes of the weighted targets, overall and per domain."""
  out = step_lib.eval_step(params, batch, model=model, num_domains=num_domains)
  targets_BL = batch["targets"]
  w_BL = batch.get("weights", jnp.ones(targets_BL.shape, jnp.float32)).astype(jnp.float32)
  bytes_BL = jnp.take(token_bytes_V, targets_BL, axis=0, mode="fill", fill_value=0)
  bytes_BL = bytes_BL.astype(jnp.float32) * w_BL
  dom = batch.get("domain_ids", jnp.zeros(targets_BL.shape, jnp.int32)).reshape(-1)
  return {
    **out,
    "bytes": jnp.sum(bytes_BL),
    "domain_bytes": jax.ops.segment_sum(bytes_BL.reshape(-1), dom, num_domains),
  }


def token_bytes(tokenizer, vocab_size: int) -> np.ndarray:
  """[vocab_size] int32 UTF-8 bytes of each id (0 for specials and the padded embedding rows)."""
  tb = np.zeros(vocab_size, np.int32)
  src = np.asarray(tokenizer.token_bytes(), np.int32)[:vocab_size]
  tb[: len(src)] = src
  return tb


def evaluate(params, eval_fn, batches, mesh, domains) -> dict[str, float]:
  """val_loss, val_ppl and val_bpb (bits per byte), per domain too when there are several."""
  if not batches:
    return {}
  # Every batch is dispatched before the one fetch; batch sums are added on the host in float64.
  outs = jax.device_get([eval_fn(params, sharding_lib.global_batch(b, mesh)) for b in batches])
  host = {k: np.sum([np.asarray(o[k], np.float64) for o in outs], axis=0) for k in outs[0]}
  tokens = float(host["tokens"])
  if tokens <= 0:
    return {}
  nll = float(host["nll_sum"])
  val = nll / tokens
  row = {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
  if "bytes" in host and host["bytes"] > 0:
    row["val_bpb"] = nll / (math.log(2) * float(host["bytes"]))
  if len(domains) > 1:
    for i, name in enumerate(domains):
      n = float(host["domain_tokens"][i])
      if n > 0:
        row[f"val_loss/{name}"] = float(host["domain_nll_sum"][i]) / n
      if "domain_bytes" in host and host["domain_bytes"][i] > 0:
        row[f"val_bpb/{name}"] = float(host["domain_nll_sum"][i]) / (
          math.log(2) * float(host["domain_bytes"][i])
        )
  return row

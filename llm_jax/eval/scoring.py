"""Per-token scoring on the training mesh: one jitted forward pass returns what every metric needs.

`token_outputs` gives, for each target token: nll (float32 nats), the 1-based rank of the true token
among all logits (1 + number of strictly larger logits), the model's confidence (its largest
probability), the UTF-8 bytes the token contributes, its domain and its weight. The host gathers these
and accumulates in float64 (llm_jax.eval.metrics), so nothing depends on the eval batch size.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from llm_jax import sharding as sharding_lib
from llm_jax.eval import metrics as metrics_lib
from llm_jax.model import Decoder


def token_outputs(params, batch, token_bytes_V, *, model):
  """Per-token nll, rank, confidence, bytes, domain and weight for a batch of windows ([B, L] each)."""
  logits_BLV = model.apply({"params": params}, batch["inputs"], None, batch.get("segment_ids")).astype(
    jnp.float32
  )
  targets_BL = batch["targets"]
  lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  true_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  rank_BL = 1 + jnp.sum(logits_BLV > true_BL[..., None], axis=-1, dtype=jnp.int32)
  conf_BL = jnp.exp(jnp.max(logits_BLV, axis=-1) - lse_BL)
  shape = targets_BL.shape
  return {
    "nll": lse_BL - true_BL,
    "rank": rank_BL,
    "confidence": conf_BL,
    "bytes": jnp.take(token_bytes_V, targets_BL, axis=0, mode="fill", fill_value=0),
    "domain": batch.get("domain_ids", jnp.zeros(shape, jnp.int32)).astype(jnp.int32),
    "weight": batch.get("weights", jnp.ones(shape, jnp.float32)).astype(jnp.float32),
  }


class Scorer:
  """Holds the model, parameters, mesh and a compiled `token_outputs`; scores batches of windows."""

  def __init__(self, model, params, config, mesh, token_bytes: np.ndarray):
    self.model, self.params, self.config, self.mesh = model, params, config, mesh
    vocab = model.cfg.vocab_size
    tb = np.zeros(vocab, np.int32)
    tb[: min(vocab, len(token_bytes))] = np.asarray(token_bytes, np.int32)[:vocab]
    self.token_bytes = jax.device_put(tb, sharding_lib.replicated(mesh))
    self._fn = _compiled(model)
    self.rows_multiple = int(np.prod([mesh.shape[a] for a in sharding_lib.BATCH_AXES]))

  def _pad_rows(self, batch: dict) -> dict:
    b = next(iter(batch.values())).shape[0]
    extra = (-b) % self.rows_multiple
    if not extra:
      return batch
    out = {}
    for k, v in batch.items():
      pad = np.zeros((extra,) + v.shape[1:], v.dtype)
      out[k] = np.concatenate([v, pad], axis=0)
    return out

  def outputs(self, batches: Iterable[dict], global_rows: bool = False) -> Iterator[dict]:
    """Per-token outputs (numpy, global rows) for each batch; dispatches one batch ahead.

    Batches hold this process's rows, or with `global_rows` every row (each process then takes its
    contiguous share, as eval_batches would have given it).
    """
    keys = ("inputs", "targets", "domain_ids", "weights", "segment_ids")
    pending = None
    with sharding_lib.activate(self.mesh, self.config):
      for batch in batches:
        local = self._pad_rows({k: np.asarray(v) for k, v in batch.items() if k in keys})
        if global_rows and jax.process_count() > 1:
          local = _process_share(local)
        if "weights" not in local:
          local["weights"] = np.ones(local["targets"].shape, np.float32)
        out = self._fn(self.params, sharding_lib.global_batch(local, self.mesh), self.token_bytes)
        if pending is not None:
          yield _to_host(pending)
        pending = out
      if pending is not None:
        yield _to_host(pending)

  def accumulate(self, batches: Iterable[dict], domains, max_windows: int | None = None):
    """Scores every window of `batches` into a metrics Accumulator (windows numbered in order)."""
    acc = metrics_lib.Accumulator(domains, self.model.cfg.vocab_size)
    next_window = 0
    for out in self.outputs(batches):
      real_B = out["weight"].sum(axis=1) > 0
      window_B = np.full(real_B.shape, -1, np.int64)
      window_B[real_B] = next_window + np.arange(int(real_B.sum()))
      next_window += int(real_B.sum())
      weight = out["weight"]
      if max_windows is not None:
        weight = np.where((window_B[:, None] >= 0) & (window_B[:, None] < max_windows), weight, 0.0)
      window_BL = np.broadcast_to(window_B[:, None], out["nll"].shape)
      acc.add(
        nll=out["nll"],
        rank=out["rank"],
        confidence=out["confidence"],
        nbytes=out["bytes"],
        domain=out["domain"],
        window=window_BL,
        weight=weight,
      )
      if max_windows is not None and next_window >= max_windows:
        break
    return acc


def _process_share(batch: dict) -> dict:
  """This process's contiguous rows of a batch every process holds in full (rows padded to fit)."""
  pc, pi = jax.process_count(), jax.process_index()
  b = next(iter(batch.values())).shape[0]
  per = -(-b // pc)
  out = {}
  for k, v in batch.items():
    v = np.concatenate([v, np.zeros((per * pc - b,) + v.shape[1:], v.dtype)]) if per * pc > b else v
    out[k] = v[pi * per : (pi + 1) * per]
  return out


_COMPILED: dict = {}


def _compiled(model):
  """One jitted token_outputs per model config, shared by every Scorer in the process."""
  key = getattr(model, "cfg", None)
  try:
    hash(key)
  except TypeError:
    key = None
  if key is None or not isinstance(model, Decoder):
    return jax.jit(functools.partial(token_outputs, model=model))
  if key not in _COMPILED:
    _COMPILED[key] = jax.jit(functools.partial(token_outputs, model=model))
  return _COMPILED[key]


def _to_host(out: dict) -> dict:
  if jax.process_count() > 1:
    return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(out, tiled=True).items()}
  return {k: np.asarray(v) for k, v in out.items()}

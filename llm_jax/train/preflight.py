"""Checks before the first step: tokenizer round trip, one batch through the model, one update that
lowers the loss on that batch. Any failure stops the run with the reason (skip: train.preflight=False)."""
from __future__ import annotations

import functools
import logging
import math

import jax
import numpy as np

from llm_jax.train import optimizer as optimizer_lib
from llm_jax.train import step as step_lib

log = logging.getLogger(__name__)

SAMPLE_TEXT = "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog.\n"


class PreflightError(RuntimeError):
  """A preflight check failed; the message says which and why."""


def tokenizer_round_trip(tokenizer, sample_ids: np.ndarray | None = None) -> str:
  """decode(encode(text)) == text for a fixed sample (and a decoded training row); returns the text."""
  texts = [SAMPLE_TEXT]
  if sample_ids is not None and not np.any(sample_ids == tokenizer.unk_id):
    texts.append(tokenizer.decode(sample_ids.tolist()))
  for text in texts:
    ids = tokenizer.encode(text)
    if tokenizer.unk_id in ids:
      continue  # characters the corpus never had (e.g. a char tokenizer on prose): nothing to test
    back = tokenizer.decode(ids)
    if back != text:
      raise PreflightError(f"tokenizer round trip changed the text: {text[:80]!r} -> {back[:80]!r} "
                           f"(tokenizer {getattr(tokenizer, 'path', '')})")
  return texts[-1]


def _as_eval_batch(batch):
  """The training batch in the evaluation batches' layout (weights of 1, no segment ids)."""
  out = {k: v for k, v in batch.items() if k in ("inputs", "targets", "domain_ids")}
  out["weights"] = jax.numpy.ones(batch["targets"].shape, jax.numpy.float32, device=batch["targets"].sharding)
  return out


def run(state, batch, *, model, config, tokenizer, eval_fn, state_shardings, batch_shardings) -> dict:
  """All preflight checks on the first training batch (global arrays); returns their figures.

  `eval_fn(params, batch) -> sums` is the loop's jitted eval_step (reused: no extra compile).
  """
  host_inputs = np.asarray(jax.device_get(batch["inputs"])) if jax.process_count() == 1 else None
  tokenizer_round_trip(tokenizer, None if host_inputs is None else host_inputs[0])

  eval_batch = _as_eval_batch(batch)

  def loss_of(params):
    sums = eval_fn(params, eval_batch)
    return float(sums["nll_sum"]) / float(sums["tokens"])

  before = loss_of(state.params)
  if not math.isfinite(before):
    raise PreflightError(f"the first batch gives a non-finite loss ({before}) with fresh parameters; "
                         "check model.init_std, model.dtype and the data")
  expected = math.log(model.cfg.vocab_size)
  log.info("preflight: first-batch loss %.4f (uniform over the vocabulary would be %.4f)", before,
           expected)

  # One update at the peak learning rate (no warm-up) on a copy: the state itself is not donated.
  pf_config = config.copy_and_resolve_references()
  with pf_config.unlocked():
    pf_config.train.schedule = "constant"
    pf_config.train.warmup_steps = 0
  optimizer = optimizer_lib.make_optimizer(pf_config)
  step = jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=optimizer,
                                   config=pf_config),
                 in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, jax.sharding.NamedSharding(
                     jax.tree.leaves(state_shardings)[0].mesh, jax.sharding.PartitionSpec())))
  new_state, metrics = step(state, batch)
  after = loss_of(new_state.params)
  del new_state
  if not bool(metrics["finite"]):
    raise PreflightError(f"one update on the first batch gave non-finite gradients "
                         f"(loss {float(metrics['loss'])}, grad norm {float(metrics['grad_norm'])})")
  if not after < before:
    raise PreflightError(f"one update at train.learning_rate={config.train.learning_rate} did not lower "
                         f"the loss on its own batch ({before:.5f} -> {after:.5f}); check the learning "
                         "rate, the optimizer settings and that targets are the inputs shifted by one")
  log.info("preflight: one update lowers the batch loss %.4f -> %.4f; tokenizer round trip ok",
           before, after)
  return {"preflight_loss_before": before, "preflight_loss_after": after}

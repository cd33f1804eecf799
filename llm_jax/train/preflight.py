"""Checks before the first step: the tokenizer round trip, targets that are the inputs shifted by one,
one batch through the model, gradients that reach every trainable parameter, and an update direction
that lowers the loss on that batch for a small enough step. Any failure stops the run with the reason
(skip: train.preflight=False).

The update check does not depend on the configured learning rate: the optimizer's first update is
taken as a direction and tried at decreasing fractions of its length, so a trained model whose loss a
full first Adam step would raise (fine-tuning) passes, and a sign error or a broken optimizer does not.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm_jax.model.params import path_name
from llm_jax.train import step as step_lib

log = logging.getLogger(__name__)

SAMPLE_TEXT = "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog.\n"
STEP_FRACTIONS = (1.0, 0.1, 0.01, 1e-3, 1e-4)  # of the optimizer's first update, tried in turn


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
      raise PreflightError(
        f"tokenizer round trip changed the text: {text[:80]!r} -> {back[:80]!r} "
        f"(tokenizer {getattr(tokenizer, 'path', '')})"
      )
  return texts[-1]


def check_shifted(batch: dict[str, np.ndarray]) -> None:
  """targets[i] == inputs[i + 1] wherever both positions belong to one example (segment)."""
  inputs, targets = np.asarray(batch["inputs"]), np.asarray(batch["targets"])
  same = np.ones(inputs[:, 1:].shape, bool)
  if "segment_ids" in batch:
    seg = np.asarray(batch["segment_ids"])
    same = seg[:, 1:] == seg[:, :-1]
  bad = np.argwhere(same & (inputs[:, 1:] != targets[:, :-1]))
  if len(bad):
    row, pos = (int(x) for x in bad[0])
    raise PreflightError(
      f"the targets are not the inputs shifted by one: row {row}, position {pos} has "
      f"target {int(targets[row, pos])} but the next input is "
      f"{int(inputs[row, pos + 1])} ({len(bad)} such positions in the first batch)"
    )


def _as_eval_batch(batch):
  """The training batch in the evaluation batches' layout (weights of 1, no segment ids)."""
  out = {k: v for k, v in batch.items() if k in ("inputs", "targets", "domain_ids")}
  out["weights"] = jnp.ones(batch["targets"].shape, jnp.float32, device=batch["targets"].sharding)
  return out


def _probe(state, batch, *, model, optimizer, config):
  """Loss, gradient norm, which leaves get a gradient, the first update and its slope g.u."""
  rng = jax.random.fold_in(jax.random.key(config.train.dropout_seed), state.step)
  loss, grads = step_lib.loss_and_grads(state.params, batch, rng, model=model, config=config)
  updates, _ = optimizer.update(grads, state.opt_state, state.params)
  reached = jax.tree.map(lambda g: jnp.any(g != 0), grads)
  slope = sum(
    jnp.vdot(g.astype(jnp.float32), u.astype(jnp.float32))
    for g, u in zip(jax.tree.leaves(grads), jax.tree.leaves(updates), strict=True)
  )
  return loss, optax.tree.norm(grads), reached, updates, slope


def _moved(params, updates, t):
  return jax.tree.map(lambda p, u: p + (t * u).astype(p.dtype), params, updates)


def run(
  state,
  batch,
  *,
  model,
  config,
  tokenizer,
  eval_fn,
  optimizer,
  state_shardings,
  batch_shardings,
  host_batch=None,
) -> dict:
  """All preflight checks on the first training batch (global arrays); returns their figures.

  `eval_fn(params, batch) -> sums` is the loop's jitted eval_step (reused: no extra compile);
  `optimizer` the run's update rule; `host_batch` this process's rows (numpy) when there is one process.
  """
  if host_batch is not None:
    check_shifted(host_batch)
  tokenizer_round_trip(tokenizer, None if host_batch is None else np.asarray(host_batch["inputs"][0]))
  eval_batch = _as_eval_batch(batch)

  def loss_of(params):
    sums = eval_fn(params, eval_batch)
    return float(sums["nll_sum"]) / float(sums["tokens"])

  before = loss_of(state.params)
  if not math.isfinite(before):
    raise PreflightError(
      f"the first batch gives a non-finite loss ({before}) with the initial "
      "parameters; check model.init_std, model.dtype and the data"
    )
  log.info(
    "preflight: first-batch loss %.4f (uniform over the vocabulary would be %.4f)",
    before,
    math.log(model.cfg.vocab_size),
  )

  replicated = jax.sharding.NamedSharding(
    jax.tree.leaves(state_shardings)[0].mesh, jax.sharding.PartitionSpec()
  )
  probe = jax.jit(
    functools.partial(_probe, model=model, optimizer=optimizer, config=config),
    in_shardings=(state_shardings, batch_shardings),
    out_shardings=(replicated, replicated, replicated, state_shardings.params, replicated),
  )
  loss, grad_norm, reached, updates, slope = probe(state, batch)
  if not (math.isfinite(float(loss)) and math.isfinite(float(grad_norm))):
    raise PreflightError(
      f"the first batch gives non-finite gradients (loss {float(loss)}, grad norm {float(grad_norm)})"
    )
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(reached))[0]
  dead = [path_name(p) for p, ok in flat if not bool(ok)]
  if dead:
    raise PreflightError(
      f"no gradient reaches {len(dead)} parameter(s) on the first batch: "
      f"{', '.join(dead[:8])}; they would never train"
    )
  slope = float(slope)
  if not slope < 0:
    raise PreflightError(
      f"the optimizer's first update does not point downhill on its own batch "
      f"(gradient . update = {slope:.3g} >= 0); check the optimizer settings "
      "(train.learning_rate, train.weight_decay) and the loss"
    )
  move = jax.jit(_moved, out_shardings=state_shardings.params)
  after, fraction = before, None
  for t in STEP_FRACTIONS:
    after = loss_of(move(state.params, updates, jnp.float32(t)))
    if after < before:
      fraction = t
      break
  del updates
  if fraction is None:  # descends to first order, but below what the loss's precision resolves
    log.warning(
      "preflight: the first update points downhill (gradient . update = %.3g) but even %g "
      "of it does not lower the batch loss measurably (%.6f -> %.6f)",
      slope,
      STEP_FRACTIONS[-1],
      before,
      after,
    )
  else:
    log.info(
      "preflight: %g of the first update lowers the batch loss %.4f -> %.4f; gradients reach "
      "every parameter; tokenizer round trip ok",
      fraction,
      before,
      after,
    )
  return {
    "preflight_loss_before": before,
    "preflight_loss_after": after,
    "preflight_step_fraction": fraction if fraction is not None else 0.0,
  }

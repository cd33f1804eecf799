"""AdamW with warm-up and decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import optax

from llm_jax import config as config_lib

_NO_DECAY = ("embedding", "bias", "scale")


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warm-up to the peak, then cosine or linear decay to peak * min_lr_ratio (or constant)."""
  tr = config.train
  peak, floor = tr.learning_rate, tr.learning_rate * tr.min_lr_ratio
  warmup = int(tr.warmup_steps)
  total = int(tr.decay_steps or config_lib.total_steps(config))
  decay = max(1, total - warmup)
  warm = optax.linear_schedule(peak / (warmup + 1), peak, max(1, warmup))  # never 0 at step 0
  if tr.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay, alpha=tr.min_lr_ratio)
  elif tr.schedule == "linear":
    after = optax.linear_schedule(peak, floor, decay)
  else:
    after = optax.constant_schedule(peak)
  if warmup <= 0:
    return after
  return optax.join_schedules([warm, after], [warmup])


def decay_mask(params, decay_all: bool = False):
  """True where AdamW weight decay applies: matrices, not norms, biases or embeddings."""

  def keep(path, _):
    if decay_all:
      return True
    names = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    return not any(n in names for n in _NO_DECAY)

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(config) -> optax.GradientTransformation:
  """The update rule from config.train: clipping, then AdamW with the schedule and decay mask.

  A training variant wraps it (TrainExtension.wrap_optimizer: e.g. frozen parameters masked out).
  """
  tr = config.train
  adamw = optax.adamw(
    learning_rate_schedule(config),
    b1=tr.b1,
    b2=tr.b2,
    eps=tr.eps,
    weight_decay=tr.weight_decay,
    mask=lambda p: decay_mask(p, tr.decay_norms_biases_embeddings),
  )
  if tr.grad_clip and tr.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(tr.grad_clip), adamw)
  return adamw

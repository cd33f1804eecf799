"""The pure training and evaluation steps."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llm_jax import sharding as sharding_lib
from llm_jax.model import Decoder
from llm_jax.model.layers import head_logits
from llm_jax.model.partitioning import current_mesh
from llm_jax.train import loss as loss_lib
from llm_jax.train.state import TrainState


def _split_microbatches(batch, n: int):
  """[B, ...] -> [n, B/n, ...], microbatch m taking rows m, m+n, ... so every shard serves each pass."""

  def split(x):
    return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)

  return jax.tree.map(split, batch)


def _loss_logits(module: Decoder, tokens_BL, segment_ids_BL, deterministic: bool, positions_BL=None):
  """Logits in the head's output dtype (model.logits_dtype): the loss upcasts them inside fusions."""
  h_BLD = module.hidden(tokens_BL, positions_BL, segment_ids_BL, deterministic=deterministic)
  return module.logits(h_BLD, keep_dtype=True)


def _hidden_and_head(module: Decoder, tokens_BL, segment_ids_BL, deterministic: bool, positions_BL=None):
  """Final hidden states and the head matrix [D, V] (the chunked loss applies the head itself)."""
  h_BLD = module.hidden(tokens_BL, positions_BL, segment_ids_BL, deterministic=deterministic)
  return h_BLD, module.head_matrix()


def _forward_sums(
  params, batch, rng, *, model: Decoder, z_loss: float, deterministic: bool, chunks: int, kernel: bool
):
  """(nll + z-loss sum, nll sum, sum of weights); chunks > 0: the head and loss in sequence slices;
  kernel: the loss and d(logits) from the fused Pallas kernel (in one slice unless chunks > 1)."""
  weights_BL = batch.get("weights", jnp.ones(batch["targets"].shape, jnp.float32))
  if chunks > 0 or kernel:
    h_BLD, w_DV = model.apply(
      {"params": params},
      batch["inputs"],
      batch.get("segment_ids"),
      deterministic,
      batch.get("positions"),
      method=_hidden_and_head,
      rngs=None if deterministic else {"dropout": rng},
    )
    fp8 = model.cfg.fp8 and model.cfg.fp8_head
    head_fn = functools.partial(head_logits, cfg=model.cfg, fp8=fp8)
    total, nll, _ = loss_lib.chunked_sums(
      h_BLD,
      w_DV,
      batch["targets"],
      weights_BL,
      head_fn=head_fn,
      z_loss=z_loss,
      chunks=max(1, chunks),
      kernel=kernel,
    )
    return total, nll, jnp.sum(weights_BL.astype(jnp.float32))
  logits_BLV = model.apply(
    {"params": params},
    batch["inputs"],
    batch.get("segment_ids"),
    deterministic,
    batch.get("positions"),
    method=_loss_logits,
    rngs=None if deterministic else {"dropout": rng},
  )
  nll, z, w = loss_lib.weighted_sums(logits_BLV, batch["targets"], weights_BL, z_loss)
  return nll + z, nll, w


def uses_loss_kernel(config, platform: str | None = None, mesh=None) -> bool:
  """Whether train.loss_kernel picks the fused Pallas loss: `pallas` always; `auto` on GPUs unless the mesh
  (default: the current one) splits the logits' vocabulary (`act_vocab` under the config's rules, e.g. over
  `tensor`): the kernel would gather it and repeat each row's work on every shard of it."""
  choice = config.train.get("loss_kernel", "xla")
  if choice != "auto":
    return choice == "pallas"
  if (platform or jax.default_backend()) != "gpu":
    return False
  mesh = current_mesh() if mesh is None else mesh
  if mesh is None:
    return True
  axes = nn.logical_to_mesh_axes(("act_vocab",), sharding_lib.rules(config))[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return all(mesh.shape[a] == 1 for a in axes)


def loss_and_grads(params, batch, rng, *, model: Decoder, config, params_fn=None):
  """Mean loss over the global batch and its gradients, accumulated over config.train.microbatches.

  `params_fn(trainable, rng) -> model params` (fine-tuning, e.g. LoRA merging adapters into frozen
  weights): gradients are then taken with respect to `params`, the trainable tree.
  """
  tr = config.train
  deterministic = model.cfg.dropout == 0.0 and model.cfg.attention_dropout == 0.0
  n = max(1, int(tr.microbatches))
  chunks = int(tr.get("loss_chunks", 0))
  kernel = uses_loss_kernel(config)

  def sums_fn(p, mb, r):
    if params_fn is not None:
      p = params_fn(p, jax.random.fold_in(r, 1))
    total, nll, w = _forward_sums(
      p, mb, r, model=model, z_loss=tr.z_loss, deterministic=deterministic, chunks=chunks, kernel=kernel
    )
    return total, (nll, w)

  grad_fn = jax.grad(sums_fn, has_aux=True)
  if n == 1:
    g_sum, (nll_sum, w_sum) = grad_fn(params, batch, rng)
  else:

    def body(carry, xs):
      g_acc, nll_acc, w_acc = carry
      mb, i = xs
      g, (nll, w) = grad_fn(params, mb, jax.random.fold_in(rng, i))
      return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, w_acc + w), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (g_sum, nll_sum, w_sum), _ = jax.lax.scan(body, init, (_split_microbatches(batch, n), jnp.arange(n)))
  denom = jnp.maximum(w_sum, 1.0)
  grads = jax.tree.map(lambda g: g / denom, g_sum)
  return nll_sum / denom, grads


def train_step(state: TrainState, batch, *, model: Decoder, optimizer, config, params_fn=None):
  """One optimizer update. Non-finite loss or gradients leave parameters and optimizer state unchanged."""
  rng = jax.random.fold_in(jax.random.key(config.train.dropout_seed), state.step)
  loss, grads = loss_and_grads(state.params, batch, rng, model=model, config=config, params_fn=params_fn)
  grad_norm = optax.tree.norm(grads)
  updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jnp.where(finite, new, old)
  new_state = state.replace(
    step=state.step + 1,
    params=jax.tree.map(keep, new_params, state.params),
    opt_state=jax.tree.map(keep, new_opt, state.opt_state),
    skipped=state.skipped + (1 - finite.astype(jnp.int32)),
  )
  metrics = {
    "loss": loss,
    "grad_norm": grad_norm,
    "param_norm": optax.tree.norm(new_state.params),
    "finite": finite,
  }
  return new_state, metrics


def eval_step(params, batch, *, model: Decoder, num_domains: int):
  """Summed nll and token counts, overall and per domain, for one batch (no dropout)."""
  logits_BLV = model.apply(
    {"params": params}, batch["inputs"], batch.get("positions"), batch.get("segment_ids")
  )
  nll_BL, _ = loss_lib.token_nll(logits_BLV, batch["targets"])
  w_BL = batch.get("weights", jnp.ones(batch["targets"].shape, jnp.float32)).astype(jnp.float32)
  dom = batch.get("domain_ids", jnp.zeros(batch["targets"].shape, jnp.int32)).reshape(-1)
  return {
    "nll_sum": jnp.sum(nll_BL * w_BL),
    "tokens": jnp.sum(w_BL),
    "domain_nll_sum": jax.ops.segment_sum((nll_BL * w_BL).reshape(-1), dom, num_domains),
    "domain_tokens": jax.ops.segment_sum(w_BL.reshape(-1), dom, num_domains),
  }

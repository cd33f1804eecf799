"""The optimized step computes the plain step's function: custom gradients, bfloat16 logits,
unrolled layers and accumulation against autodiff, float32 logits, a scanned stack and one pass."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax import sharding
from llm_jax.model import Decoder, ModelConfig
from llm_jax.model.transformer import gelu_tanh, swiglu
from llm_jax.train import loss as loss_lib
from llm_jax.train import optimizer as optimizer_lib
from llm_jax.train import state as state_lib
from llm_jax.train import step as step_lib

VOCAB = 64
BASE = [
  "model.num_layers=2",
  "model.d_model=32",
  "model.num_heads=4",
  "model.num_kv_heads=2",
  "model.max_seq_len=16",
  "train.seq_len=16",
  "train.global_batch_size=8",
  "train.warmup_steps=0",
  "train.learning_rate=0.01",
  "sharding.data=1",
]
PLAIN = ["model.scan_unroll=1", "model.logits_dtype=float32", "train.microbatches=1"]
OPTIMIZED = ["model.scan_unroll=2", "model.logits_dtype=auto", "train.microbatches=2"]


def _reference_nll(logits, targets):
  x = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(x, axis=-1)
  return lse - jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0], lse


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_entropy_values_and_gradients_match_autodiff(dtype):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  logits = (4 * jax.random.normal(k1, (3, 5, 97))).astype(dtype)
  targets = jax.random.randint(k2, (3, 5), 0, 97)
  w = jax.random.uniform(k3, (3, 5))

  def objective(nll_fn, x):
    nll, lse = nll_fn(x, targets)
    return jnp.sum(w * nll) + 1e-2 * jnp.sum(w * lse**2)  # the z-loss path uses the lse output

  ref_val, ref_grad = jax.value_and_grad(functools.partial(objective, _reference_nll))(logits)
  val, grad = jax.value_and_grad(functools.partial(objective, loss_lib.token_nll))(logits)
  assert grad.dtype == dtype  # d(logits) stays in the logits' dtype
  np.testing.assert_allclose(val, ref_val, rtol=1e-5)
  tol = 1e-6 if dtype == jnp.float32 else 1e-2  # bf16 autodiff rounds intermediates
  np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(ref_grad, np.float32), atol=tol)


def test_activation_gradients_match_autodiff():
  x = 3 * jax.random.normal(jax.random.key(1), (257,))
  u = jax.random.normal(jax.random.key(2), (257,))
  g = jax.grad(lambda a: jnp.sum(gelu_tanh(a) * u))(x)
  g_ref = jax.grad(lambda a: jnp.sum(nn.gelu(a, approximate=True) * u))(x)
  np.testing.assert_allclose(g, g_ref, atol=1e-5)
  np.testing.assert_allclose(gelu_tanh(x), nn.gelu(x, approximate=True))
  grads = jax.grad(lambda a, b: jnp.sum(swiglu(a, b) * x), argnums=(0, 1))(u, x)
  grads_ref = jax.grad(lambda a, b: jnp.sum(nn.silu(a) * b * x), argnums=(0, 1))(u, x)
  for a, b in zip(grads, grads_ref, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)


def _learnable_batches(n):
  """Rows that count upward mod VOCAB from random starts: a pattern the model learns in a few steps."""
  rng = np.random.default_rng(0)
  starts = rng.integers(0, VOCAB, (n, 8, 1))
  return ((starts + np.arange(17)) % VOCAB).astype(np.int32)


def _losses(overrides, steps=12):
  c = config_lib.load("configs/tiny.py", BASE + list(overrides))
  config_lib.validate(c, 1)
  mesh = sharding.make_mesh(c, jax.devices()[:1])
  model = Decoder(ModelConfig.from_config(c, tokenizer_size=VOCAB, platform="cpu"))
  opt = optimizer_lib.make_optimizer(c)
  state, shardings = state_lib.create_state(model, opt, mesh, c, seed=0)
  fn = jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=opt, config=c), donate_argnums=0)
  losses = []
  with sharding.activate(mesh, c):
    for tokens in _learnable_batches(steps):
      batch = sharding.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, mesh)
      state, metrics = fn(state, batch)
      losses.append(float(metrics["loss"]))
  return np.asarray(losses)


def test_optimized_step_matches_plain_in_float32():
  plain = _losses(PLAIN + ["model.dtype=float32"])
  optimized = _losses(OPTIMIZED + ["model.dtype=float32"])
  assert plain[-1] < 0.7 * plain[0]  # it learns, so a wrong gradient would show
  np.testing.assert_allclose(optimized, plain, rtol=1e-4)


def test_optimized_step_matches_plain_in_bfloat16():
  plain = _losses(PLAIN + ["model.dtype=bfloat16"])
  optimized = _losses(OPTIMIZED + ["model.dtype=bfloat16"])  # bfloat16 logits here
  assert plain[-1] < 0.7 * plain[0]
  np.testing.assert_allclose(optimized, plain, rtol=2e-2)  # measured 0.6%


def test_attention_dropout_path_is_the_same_attention():
  c = config_lib.load("configs/tiny.py", BASE)
  tokens = jnp.asarray(_learnable_batches(1)[0, :2, :16])
  segments = jnp.asarray(np.repeat([[1] * 8 + [2] * 8], 2, axis=0))

  def model_with(rate):
    cfg = c.copy_and_resolve_references()
    config_lib.set_key(cfg, "model.attention_dropout", rate)
    return Decoder(ModelConfig.from_config(cfg, tokenizer_size=VOCAB, platform="cpu"))

  params = jax.jit(model_with(0.0).init)(jax.random.key(0), tokens)["params"]  # dropout adds none

  def apply(rate, deterministic, segment_ids=None):
    model = model_with(rate)

    @jax.jit  # one compile per variant (op by op the test took ~40 s on 2 cores)
    def run(params, tokens, segment_ids):
      return model.apply(
        {"params": params},
        tokens,
        None,
        segment_ids,
        deterministic=deterministic,
        rngs={"dropout": jax.random.key(1)},
      )

    return run(params, tokens, segment_ids)

  for seg in (None, segments):
    np.testing.assert_allclose(apply(1e-9, False, seg), apply(0.0, True, seg), atol=1e-5)
  assert not np.allclose(apply(0.5, False), apply(0.0, True), atol=1e-3)

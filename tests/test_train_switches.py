"""The training-speed switches (docs/performance.md, "Training switches"): FP8 matmuls (model.fp8) stay
close to the compute-dtype step, and the chunked head + cross-entropy (train.loss_chunks) computes the
unchunked loss and gradients without [B, L, V] logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax.model import Decoder, ModelConfig
from llm_jax.model.fp8 import fp8_dot_general
from llm_jax.train import step as step_lib

B, L, TOKENIZER = 4, 16, 200  # vocab padded to 256 (mlp_dim is 128)
BASE = [
  "model.num_layers=2",
  "model.d_model=32",
  "model.num_heads=4",
  "model.max_seq_len=16",
  "train.seq_len=16",
  "train.global_batch_size=4",
]
TOKENS = np.asarray(jax.random.randint(jax.random.key(1), (B, L + 1), 0, TOKENIZER))
WEIGHTS = np.asarray(jax.random.uniform(jax.random.key(3), (B, L)) > 0.2, np.float32)  # some masked


def _setup(overrides):
  c = config_lib.load("configs/tiny.py", BASE + list(overrides))
  config_lib.validate(c, 1)
  model = Decoder(ModelConfig.from_config(c, tokenizer_size=TOKENIZER, platform="cpu"))
  params = model.init(jax.random.key(0), jnp.asarray(TOKENS[:, :-1]))["params"]
  batch = {"inputs": TOKENS[:, :-1], "targets": TOKENS[:, 1:], "weights": WEIGHTS}
  fn = functools.partial(step_lib.loss_and_grads, model=model, config=c)
  return fn, params, batch


_CACHE = {}


def _loss_grads(*overrides):
  """(loss, flat float32 gradients) of the real loss_and_grads, one compile per setting per module."""
  if overrides not in _CACHE:
    fn, params, batch = _setup(overrides)
    loss, grads = jax.jit(fn)(params, batch, jax.random.key(2))
    flat = {jax.tree_util.keystr(k): np.asarray(v, np.float32) for k, v in jax.tree.leaves_with_path(grads)}
    _CACHE[overrides] = (float(loss), flat)
  return _CACHE[overrides]


def _dtypes_in_grad_program(*overrides):
  fn, params, batch = _setup(overrides)
  jaxpr = str(jax.make_jaxpr(fn)(params, batch, jax.random.key(2)))
  return jaxpr


def _rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------ FP8


def test_fp8_dot_general_is_close_to_the_exact_product_forward_and_backward():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (4, 32, 64))
  w = 0.05 * jax.random.normal(k2, (64, 96))
  g = jax.random.normal(k3, (4, 32, 96))
  dims = (((2,), (0,)), ((), ()))

  def loss(dot, a, b):
    return jnp.sum(dot(a, b, dims) * g)

  y8, y = fp8_dot_general(x, w, dims), jax.lax.dot_general(x, w, dims)
  dx8, dw8 = jax.grad(functools.partial(loss, fp8_dot_general), argnums=(0, 1))(x, w)
  dx, dw = jax.grad(functools.partial(loss, jax.lax.dot_general), argnums=(0, 1))(x, w)
  # e4m3 keeps 3 mantissa bits (rounding error <= 1/16 per operand, ~2% rms); e5m2 keeps 2 (<= 1/8).
  # A dot of 64 products averages those errors: measured 2.5% forward, 4-5% backward.
  assert _rel(y8, y) < 0.04
  assert _rel(dx8, dx) < 0.08 and _rel(dw8, dw) < 0.08
  assert _rel(y8, y) > 1e-4  # it really is rounded to 8 bits
  jaxpr = str(jax.make_jaxpr(jax.grad(functools.partial(loss, fp8_dot_general)))(x, w))
  assert "f8_e4m3fn" in jaxpr and "f8_e5m2" in jaxpr


def test_fp8_matmuls_take_the_fp8_values_themselves():
  """XLA's GPU compiler collapses chains of float converts when excess precision is allowed (its
  default): f32 -> f8 -> bf16 becomes f32 -> bf16. A quantize -> dequantize -> dot emulation therefore
  rounds nothing on a GPU (and gives the GEMM rewriter no FP8 to match). Each matmul of the forward and
  backward pass must take FP8 operands: those converts feed the dot and are kept."""
  x = jax.random.normal(jax.random.key(0), (4, 32, 64), jnp.bfloat16)
  w = (0.05 * jax.random.normal(jax.random.key(1), (64, 96))).astype(jnp.bfloat16)
  dims = (((2,), (0,)), ((), ()))

  def loss(a, b):
    return jnp.sum(fp8_dot_general(a, b, dims).astype(jnp.float32))

  text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w).as_text()
  dots = [line for line in text.splitlines() if "dot_general" in line]
  assert len(dots) == 3, dots  # forward, d(lhs), d(rhs)
  for line in dots:
    operands = line.rsplit(":", 1)[1].split("->")[0]
    assert operands.count("f8E") == 2, line


def test_fp8_rejects_a_matmul_layout_it_does_not_transpose():
  x, w = jnp.ones((4, 8)), jnp.ones((6, 8))
  with pytest.raises(ValueError, match="x's last axes against w's first"):
    fp8_dot_general(x, w, (((1,), (1,)), ((), ())))  # x @ w.T


def test_fp8_step_is_close_to_the_float32_step_and_finite():
  loss, grads = _loss_grads("model.dtype=float32")
  loss8, grads8 = _loss_grads("model.dtype=float32", "model.fp8=True")
  # The loss is ~ln(256) at init; FP8 rounding of 3 matmuls per layer moves it by well under 1%
  # (measured 0.016%).
  assert abs(loss8 - loss) / loss < 0.01
  assert loss8 != loss
  _assert_close_grads(grads8, grads)


def _assert_close_grads(grads_a, grads_b, overall=0.1, per_tensor=0.2):
  """Finite, and within `overall` (all tensors together) and `per_tensor` relative error. A tensor whose
  exact gradient is ~0 (key biases: softmax ignores them) is held to 1e-6 absolute.

  FP8 defaults: e5m2 rounds by up to 1/8; measured 5% overall and 3-11% per tensor."""
  flat_b = np.concatenate([g.ravel() for g in grads_b.values()])
  flat_a = np.concatenate([grads_a[k].ravel() for k in grads_b])
  assert np.all(np.isfinite(flat_a))
  assert _rel(flat_a, flat_b) < overall
  for k, g in grads_b.items():
    err = np.linalg.norm(grads_a[k] - g)
    assert err < per_tensor * np.linalg.norm(g) + 1e-6, (k, err, np.linalg.norm(g))


def _fp8_dots(*overrides):
  """How many dot_generals of the loss-and-gradient program take two FP8 operands."""
  fn, params, batch = _setup(overrides)
  text = jax.jit(fn).lower(params, batch, jax.random.key(2)).as_text()
  dots = [line for line in text.splitlines() if "dot_general" in line]
  return sum(line.rsplit(":", 1)[1].split("->")[0].count("f8E") == 2 for line in dots)


@pytest.mark.parametrize("chunks", ["train.loss_chunks=0", "train.loss_chunks=2"])
def test_fp8_quantizes_the_mlp_and_the_head_only_with_fp8_head(chunks):
  """model.fp8: up and down (one scanned block), each forward, d(input) and d(kernel): 6 FP8 dots;
  model.fp8_head adds the head's 3 (in the chunked loss too, whose scan body has them once)."""
  assert _fp8_dots("model.dtype=float32", chunks) == 0
  assert _fp8_dots("model.dtype=float32", chunks, "model.fp8=True") == 6
  assert _fp8_dots("model.dtype=float32", chunks, "model.fp8=True", "model.fp8_head=True") == 9


def test_a_config_json_from_before_fp8_head_keeps_its_head_in_fp8(tmp_path):
  """model.fp8 covered the output head until model.fp8_head existed: an older run resumes unchanged."""
  import json

  c = config_lib.load("configs/tiny.py", ["model.fp8=True"])
  raw = json.loads(c.to_json_best_effort())
  del raw["model"]["fp8_head"]
  path = tmp_path / "config.json"
  path.write_text(json.dumps(raw))
  assert config_lib.from_json(str(path)).model.fp8_head is True
  assert c.model.fp8_head is False  # a new config: the MLP only


def test_fp8_is_not_used_when_decoding():
  c = config_lib.load("configs/tiny.py", BASE + ["model.fp8=True", "model.dtype=float32"])
  cfg = ModelConfig.from_config(c, tokenizer_size=TOKENIZER, platform="cpu")
  tokens = jnp.asarray(TOKENS[:, :4])
  variables = Decoder(cfg, decode=True).init(jax.random.key(0), tokens)
  step = functools.partial(Decoder(cfg, decode=True).apply, mutable=["cache"])
  assert "f8_" not in str(jax.make_jaxpr(step)(variables, tokens))
  assert "f8_" in str(jax.make_jaxpr(Decoder(cfg).apply)({"params": variables["params"]}, tokens))


# ------------------------------------------------------------------ chunked cross-entropy


@pytest.mark.parametrize(
  "dtype,tie,tol",
  [
    # both dtypes and both head kinds, two cases (CI time: each case compiles two steps)
    ("float32", "True", 1e-5),
    # bfloat16 logits: each slice rounds exactly as the whole batch does; the head gradient is summed
    # over slices in float32 instead of coming out of one bfloat16 GEMM (measured <= 0.4% apart)
    ("bfloat16", "False", 1e-2),
  ],
)
def test_chunked_loss_and_gradients_equal_the_unchunked_ones(dtype, tie, tol):
  common = (f"model.dtype={dtype}", f"model.tie_embeddings={tie}", "train.z_loss=1e-2")
  loss, grads = _loss_grads(*common)
  loss_c, grads_c = _loss_grads(*common, "train.loss_chunks=3")  # 16 positions: slices of 6, padded
  np.testing.assert_allclose(loss_c, loss, rtol=1e-6 if dtype == "float32" else 1e-3)
  assert grads_c.keys() == grads.keys()
  _assert_close_grads(grads_c, grads, tol, tol)


def test_chunked_loss_with_microbatches_and_fp8():
  loss, grads = _loss_grads("model.dtype=float32", "model.fp8=True")
  loss_c, grads_c = _loss_grads("model.dtype=float32", "model.fp8=True", "train.loss_chunks=4")
  loss_m, _ = _loss_grads("model.dtype=float32", "train.loss_chunks=2", "train.microbatches=2")
  assert abs(loss_c - loss) / loss < 0.01  # per-slice FP8 scales for the head: close, not equal
  _assert_close_grads(grads_c, grads)
  np.testing.assert_allclose(loss_m, _loss_grads("model.dtype=float32")[0], rtol=1e-6)


def test_chunked_program_never_holds_the_full_logits():
  vocab = 256
  full = f"f32[{B},{L},{vocab}]"
  assert full in _dtypes_in_grad_program("model.dtype=float32")  # the check can see them
  chunked = _dtypes_in_grad_program("model.dtype=float32", "train.loss_chunks=4")
  assert full not in chunked and f"f32[{B},{L // 4},{vocab}]" in chunked


def test_negative_loss_chunks_is_a_config_error():
  with pytest.raises(config_lib.ConfigError, match="train.loss_chunks"):
    config_lib.validate(config_lib.load("configs/tiny.py", ["train.loss_chunks=-1"]), 1)

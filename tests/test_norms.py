"""model.norm_vjp (llm_jax/model/norms.py): LayerNorm and RMSNorm with a hand-written gradient. The same
parameters and forward pass as flax's, gradients equal to autodiff's, and only x (in its dtype) plus two
float32 numbers a row kept for the backward pass."""

import contextlib
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from test_step import run_steps

from llm_jax.model import norms


def _flax_and_ours(kind, use_bias, out_dtype):
  kw = dict(epsilon=1e-5, dtype=jnp.float32)
  if kind == "layernorm":
    return nn.LayerNorm(use_bias=use_bias, **kw), norms.LayerNorm(
      use_bias=use_bias, out_dtype=out_dtype, **kw
    )
  return nn.RMSNorm(**kw), norms.RMSNorm(out_dtype=out_dtype, **kw)


@pytest.mark.parametrize(
  ("kind", "use_bias"), [("layernorm", True), ("layernorm", False), ("rmsnorm", False)]
)
def test_same_parameters_values_and_gradients_as_flax(kind, use_bias):
  theirs, ours = _flax_and_ours(kind, use_bias, jnp.float32)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = 3.0 + 2.0 * jax.random.normal(k1, (2, 8, 64))  # an offset mean: the centring matters
  ct = jax.random.normal(k2, (2, 8, 64))
  params = theirs.init(k3, x)
  assert jax.tree.structure(ours.init(k3, x)) == jax.tree.structure(params)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(k3, p.shape), params)  # not ones and zeros

  def loss(module, p, x):
    return jnp.sum(module.apply(p, x) * ct)

  want = jax.value_and_grad(lambda p, x: loss(theirs, p, x), (0, 1))(params, x)
  got = jax.value_and_grad(lambda p, x: loss(ours, p, x), (0, 1))(params, x)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_the_backward_pass_keeps_x_in_its_dtype_and_two_numbers_a_row():
  theirs, ours = _flax_and_ours("layernorm", True, jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (2, 8, 64), jnp.bfloat16)
  params = theirs.init(jax.random.key(1), x)

  def kept(fn):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      print_saved_residuals(fn, params, x)
    return out.getvalue()

  ours_kept = kept(lambda p, x: jnp.sum(ours.apply(p, x).astype(jnp.float32)))
  theirs_kept = kept(lambda p, x: jnp.sum(theirs.apply(p, x.astype(jnp.float32))))
  assert "f32[2,8,64]" in theirs_kept  # autodiff through flax keeps float32 copies of x's size
  assert "f32[2,8,64]" not in ours_kept and "bf16[2,8,64]" in ours_kept, ours_kept
  assert ours_kept.count("f32[2,8,1]") == 2, ours_kept  # mean and 1 / std


def test_bfloat16_output_and_gradient_dtypes():
  _, ours = _flax_and_ours("layernorm", True, jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (4, 32), jnp.bfloat16)
  params = ours.init(jax.random.key(1), x)
  y, vjp = jax.vjp(lambda p, x: ours.apply(p, x), params, x)
  dp, dx = vjp(jnp.ones_like(y))
  assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(dp))  # the parameters' own dtype


def test_training_with_norm_vjp_matches_on_a_mesh():
  """data x fsdp x tensor = 2 x 2 x 2, bf16: three steps' losses as with flax's norms (the same initial
  parameters: the loss of the first step is the same number)."""
  mesh = ["sharding.data=2", "sharding.fsdp=2", "sharding.tensor=2", "model.dtype=bfloat16"]
  ref, ref_state, _ = run_steps([*mesh, "model.norm_vjp=False"])
  got, state, _ = run_steps([*mesh, "model.norm_vjp=True"])
  assert jax.tree.structure(state.params) == jax.tree.structure(ref_state.params)
  assert got[0] == pytest.approx(ref[0], rel=1e-3)
  np.testing.assert_allclose(got, ref, rtol=2e-3)

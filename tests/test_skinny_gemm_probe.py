"""bench/skinny_gemm_probe.py's Pallas kernels compute the products they time (interpret mode on CPU)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "bench", "skinny_gemm_probe.py")
_spec = importlib.util.spec_from_file_location("skinny_gemm_probe", _PATH)
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)

M, D, F = 16, 256, 128  # the smallest shapes the kernels' 128-wide K chunks allow


def _inputs():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (M, D), jnp.bfloat16)
  w_up = (jax.random.normal(k2, (D, F)) / D**0.5).astype(jnp.bfloat16)
  w_down = (jax.random.normal(k3, (F, D)) / F**0.5).astype(jnp.bfloat16)
  return x, w_up, w_down


def test_split_k_partials_add_up_to_the_product():
  x, w_up, _ = _inputs()
  ref = np.asarray(jnp.dot(x, w_up, preferred_element_type=jnp.float32))
  parts = probe.skinny_matmul(x, w_up, bn=32, splits=2, interpret=True)
  assert parts.shape == (2, M, F)
  np.testing.assert_allclose(np.asarray(parts.sum(0)), ref, rtol=1e-2, atol=1e-2)
  assert not np.allclose(np.asarray(parts[0]), ref, atol=1e-2)  # each share is a partial sum
  with pytest.raises(ValueError, match="must split"):
    probe.skinny_matmul(x, w_up, bn=32, splits=3, interpret=True)


@pytest.mark.parametrize("atomic", [False, True])
def test_fused_mlp_is_down_of_gelu_of_up(atomic):
  x, w_up, w_down = _inputs()
  h = jax.nn.gelu(jnp.dot(x, w_up, preferred_element_type=jnp.float32), approximate=True)
  ref = np.asarray(jnp.dot(h.astype(jnp.bfloat16), w_down, preferred_element_type=jnp.float32))
  out = probe.fused_mlp(x, w_up, w_down, f=64, atomic=atomic, interpret=True)
  out = out if atomic else out.sum(0)
  assert out.shape == (M, D)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-2, atol=2e-2)

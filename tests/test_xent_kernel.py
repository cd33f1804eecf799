"""The fused cross-entropy kernel (train.loss_kernel=pallas, llm_jax/train/xent_kernel.py), run in Pallas's
interpreter on CPU: the same nll, log-partition and d(logits) as the XLA loss, alone, in the training
step's loss and gradients, and on a (data, fsdp, tensor) mesh."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_step import BASE, run_steps
from test_train_switches import _assert_close_grads, _loss_grads

from llm_jax import config as config_lib
from llm_jax import sharding
from llm_jax.train import loss as loss_lib
from llm_jax.train import run_dir
from llm_jax.train.step import uses_loss_kernel
from llm_jax.train.xent_kernel import nll_lse_grad

N, V = 12, 300  # 300 columns in blocks of 64: five loads, the last one masked


def _xla(logits_NV, targets_N, weights_N, z_loss):
  def total(x):
    nll, lse = loss_lib.token_nll(x[None], targets_N[None])
    return jnp.sum(weights_N * (nll[0] + z_loss * lse[0] ** 2)), (nll[0], lse[0])

  (_, (nll, lse)), d = jax.value_and_grad(total, has_aux=True)(logits_NV)
  return nll, lse, d


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_kernel_equals_the_xla_loss_and_its_gradient(z_loss):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  logits = 4.0 * jax.random.normal(k1, (N, V), jnp.float32)
  targets = jax.random.randint(k2, (N,), 0, V).at[0].set(V - 1).at[1].set(0)  # the last and first column
  weights = jax.random.uniform(k3, (N,)).at[2].set(0.0)
  nll, lse, d = jax.jit(lambda *a: nll_lse_grad(*a, z_loss=z_loss, block=64))(logits, targets, weights)
  ref_nll, ref_lse, ref_d = _xla(logits, targets, weights, z_loss)
  np.testing.assert_allclose(nll, ref_nll, rtol=1e-5)
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-5)
  np.testing.assert_allclose(d, ref_d, atol=1e-6, rtol=1e-5)
  assert not np.any(d[2])  # a weight of 0: no gradient


def test_the_interpreter_on_a_cpu_says_it_is_slow(caplog):
  x = jnp.zeros((2, 8), jnp.float32)
  with caplog.at_level("WARNING"):
    nll_lse_grad(x, jnp.zeros((2,), jnp.int32), jnp.ones((2,)))
  assert "interpreter on CPUs" in caplog.text and "train.loss_kernel=xla" in caplog.text


def test_a_platform_without_triton_is_refused_naming_the_key(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pytest.raises(ValueError, match="train.loss_kernel='pallas' is a Triton kernel for GPUs.*tpu"):
    nll_lse_grad(jnp.zeros((2, 8)), jnp.zeros((2,), jnp.int32), jnp.ones((2,)))


def test_bfloat16_logits_give_a_bfloat16_gradient_as_close_as_its_rounding():
  logits = (4.0 * jax.random.normal(jax.random.key(1), (N, V))).astype(jnp.bfloat16)
  targets = jax.random.randint(jax.random.key(2), (N,), 0, V)
  weights = jnp.ones((N,), jnp.float32)
  nll, lse, d = jax.jit(lambda *a: nll_lse_grad(*a, block=128))(logits, targets, weights)
  ref_nll, ref_lse, ref_d = _xla(logits.astype(jnp.float32), targets, weights, 0.0)
  assert d.dtype == jnp.bfloat16 and nll.dtype == jnp.float32
  np.testing.assert_allclose(nll, ref_nll, rtol=1e-5)  # the statistics are float32 throughout
  np.testing.assert_allclose(np.asarray(d, np.float32), ref_d, atol=2**-8, rtol=2**-7)


def test_training_loss_and_gradients_equal_the_xla_ones():
  """The step's loss_and_grads with the kernel, whole and in slices, against XLA's, with z-loss and masked
  tokens (tests/test_train_switches.py's tiny model and batch)."""
  common = ("model.dtype=float32", "train.z_loss=1e-2")
  loss, grads = _loss_grads(*common)
  for extra in (("train.loss_kernel=pallas",), ("train.loss_kernel=pallas", "train.loss_chunks=2")):
    loss_k, grads_k = _loss_grads(*common, *extra)
    np.testing.assert_allclose(loss_k, loss, rtol=1e-6)
    assert grads_k.keys() == grads.keys()
    _assert_close_grads(grads_k, grads, 1e-5, 1e-5)


def test_training_on_a_mesh_with_the_kernel_matches_one_device_of_xla():
  """data x fsdp x tensor = 2 x 2 x 2: the kernel runs per device on its rows (shard_map), the
  tensor-sharded vocabulary gathered; three steps' losses as XLA's loss gives on data=8."""
  ref, _, _ = run_steps(["sharding.data=8"])
  mesh = ["sharding.data=2", "sharding.fsdp=2", "sharding.tensor=2"]
  losses, _, _ = run_steps([*mesh, "train.loss_kernel=pallas"])
  np.testing.assert_allclose(losses, ref, atol=1e-5)


def test_an_unknown_loss_kernel_is_a_config_error():
  c = config_lib.load("configs/tiny.py", [*BASE, "train.loss_kernel=triton"])
  message = "train.loss_kernel='triton' is not one of auto, xla, pallas"
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c, 1)


def test_auto_picks_the_kernel_on_gpus_unless_the_vocabulary_is_split():
  """train.loss_kernel=auto (the default): XLA's loss on CPUs and TPUs (no interpreter), the kernel on GPUs,
  XLA's again on a GPU mesh whose rules shard `act_vocab` (tensor > 1)."""
  c = config_lib.load("configs/tiny.py", BASE)
  assert c.train.loss_kernel == "auto"
  assert not uses_loss_kernel(c, "cpu") and not uses_loss_kernel(c, "tpu")
  assert uses_loss_kernel(c, "gpu")  # one device: no mesh bound
  for sizes, want in ((["sharding.data=8"], True), (["sharding.data=4", "sharding.tensor=2"], False)):
    cm = config_lib.load("configs/tiny.py", [*BASE, *sizes])
    mesh = sharding.make_mesh(cm)
    assert uses_loss_kernel(cm, "gpu", mesh=mesh) is want, sizes
    with sharding.activate(mesh, cm):  # the training step's call: the current mesh
      assert uses_loss_kernel(cm, "gpu") is want, sizes
  for choice, want in (("xla", False), ("pallas", True)):
    cc = config_lib.load("configs/tiny.py", [*BASE, f"train.loss_kernel={choice}"])
    assert uses_loss_kernel(cc, "gpu") is want and uses_loss_kernel(cc, "cpu") is want


def test_a_config_json_from_before_the_key_reads_as_xla(tmp_path):
  """A config.json written before train.loss_kernel existed reads as `xla` (what that run trained with),
  not as the new default `auto`; resuming it with today's defaults lists the key as changed."""
  c = config_lib.load("configs/tiny.py", BASE)
  raw = config_lib.to_dict(c)
  del raw["train"]["loss_kernel"]
  (tmp_path / "config.json").write_text(json.dumps(raw))
  saved = config_lib.from_json(str(tmp_path / "config.json"))
  assert saved.train.loss_kernel == "xla"
  assert run_dir.changed_keys(saved, c) == ["train.loss_kernel"]

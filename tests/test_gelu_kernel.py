"""model.gelu_kernel (llm_jax/model/gelu_kernel.py): the down projection fed the pre-activation, whose
backward pass computes (dY @ W^T) * gelu'(h) in one Mosaic GPU kernel. The kernel itself needs a Hopper GPU
(bench/dgelu_probe.py checks its numbers there); on CPU these tests check everything around it: the custom
gradient, the per-device shard_map on a (data, fsdp, tensor) mesh with the kernel's place taken by XLA's
function, the shape fallback, and how the key resolves."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_step import BASE, run_steps

from llm_jax import config as config_lib
from llm_jax.model import config as model_config
from llm_jax.model import gelu_kernel
from llm_jax.model.config import ModelConfig
from llm_jax.train import run_dir
from llm_jax.train import setup as setup_lib


def _reference(h, w, ct):
  return jnp.sum((jax.nn.gelu(h, approximate=True) @ w) * ct)


@pytest.mark.parametrize("kernel", [False, True])
def test_gelu_dot_and_its_gradients_equal_autodiff(monkeypatch, kernel):
  """float32 (the kernel's dtype test fails, so `kernel` takes XLA's path too): value, dh and dW."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  h, w = jax.random.normal(k1, (2, 8, 64)), 0.1 * jax.random.normal(k2, (64, 16))
  ct = jax.random.normal(k3, (2, 8, 16))
  got = jax.value_and_grad(lambda h, w: jnp.sum(gelu_kernel.gelu_dot(h, w, kernel) * ct), (0, 1))(h, w)
  want = jax.value_and_grad(_reference, (0, 1))(h, w, ct)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, r in zip(got[1], want[1], strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def _xla_in_the_kernels_place(monkeypatch, tiles):
  """The kernel replaced by XLA's function (recording the shapes it is given), model.gelu_kernel=mosaic
  allowed on this CPU, `tiles` as the kernel's."""
  calls = []

  def recorder(dy_MD, w_FD, h_MF, tiles=None):
    calls.append((dy_MD.shape, w_FD.shape, h_MF.shape))
    return gelu_kernel.xla_dgelu_matmul(dy_MD, w_FD, h_MF)

  monkeypatch.setattr(gelu_kernel, "mosaic_dgelu_matmul", recorder)
  monkeypatch.setattr(gelu_kernel, "TILES", tiles)
  monkeypatch.setattr(model_config, "on_hopper", lambda platform=None: True)
  return calls


@pytest.mark.parametrize("remat", ["none", "full"])  # the custom VJP under jax.checkpoint too
def test_training_on_a_mesh_takes_the_kernel_per_device_and_matches_xla(monkeypatch, remat):
  """data x fsdp x tensor = 2 x 2 x 2, bf16: each device's rows (8 sequences of 16 over data x fsdp -> 32)
  and its half of F (128 -> 64) go to the kernel's place; three steps' losses as model.gelu_kernel=xla."""
  mesh = ["sharding.data=2", "sharding.fsdp=2", "sharding.tensor=2", "model.dtype=bfloat16"]
  mesh.append(f"model.remat={remat}")
  ref, _, _ = run_steps([*mesh, "model.gelu_kernel=xla"])
  calls = _xla_in_the_kernels_place(monkeypatch, gelu_kernel.Tiles(m=8, n=16, k=8))
  losses, _, _ = run_steps([*mesh, "model.gelu_kernel=mosaic"])
  assert calls and set(calls) == {((32, 32), (64, 32), (32, 64))}, calls
  np.testing.assert_allclose(losses, ref, rtol=2e-3)


def test_shapes_the_tiles_do_not_divide_take_xlas_path(monkeypatch):
  calls = _xla_in_the_kernels_place(monkeypatch, gelu_kernel.Tiles(m=256))  # 16 rows a device
  ref, _, _ = run_steps(["sharding.data=8", "model.dtype=bfloat16", "model.gelu_kernel=xla"])
  losses, _, _ = run_steps(["sharding.data=8", "model.dtype=bfloat16", "model.gelu_kernel=mosaic"])
  assert calls == []
  np.testing.assert_allclose(losses, ref, rtol=2e-3)


def _resolved(platform, *overrides):
  c = config_lib.load("configs/tiny.py", [*BASE, *overrides])
  config_lib.validate(c, 1)
  return ModelConfig.from_config(c, tokenizer_size=100, platform=platform).gelu_kernel


def test_auto_is_the_kernel_on_hopper_for_a_gelu_mlp_without_fp8(monkeypatch):
  assert _resolved("cpu", "model.gelu_kernel=auto") == "xla"
  monkeypatch.setattr(model_config, "on_hopper", lambda platform=None: platform == "gpu")
  assert _resolved("gpu", "model.gelu_kernel=auto") == "mosaic"
  assert _resolved("gpu", "model.gelu_kernel=auto", "model.fp8=True") == "xla"
  assert _resolved("gpu", "model.gelu_kernel=auto", "model.activation=swiglu") == "xla"
  assert _resolved("gpu", "model.gelu_kernel=xla") == "xla"
  assert not gelu_kernel.on_hopper("cpu")


def test_the_presets_train_with_the_kernel_on_hopper_and_xla_elsewhere(monkeypatch):
  # the default is `auto` since "Round seven" (exact tanh kept the loss inside the seed spread)
  assert _resolved("cpu") == "xla"
  monkeypatch.setattr(model_config, "on_hopper", lambda platform=None: platform == "gpu")
  assert _resolved("gpu") == "mosaic"
  model_config.check_gelu_kernel(config_lib.load("configs/tiny.py", BASE).model, "cpu")  # no refusal


def test_an_unknown_gelu_kernel_is_a_config_error_naming_the_key():
  with pytest.raises(
    config_lib.ConfigError, match="model.gelu_kernel='cuda' is not one of auto, xla, mosaic"
  ):
    _resolved("cpu", "model.gelu_kernel=cuda")


def test_a_config_json_from_before_the_key_reads_as_xla(tmp_path):
  raw = config_lib.to_dict(config_lib.load("configs/tiny.py", BASE))
  del raw["model"]["gelu_kernel"]
  (tmp_path / "config.json").write_text(json.dumps(raw))
  assert config_lib.from_json(str(tmp_path / "config.json")).model.gelu_kernel == "xla"


def test_tile_settings_parse_as_the_probe_writes_them():
  t = gelu_kernel.Tiles.parse("128x64x64x4x8xnxe")
  assert (t.m, t.n, t.k, t.steps, t.width, t.minor, t.approx_math) == (128, 64, 64, 4, 8, 1, False)
  assert gelu_kernel.Tiles.parse("128x128x64x3x8xmxa").approx_math
  assert gelu_kernel.Tiles.parse("128x128x64x3") == gelu_kernel.TILES  # the defaults: bands of 16 along M
  assert not gelu_kernel.TILES.approx_math  # exact tanh: the approximate one moved the loss ("Round seven")
  assert gelu_kernel.fits(61_440, 768, 3_072, jnp.bfloat16)  # gpt_small's pass of 60 x 1,024
  assert not gelu_kernel.fits(61_440, 768, 3_072, jnp.float32)
  assert not gelu_kernel.fits(100, 768, 3_072, jnp.bfloat16)


def test_a_run_trained_with_the_kernel_reads_back_anywhere(tmp_path):
  """model.gelu_kernel only changes training's backward pass: a run directory whose config.json says
  `mosaic` must resume (check_resume rebuilds the saved model config for platform="cpu") and load for
  decoding or evaluation on a machine without Hopper, where it resolves to XLA's path."""
  c = config_lib.load("configs/tiny.py", [*BASE, "model.gelu_kernel=mosaic", "model.vocab_size=128"])
  config_lib.save_json(c, str(tmp_path / "config.json"))  # as train/setup.build writes it: vocab resolved
  saved = config_lib.from_json(str(tmp_path / "config.json"))
  assert ModelConfig.from_config(saved, tokenizer_size=100, platform="cpu").gelu_kernel == "xla"
  mine = ModelConfig.from_config(c, tokenizer_size=100, platform="cpu")
  run_dir.check_resume(str(tmp_path), c, mine, "sha")  # raises on any shape difference


def test_training_that_asks_for_the_kernel_where_it_cannot_run_is_refused():
  """train/setup.build runs check_gelu_kernel before anything compiles."""
  c = config_lib.load("configs/tiny.py", [*BASE, "model.gelu_kernel=mosaic"])
  with pytest.raises(
    config_lib.ConfigError, match="model.gelu_kernel=mosaic needs a Hopper GPU .this is cpu"
  ):
    model_config.check_gelu_kernel(c.model, "cpu")
  with pytest.raises(
    config_lib.ConfigError, match="model.gelu_kernel=mosaic needs a Hopper GPU .this is cpu"
  ):
    setup_lib.build(c)
  model_config.check_gelu_kernel(config_lib.load("configs/tiny.py", BASE).model, "cpu")  # xla: fine

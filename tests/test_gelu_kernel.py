"""model.gelu_kernel (llm_jax/model/gelu_kernel.py): the down projection fed the pre-activation, whose
backward pass computes (dY @ W^T) * gelu'(h) in one Mosaic GPU kernel. Its speed needs a Hopper GPU
(bench/dgelu_probe.py); on CPU these tests run the kernel in Pallas's Mosaic GPU interpreter and lower it
for CUDA, and check everything around it: the custom gradient, the per-device shard_map on a (data, fsdp,
tensor) mesh with the kernel's place taken by XLA's function, the shape fallback, how the key resolves."""

import dataclasses
import functools
import json
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import params as mgpu_interpret  # not public in jax yet
from test_step import BASE, build, run_steps

from llm_jax import config as config_lib
from llm_jax import sharding
from llm_jax.model import activations, gelu_kernel
from llm_jax.model import config as model_config
from llm_jax.model.config import ModelConfig
from llm_jax.train import run_dir
from llm_jax.train import setup as setup_lib
from llm_jax.train import step as step_lib


def _reference(h, w, ct):
  return jnp.sum((jax.nn.gelu(h, approximate=True) @ w) * ct)


@pytest.mark.parametrize("kernel", [False, True])
def test_gelu_dot_and_its_gradients_equal_autodiff(kernel):
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
  """data x fsdp x tensor = 2 x 2 x 2, bf16, with biases: each device's rows (8 sequences of 16 over data x
  fsdp -> 32) and its half of F (128 -> 64) go to the kernel's place; three steps' losses and the MLP's
  gradients (the up bias's among them) as model.gelu_kernel=xla."""
  mesh = ["sharding.data=2", "sharding.fsdp=2", "sharding.tensor=2", "model.dtype=bfloat16"]
  mesh += [f"model.remat={remat}", "model.use_bias=True"]
  ref, _, _ = run_steps([*mesh, "model.gelu_kernel=xla"])
  ref_grads = _mlp_grads([*mesh, "model.gelu_kernel=xla"])
  calls = _xla_in_the_kernels_place(monkeypatch, gelu_kernel.Tiles(m=8, n=16, k=8))
  losses, _, _ = run_steps([*mesh, "model.gelu_kernel=mosaic"])
  assert calls and set(calls) == {((32, 32), (64, 32), (32, 64))}, calls
  np.testing.assert_allclose(losses, ref, rtol=2e-3)
  grads = _mlp_grads([*mesh, "model.gelu_kernel=mosaic"])  # Adam's steps hide a gradient's scale
  assert grads.keys() == ref_grads.keys() and any("up/bias" in k for k in grads), sorted(grads)
  for k, g in grads.items():
    scale = np.abs(ref_grads[k]).max()
    np.testing.assert_allclose(g, ref_grads[k], rtol=0.02, atol=0.02 * scale, err_msg=k)


def _mlp_grads(overrides):
  """The MLP's parameter gradients of one batch on the overrides' mesh, as {path: float32 array}."""
  c, mesh, model, _, state, _, batch = build(overrides)
  fn = jax.jit(functools.partial(step_lib.loss_and_grads, model=model, config=c))
  with sharding.activate(mesh, c):
    _, grads = fn(state.params, batch, jax.random.key(0))
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  named = {"/".join(str(getattr(p, "key", p)) for p in path): leaf for path, leaf in flat}
  return {k: np.asarray(v, np.float32) for k, v in named.items() if "/mlp/" in k}


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
  assert (t.m, t.n, t.k, t.steps, t.width, t.minor, t.tanh) == (128, 64, 64, 4, 8, 1, "e")
  assert gelu_kernel.Tiles.parse("128x128x64x3") == gelu_kernel.Tiles()
  with pytest.raises(ValueError, match="TANH must be one of"):
    gelu_kernel.Tiles.parse("128x128x64x3x16xmxd")
  with pytest.raises(ValueError, match=r"expected MxNxKxSTEPS\[xWIDTH"):
    gelu_kernel.Tiles.parse("128x128x64x3x16xmxsxp")
  assert [gelu_kernel.Tiles.parse(f"128x128x64x3x8xmx{c}").approx_math for c in "eapqrs"] == [
    0,
    1,
    1,
    0,
    1,
    1,
  ]
  with pytest.raises(ValueError, match="TANH must be one of e, a, p, q, r, s"):
    gelu_kernel.Tiles.parse("128x128x64x3x8xmxz")
  assert gelu_kernel.Tiles.parse("128x128x64x3") == gelu_kernel.TILES  # the defaults: bands of 16 along M
  assert gelu_kernel.TILES.tanh != "a"  # not tanh.approx: it moved the loss ("Round seven")
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


def _slope_float64(x):
  """gelu'(x) in float64 as s (1 + 2x (1 - s) u'), s = sigmoid(2u): stable in float64 too (the tanh form
  loses the tail below 1e-14)."""
  x, c = np.asarray(x, np.float64), np.sqrt(2 / np.pi)
  with np.errstate(over="ignore"):
    s = 1 / (1 + np.exp(-2 * c * (x + 0.044715 * x**3)))
  return s * (1 + 2 * x * (1 - s) * c * (1 + 3 * 0.044715 * x * x))


def test_the_epilogues_fast_slopes_are_float32_accurate():
  """Tiles.tanh "p", "q" and "r" compute gelu'(h) with activations.tanh_by_exp2 instead of tanh: it must
  agree with tanh to float32's rounding everywhere (saturating at both ends, no NaN where 2^x overflows),
  and the slope built on it must be as close to float64's as the one built on the float32 tanh (both lose
  relative accuracy where gelu' is tiny, for h below about -3: the formula's cancellation, not the tanh).
  "s" (activations.gelu_tanh_slope_by_sigmoid) keeps it there as well, and never gives NaN."""
  u = np.concatenate([np.linspace(-40, 40, 400_001), [-1e30, 1e30, 0.0, 1e-8, -1e-8]]).astype(np.float32)
  for rsqrt_squared, bound in ((False, 3e-7), (True, 5e-7)):  # rsqrt, then a square: two more roundings
    got = np.asarray(activations.tanh_by_exp2(jnp.asarray(u), rsqrt_squared), np.float64)
    assert np.max(np.abs(got - np.tanh(u.astype(np.float64)))) < bound
  x = np.random.default_rng(0).normal(0, 3, 200_000).astype(np.float32)
  truth = _slope_float64(x)
  slope = {k: np.asarray(gelu_kernel.Tiles(tanh=k).slope(jnp.asarray(x)), np.float64) for k in "eqrs"}
  err = {k: np.abs(v - truth) for k, v in slope.items()}
  for k in "qrs":
    assert err[k].max() < 2 * err["e"].max(), k  # all ~4e-6
    assert err[k].mean() < 1.5 * err["e"].mean(), k
  tiny = (x < -3) & (np.abs(truth) > 1e-30)  # gelu' < 1e-3: the tanh forms cancel there, the sigmoid form not
  assert (err["s"][tiny] / np.abs(truth[tiny])).max() < 0.01 < (err["e"][tiny] / np.abs(truth[tiny])).max()
  extremes = gelu_kernel.Tiles(tanh="s").slope(jnp.asarray([-1e4, -100.0, 100.0, 1e4], jnp.float32))
  np.testing.assert_array_equal(extremes, [0, 0, 1, 1])  # 2^x overflowing or underflowing: no NaN


@pytest.mark.parametrize("tanh", ["s", "r", "e"])
def test_the_mosaic_kernel_lowers_for_cuda_on_this_cpu(monkeypatch, tanh):
  """The kernel cannot run without a Hopper GPU, but Pallas lowers it for CUDA here, through Mosaic GPU's
  layout inference down to NVVM and its shared-memory check (a Hopper's 227 KiB): the tiles, the pipeline,
  the epilogue's fast instructions, each a way the kernel could fail on a GPU after a change. Two SMs for
  four tiles: each block walks two."""
  monkeypatch.setattr(gelu_kernel, "_num_sms", lambda: 2)
  t = dataclasses.replace(gelu_kernel.TILES, tanh=tanh)
  m, d, f = 2 * t.m, t.steps * t.k, 4 * t.n

  def lowered(tiles, d=d):
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((m, d), (f, d), (m, f))]
    fn = functools.partial(gelu_kernel.mosaic_dgelu_matmul, tiles=tiles)
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

  text = lowered(t)
  assert "mosaic_gpu" in text and "wgmma" in text and "-> tensor<256x512xbf16>" in text
  assert ("ex2.approx" in text) == ("rsqrt.approx" in text) == (tanh != "e")  # "r" and "s": fast math
  with pytest.raises(ValueError, match="exceeds available shared memory"):
    lowered(dataclasses.replace(t, steps=t.steps + 1), d=12 * t.k)


def _interpreted(fn, seconds=180):
  """fn() under the Mosaic GPU interpreter, on a thread of its own: a barrier that is never released
  (a schedule's mistake) fails the test after `seconds` instead of hanging the suite."""
  out = {}

  def run():
    try:
      with mgpu_interpret.force_gpu_interpret_mode(mgpu_interpret.InterpretGPUParams()):
        out["value"] = fn()
    except Exception as e:  # noqa: BLE001 -- re-raised on the test's thread
      out["error"] = e

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), f"the kernel did not finish in {seconds} s in the interpreter (deadlock?)"
  if "error" in out:
    raise out["error"]
  return out["value"]


@pytest.mark.parametrize(
  ("spelling", "sms"),
  [
    ("128x128x64x3x16xmxs", 2),
    ("128x128x64x3x16xnxs", 1),
    ("128x128x64x3x16xmxs", 13),
  ],
)
def test_the_mosaic_kernel_computes_dh_in_pallas_gpu_interpreter(monkeypatch, spelling, sms):
  """The kernel itself, run on this CPU by Pallas's Mosaic GPU interpreter (threads, shared memory, TMA
  copies, barriers and wgmma simulated): 3 x 2 output blocks of m x 2n
  walked by `sms` persistent blocks (13: more blocks than tiles, some walk none), both tile walks, 5 K
  steps through 3 slots
  (reused, a partial last round), every h piece and tile placement checked against g in float32 times
  gelu'(h) in float64, rounded to bf16. The interpreter also refuses a barrier whose phases a thread left
  unobserved. What it does not model: layouts and register fragments (the lowering test's part) and
  asynchronous hazards (its TMA copies complete at once); the GPU's numbers stay bench/dgelu_probe.py's."""
  monkeypatch.setattr(gelu_kernel, "_num_sms", lambda: sms)
  t = gelu_kernel.Tiles.parse(spelling)
  m, d, f = 3 * t.m, 5 * t.k, 2 * 2 * t.n
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  dy = jax.random.normal(k1, (m, d), jnp.float32).astype(jnp.bfloat16)
  w = (0.1 * jax.random.normal(k2, (f, d), jnp.float32)).astype(jnp.bfloat16)
  h = (2 * jax.random.normal(k3, (m, f), jnp.float32)).astype(jnp.bfloat16)
  got = _interpreted(lambda: np.asarray(gelu_kernel.mosaic_dgelu_matmul(dy, w, h, t).astype(jnp.float32)))
  want = (np.asarray(dy, np.float64) @ np.asarray(w, np.float64).T) * _slope_float64(h.astype(jnp.float32))
  # bf16's rounding (2^-9 relative) and float32 accumulation (near zero crossings of g)
  np.testing.assert_allclose(got, want, rtol=2**-8, atol=1e-5 * np.abs(want).max())

"""The pure train step: learning, mesh equivalence, partition specs, accumulation, non-finite guard."""

import functools

import jax
import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax import sharding
from llm_jax.model import Decoder, ModelConfig
from llm_jax.train import optimizer as optimizer_lib
from llm_jax.train import run_dir
from llm_jax.train import state as state_lib
from llm_jax.train import step as step_lib

BASE = [
  "model.num_layers=2",
  "model.d_model=32",
  "model.num_heads=4",
  "model.max_seq_len=16",
  "train.seq_len=16",
  "train.global_batch_size=8",
  "train.warmup_steps=0",
  "train.learning_rate=0.01",
]
TOKENS = np.random.default_rng(0).integers(0, 100, (8, 17)).astype(np.int32)


def build(overrides, tokens=TOKENS):
  """The tiny config with `overrides`, its mesh, model, optimizer, initial state and shardings, and one
  global batch of `tokens`."""
  c = config_lib.load("configs/tiny.py", BASE + list(overrides))
  mesh = sharding.make_mesh(c)
  config_lib.validate(c, len(jax.devices()))
  model = Decoder(ModelConfig.from_config(c, tokenizer_size=100, platform="cpu"))
  opt = optimizer_lib.make_optimizer(c)
  state, shardings = state_lib.create_state(model, opt, mesh, c, seed=0)
  batch = sharding.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, mesh)
  return c, mesh, model, opt, state, shardings, batch


def run_steps(overrides, n=3, jit=True, tokens=TOKENS):
  c, mesh, model, opt, state, shardings, batch = build(overrides, tokens)
  fn = functools.partial(step_lib.train_step, model=model, optimizer=opt, config=c)
  if jit:
    fn = jax.jit(
      fn,
      in_shardings=(shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, None),
      donate_argnums=0,
    )
  losses = []
  with sharding.activate(mesh, c):
    for _ in range(n):
      state, metrics = fn(state, batch)
      losses.append(float(metrics["loss"]))
  return losses, state, shardings


@pytest.fixture(scope="module")
def reference():
  return run_steps(["sharding.data=8"])


def test_steps_lower_the_loss(reference):
  losses = reference[0]
  assert losses[2] < losses[1] < losses[0]


def test_without_jit_matches_jit(reference):
  losses, _, _ = run_steps(["sharding.data=8"], n=2, jit=False)
  np.testing.assert_allclose(losses, reference[0][:2], rtol=1e-5)


@pytest.mark.parametrize("mesh", [(2, 2, 2), (1, 4, 2), (1, 1, 8)])
def test_same_loss_on_every_mesh(reference, mesh):
  over = [f"sharding.data={mesh[0]}", f"sharding.fsdp={mesh[1]}", f"sharding.tensor={mesh[2]}"]
  if mesh[2] == 8:
    over.append("model.num_heads=8")
    ref, _, _ = run_steps(["sharding.data=8", "model.num_heads=8"])
  else:
    ref = reference[0]
  losses, state, _ = run_steps(over)
  np.testing.assert_allclose(losses, ref, atol=1e-5)


def test_accumulation_equals_full_batch(reference):
  losses, _, _ = run_steps(["sharding.data=2", "sharding.tensor=4", "train.microbatches=4"])
  np.testing.assert_allclose(losses, reference[0], atol=1e-5)


def test_partition_specs_golden():
  _, _, shardings = run_steps(["sharding.data=2", "sharding.fsdp=2", "sharding.tensor=2"], n=0)
  specs = {
    "/".join(str(getattr(k, "key", k)) for k in path): str(s.spec)
    for path, s in jax.tree_util.tree_flatten_with_path(
      shardings.params, is_leaf=lambda x: hasattr(x, "spec")
    )[0]
  }
  golden = {
    "embedding": "P('tensor', 'fsdp')",
    "pos_embedding": "P(None, 'fsdp')",
    "blocks/attn/query/kernel": "P(None, 'fsdp', 'tensor')",
    "blocks/attn/key/kernel": "P(None, 'fsdp', 'tensor')",
    "blocks/attn/value/kernel": "P(None, 'fsdp', 'tensor')",
    "blocks/attn/out/kernel": "P(None, 'tensor', None, 'fsdp')",
    "blocks/attn/query/bias": "P(None, 'tensor')",
    "blocks/mlp/up/kernel": "P(None, 'fsdp', 'tensor')",
    "blocks/mlp/down/kernel": "P(None, 'tensor', 'fsdp')",
    "blocks/mlp/down/bias": "P(None, 'fsdp')",
    "blocks/norm_attn/LayerNorm_0/scale": "P()",
    "final_norm/LayerNorm_0/scale": "P()",
  }
  for name, spec in golden.items():
    assert specs[name] == spec, (name, specs[name])
  # Adam moments are sharded like their parameters (FSDP shards the optimizer state too).
  mu = shardings.opt_state[1][0].mu if isinstance(shardings.opt_state, tuple) else None
  assert mu is not None and str(mu["embedding"].spec) == golden["embedding"]


def test_non_finite_step_leaves_params_unchanged():
  bad = TOKENS.copy()
  c = config_lib.load("configs/tiny.py", BASE)
  model = Decoder(ModelConfig.from_config(c, tokenizer_size=100, platform="cpu"))
  opt = optimizer_lib.make_optimizer(c)
  mesh = sharding.make_mesh(c)
  state, _ = state_lib.create_state(model, opt, mesh, c, seed=0)
  batch = {"inputs": bad[:, :-1], "targets": bad[:, 1:], "weights": np.full((8, 16), np.nan, np.float32)}
  new, metrics = jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=opt, config=c))(
    state, batch
  )
  assert not bool(metrics["finite"]) and int(new.skipped) == 1 and int(new.step) == 1
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params), strict=True):
    np.testing.assert_array_equal(a, b)


def _compiled_temp_bytes(overrides, rows_per_device, devices):
  """Temp memory of the compiled train step (XLA's own accounting, per device)."""
  c = config_lib.load(
    "configs/tiny.py",
    BASE + ["model.vocab_size=512", "model.max_seq_len=64", "train.seq_len=64"] + list(overrides),
  )
  with c.unlocked():
    c.train.global_batch_size = rows_per_device * devices
  mesh = sharding.make_mesh(c, jax.devices()[:devices])
  model = Decoder(ModelConfig.from_config(c, platform="cpu"))
  opt = optimizer_lib.make_optimizer(c)
  state, shardings = state_lib.create_state(model, opt, mesh, c, seed=0)
  tokens = np.zeros((c.train.global_batch_size, 65), np.int32)
  batch = sharding.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, mesh)
  fn = jax.jit(
    functools.partial(step_lib.train_step, model=model, optimizer=opt, config=c),
    in_shardings=(shardings, sharding.batch_sharding(mesh)),
    out_shardings=(shardings, None),
  )
  with sharding.activate(mesh, c):
    return fn.lower(state, batch).compile().memory_analysis().temp_size_in_bytes


def test_fsdp_activation_memory_does_not_grow_with_devices():
  """Activations stay sharded over the batch under FSDP: each layer gathers its weights instead of
  XLA regathering the whole batch on every device (which made memory grow with the FSDP axis)."""
  one = _compiled_temp_bytes(["sharding.data=1"], 8, 1)
  fsdp4 = _compiled_temp_bytes(["sharding.data=1", "sharding.fsdp=4"], 8, 4)
  assert fsdp4 < 1.3 * one, (one, fsdp4)


@pytest.mark.parametrize(
  "override, key",
  [
    ("train.learning_rate=-0.001", "train.learning_rate"),
    ("train.learning_rate=0.0", "train.learning_rate"),
    ("train.weight_decay=-0.1", "train.weight_decay"),
    ("train.warmup_steps=700", "train.warmup_steps"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio"),
    ("train.min_lr_ratio=-0.1", "train.min_lr_ratio"),
    ("train.b2=1.0", "train.b2"),
    ("train.grad_clip=-1.0", "train.grad_clip"),
    ("train.decay_steps=20", "train.decay_steps"),
  ],
)
def test_settings_that_cannot_work_are_config_errors_naming_the_key(override, key):
  c = config_lib.load("configs/tiny.py", [override])  # tiny: 600 steps, 50 of warm-up
  with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
    config_lib.validate(c)


def test_an_older_config_json_is_migrated_in_one_place(tmp_path):
  """A config.json written before model.causal, rope scaling and keep_best existed reads with the values
  that reproduce the older code, and rebuilds the same ModelConfig; one holding a key taken out since
  (model.norm_vjp) reads without it, so a resume reports no changed key."""
  import json

  from llm_jax.model import ModelConfig

  new = config_lib.load("configs/tiny.py")
  raw = json.loads(new.to_json_best_effort())
  for section, key in (("model", "causal"), ("model", "rope_scaling"), ("train", "keep_best")):
    del raw[section][key]
  raw["model"]["vocab_size"] = 2048
  raw["model"]["norm_vjp"] = True
  path = tmp_path / "config.json"
  path.write_text(json.dumps(raw))
  old = config_lib.from_json(str(path))
  assert old.model.causal is True and old.model.rope_scaling == "none" and old.train.keep_best is True
  with new.unlocked():
    new.model.vocab_size = 2048
  assert ModelConfig.from_config(old, platform="cpu") == ModelConfig.from_config(new, platform="cpu")
  assert "norm_vjp" not in old.model and run_dir.changed_keys(old, new) == []

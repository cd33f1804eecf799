"""Fine-tuning: init_from (workdir and package), freezing, LoRA, and their error messages."""

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax import sharding
from llm_jax.artifacts import open_model
from llm_jax.artifacts import package as package_lib
from llm_jax.artifacts.export import export
from llm_jax.data.tokenizer import train_tokenizer
from llm_jax.finetune import freeze, init_from, lora
from llm_jax.model import Decoder, ModelConfig
from llm_jax.model.params import abstract_params
from llm_jax.train import checkpoint
from llm_jax.train import optimizer as optimizer_lib
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
  "model.vocab_multiple=8",
  "sharding.data=1",
]
TEXT = "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog. 0123456789\n"


def make_config(*overrides):
  return config_lib.load("configs/tiny.py", BASE + list(overrides))


def make_mesh(c):
  return sharding.make_mesh(c, jax.devices()[:1])  # one device: fast compiles


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A tiny run directory: config.json, tokenizer.model, a checkpoint at step 3."""
  root = tmp_path_factory.mktemp("ft")
  workdir = str(root / "source")
  os.makedirs(workdir)
  tok = train_tokenizer(
    [TEXT * 20], os.path.join(workdir, "tokenizer.model"), vocab_size=300, model_type="char"
  )
  c = make_config()
  model_cfg = ModelConfig.from_config(c, tokenizer_size=tok.vocab_size, platform="cpu")
  config_lib.set_key(c, "model.vocab_size", model_cfg.vocab_size)
  config_lib.save_json(c, os.path.join(workdir, "config.json"))
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, tok.vocab_size, (8, 17)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  mesh = make_mesh(c)
  model = Decoder(model_cfg)
  fresh = state_lib.create_state(model, optimizer_lib.make_optimizer(c), mesh, c, seed=7)
  # The source's weights: the fresh ones moved at random (training itself is tested elsewhere).
  state = fresh[0].replace(
    step=fresh[0].step + 3,
    params=jax.tree.map(
      lambda x: jax.device_put(np.asarray(x) + rng.normal(0, 0.02, x.shape).astype(np.float32), x.sharding),
      fresh[0].params,
    ),
  )
  ckpts = checkpoint.Checkpoints(workdir, async_save=False)
  ckpts.save(3, state, {"step": 3})
  ckpts.close()
  eval_tokens = rng.integers(4, tok.vocab_size, (8, 17)).astype(np.int32)
  eval_batch = {"inputs": eval_tokens[:, :-1], "targets": eval_tokens[:, 1:]}
  return dict(
    root=root,
    workdir=workdir,
    config=c,
    model=model,
    mesh=mesh,
    batch=batch,
    eval_batch=eval_batch,
    params=jax.device_get(state.params),
    tok=tok,
    fresh=fresh,
    loss=eval_loss(state.params, eval_batch, model),
  )


def run_steps(state, shardings, batch, c, model, n, optimizer=None):
  mesh = make_mesh(c)
  opt = optimizer or optimizer_lib.make_optimizer(c)
  fn = jax.jit(
    functools.partial(step_lib.train_step, model=model, optimizer=opt, config=c),
    in_shardings=(shardings, sharding.batch_sharding(mesh)),
    out_shardings=(shardings, None),
  )
  with sharding.activate(mesh, c):
    for _ in range(n):
      state, metrics = fn(state, sharding.global_batch(batch, mesh))
      assert bool(metrics["finite"])
  return state


@functools.cache
def _eval_fn(model):
  return jax.jit(functools.partial(step_lib.eval_step, model=model, num_domains=1))


def eval_loss(params, batch, model):
  out = _eval_fn(model)(params, batch)
  return float(out["nll_sum"] / out["tokens"])


# ------------------------------------------------------------------ init_from


def test_init_from_workdir_reproduces_eval_loss(source):
  c = make_config(f"init_from={source['workdir']}", "train.seed=7")
  src = init_from.load_source(c.init_from)
  init_from.check_tokenizer(c, src, source["tok"].sha256)
  init_from.check_model(c, src, source["tok"].vocab_size)
  model = source["model"]
  fresh, shardings = source["fresh"]
  assert eval_loss(fresh.params, source["eval_batch"], model) != source["loss"]
  state = init_from.into_state(fresh, shardings, src)
  assert src.step == 3 and int(state.step) == 0  # weights from step 3, a fresh step counter
  assert eval_loss(state.params, source["eval_batch"], model) == source["loss"]
  mu = state.opt_state[1][0].mu  # AdamW moments start at zero (fresh optimizer state)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(mu))


def test_init_from_package_reproduces_eval_loss(source):
  pkg = str(source["root"] / "pkg")
  cfg = ModelConfig.from_config(source["config"], tokenizer_size=source["tok"].vocab_size, platform="cpu")
  package_lib.write_package(pkg, source["params"], cfg, os.path.join(source["workdir"], "tokenizer.model"))
  src = init_from.load_source(pkg)
  assert src.kind == "package"
  init_from.check_model(source["config"], src, source["tok"].vocab_size)
  fresh, shardings = source["fresh"]
  state = init_from.into_state(fresh, shardings, src)
  assert eval_loss(state.params, source["eval_batch"], source["model"]) == source["loss"]


def test_init_from_errors_name_the_problem(source, tmp_path):
  with pytest.raises(init_from.InitFromError, match="does not exist"):
    init_from.load_source(str(tmp_path / "nope"))
  empty = tmp_path / "empty_run"
  empty.mkdir()
  shutil.copy(os.path.join(source["workdir"], "config.json"), empty / "config.json")
  shutil.copy(os.path.join(source["workdir"], "tokenizer.model"), empty / "tokenizer.model")
  (empty / "checkpoints").mkdir()
  for fn in (init_from.load_source, init_from.describe):
    with pytest.raises(init_from.InitFromError, match="empty_run.*no complete checkpoint"):
      fn(str(empty))
  with pytest.raises(
    init_from.InitFromError, match=r"finetune.init_step=9\): no checkpoint at step 9 .*have \[3\]"
  ):
    init_from.describe(source["workdir"], step=9)
  (tmp_path / "plain").mkdir()
  with pytest.raises(init_from.InitFromError, match="neither a training run directory"):
    init_from.load_source(str(tmp_path / "plain"))
  src = init_from.load_source(source["workdir"])
  wide = make_config("model.d_model=64")
  with pytest.raises(init_from.InitFromError, match=r"model.d_model: source 32, this run 64"):
    init_from.check_model(wide, src, source["tok"].vocab_size)
  with pytest.raises(init_from.InitFromError, match=f"{src.tokenizer_sha256}.*{'ab' * 32}"):
    init_from.check_tokenizer(source["config"], src, "ab" * 32)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), source["params"])
  abstract["embedding"] = jax.ShapeDtypeStruct((8, 32), jnp.float32)
  with pytest.raises(init_from.InitFromError, match="embedding: checkpoint"):
    init_from.fit(src.params, abstract, src.path)


# ------------------------------------------------------------------ freezing


def test_frozen_parameters_are_bit_identical(source):
  c = make_config(
    "finetune.freeze_embeddings=True",
    "finetune.freeze_blocks=1",
    "finetune.freeze_patterns=final_norm",
    "train.weight_decay=0.5",
    "train.decay_norms_biases_embeddings=True",
  )
  model = source["model"]
  opt = freeze.wrap(optimizer_lib.make_optimizer(c), c)  # the fine-tuning extension's wrapper
  _, shardings = source["fresh"]
  params = init_from.place(source["params"], shardings.params)
  state = state_lib.TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params), skipped=jnp.zeros((), jnp.int32)
  )
  shardings = jax.tree.map(lambda x: x.sharding, state)
  before = jax.device_get(state.params)
  after = jax.device_get(run_steps(state, shardings, source["batch"], c, model, 3, optimizer=opt).params)
  same = lambda a, b: np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
  for name in ("embedding", "pos_embedding"):
    assert same(before[name], after[name]), name
  for leaf in jax.tree.leaves(jax.tree.map(same, before["final_norm"], after["final_norm"])):
    assert leaf
  for path, b in jax.tree_util.tree_flatten_with_path(before["blocks"])[0]:
    a = after["blocks"]
    for k in path:
      a = a[k.key]
    assert same(b[0], a[0]), f"layer 0 of {path} moved"
    if "kernel" in str(path):
      assert not np.array_equal(b[1], a[1]), f"layer 1 of {path} did not train"
  counts = freeze.summary(before, c)
  assert counts["frozen"] > 0 and counts["trainable"] > 0


def test_freeze_errors_name_the_key(source):
  for over, match in (
    ("finetune.freeze_patterns=nothing_like_this", "finetune.freeze_patterns"),
    ("finetune.freeze_blocks=3", "finetune.freeze_blocks=3 exceeds"),
  ):
    c = make_config(over)
    with pytest.raises(config_lib.ConfigError, match=match):
      freeze.leaf_masks(source["params"], freeze.spec_from_config(c))


# ------------------------------------------------------------------ LoRA


@pytest.fixture(scope="module")
def lora_run(source):
  """A LoRA run directory on top of the source: 4 adapter steps, checkpointed adapters-only."""
  c = make_config(
    f"init_from={source['workdir']}",
    "finetune.lora.rank=4",
    "finetune.lora.alpha=8.0",
    "train.learning_rate=0.01",
    f"model.vocab_size={source['config'].model.vocab_size}",
  )
  spec = lora.spec_from_config(c)
  mesh, model = source["mesh"], source["model"]
  base = init_from.place(
    source["params"], sharding.logical_to_sharding(abstract_params(model.cfg)[1], mesh, c)
  )
  opt = optimizer_lib.make_optimizer(c)
  state, shardings = lora.create_state(base, opt, mesh, c)
  initial = jax.device_get(state.params)
  fn = jax.jit(functools.partial(lora.train_step, model=model, optimizer=opt, config=c))
  losses = []
  with sharding.activate(mesh, c):
    for _ in range(4):
      state, metrics = fn(state, sharding.global_batch(source["batch"], mesh), base)
      losses.append(float(metrics["loss"]))
  workdir = str(source["root"] / "lora")
  os.makedirs(workdir)
  shutil.copy(os.path.join(source["workdir"], "tokenizer.model"), workdir)
  config_lib.save_json(c, os.path.join(workdir, "config.json"))
  ckpts = checkpoint.Checkpoints(workdir, async_save=False)
  ckpts.save(4, state, {"step": 4})
  ckpts.close()
  return dict(config=c, spec=spec, base=base, initial=initial, state=state, losses=losses, workdir=workdir)


def _logits(model, params, tokens):
  return np.asarray(jax.jit(model.apply)({"params": params}, tokens))


def test_lora_zero_b_gives_base_outputs(source, lora_run):
  tokens = jnp.asarray(source["eval_batch"]["inputs"])
  merged = lora.merge(lora_run["base"], lora_run["initial"], lora_run["spec"])
  np.testing.assert_array_equal(
    _logits(source["model"], merged, tokens), _logits(source["model"], lora_run["base"], tokens)
  )
  names = lora.adapter_names(lora_run["initial"])
  assert "blocks/attn/query/kernel" in names and "blocks/mlp/down/kernel" in names and len(names) == 6
  assert all(
    float(jnp.abs(ab).max()) == 0
    for ab in jax.tree.leaves(jax.tree.map(lambda x: x, lora_run["initial"]))[1::2]
  )  # every B (leaf order a, b) is zero


def test_lora_trains_only_adapters_and_checkpoints_them(source, lora_run):
  assert lora_run["losses"][-1] < lora_run["losses"][0], lora_run["losses"]
  params = lora_run["state"].params
  assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(params)[1::2])  # B moved
  base_now = jax.device_get(lora_run["base"])
  for a, b in zip(jax.tree.leaves(base_now), jax.tree.leaves(source["params"]), strict=True):
    np.testing.assert_array_equal(a, b)
  meta = checkpoint.Checkpoints(lora_run["workdir"], read_only=True).saved_shapes(4)["params"]
  saved = sum(int(np.prod(m.shape)) for m in jax.tree.leaves(meta))
  assert (
    saved
    == lora.count(params)
    < ModelConfig.from_config(
      source["config"], tokenizer_size=source["tok"].vocab_size, platform="cpu"
    ).param_count()
    // 4
  )


def test_lora_merged_export_equals_adapter_inference(source, lora_run):
  tokens = jnp.asarray(source["eval_batch"]["inputs"])
  live = _logits(
    source["model"], lora.merge(lora_run["base"], lora_run["state"].params, lora_run["spec"]), tokens
  )
  assert not np.allclose(live, _logits(source["model"], lora_run["base"], tokens))
  pkg = str(source["root"] / "lora_pkg")
  export(lora_run["workdir"], pkg)
  loaded = open_model(pkg, dtype="float32")
  exported = _logits(Decoder(loaded.model_config), loaded.params, tokens)
  np.testing.assert_allclose(exported, live, rtol=1e-6, atol=1e-6)
  src = init_from.load_source(lora_run["workdir"])  # a LoRA run is a valid init_from source (merged)
  np.testing.assert_allclose(_logits(source["model"], src.params, tokens), live, rtol=1e-6, atol=1e-6)


def test_lora_targets_matching_nothing_fail(source):
  c = make_config("finetune.lora.rank=2", "finetune.lora.targets=attn/nothing,mlp/up/kernel")
  with pytest.raises(config_lib.ConfigError, match=r"finetune.lora.targets \['attn/nothing'\]"):
    lora.find_targets(source["params"], lora.spec_from_config(c))

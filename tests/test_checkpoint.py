"""Checkpoints on their own: cross-mesh restore, opening a run's parameters, retention (keep-last-K, every
M-th, the best), corruption, shape checks."""

import asyncio
import gc
import logging
import os
import shutil
import subprocess
import sys
import threading
import types

import jax
import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax import sharding as sharding_lib
from llm_jax.artifacts import ArtifactError, open_model
from llm_jax.data.tokenizer import train_tokenizer
from llm_jax.model import Decoder, ModelConfig
from llm_jax.model.params import flatten
from llm_jax.train import checkpoint as ckpt_lib
from llm_jax.train import optimizer as opt_lib
from llm_jax.train import state as state_lib

TINY = {
  "model.d_model": 32,
  "model.num_heads": 4,
  "model.num_layers": 1,
  "model.vocab_size": 128,
  "model.max_seq_len": 16,
  "train.seq_len": 16,
  "train.global_batch_size": 8,
}


def _config(**mesh):
  over = dict(TINY)
  over.update({f"sharding.{k}": v for k, v in mesh.items()})
  return config_lib.load("configs/base.py", over)


def _parts(config):
  model = Decoder(ModelConfig.from_config(config))
  return model, opt_lib.make_optimizer(config)


def _target(config):
  model, optimizer = _parts(config)
  mesh = sharding_lib.make_mesh(config)
  abstract, shardings = state_lib.state_shardings(model, optimizer, mesh, config)
  return ckpt_lib.abstract_with_shardings(abstract, shardings), mesh


@pytest.fixture(scope="module")
def saved(tmp_path_factory, devices):
  """A workdir with checkpoints at steps 2 and 4 of a state created on an fsdp=4 mesh."""
  workdir = str(tmp_path_factory.mktemp("ckpt"))
  config = _config(data=2, fsdp=4, tensor=1)
  model, optimizer = _parts(config)
  mesh = sharding_lib.make_mesh(config)
  state, _ = state_lib.create_state(model, optimizer, mesh, config, seed=3)
  assert state.params["embedding"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  config_lib.save_json(config, os.path.join(workdir, "config.json"))
  train_tokenizer(
    ["def f(x):\n    return x + 1\n" * 20],
    os.path.join(workdir, "tokenizer.model"),
    vocab_size=300,
    model_type="char",
  )
  ckpts = ckpt_lib.Checkpoints(workdir, keep=5)
  ckpts.save(2, state, {"step": 2})
  state4 = state.replace(step=state.step + 2)
  ckpts.save(4, state4, {"step": 4})
  ckpts.close()
  host = jax.tree.map(np.asarray, state4)
  return workdir, host


@pytest.mark.parametrize("mesh", [dict(data=1, fsdp=1, tensor=1), dict(data=4, fsdp=1, tensor=2)])
def test_restore_onto_another_mesh(saved, mesh):
  workdir, host = saved
  config = _config(**mesh)
  if mesh["data"] == 1:  # one device: a 1x1x1 mesh over the first device only
    m = sharding_lib.make_mesh(config, jax.devices()[:1])
    model, optimizer = _parts(config)
    abstract, shardings = state_lib.state_shardings(model, optimizer, m, config)
    target = ckpt_lib.abstract_with_shardings(abstract, shardings)
  else:
    target, m = _target(config)
  step, state, data = ckpt_lib.Checkpoints(workdir).restore(target)
  assert step == 4 and data == {"step": 4}
  assert int(state.step) == int(host.step)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(host), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)
  emb = state.params["embedding"]
  assert emb.sharding.mesh.devices.size == m.devices.size
  if mesh["tensor"] == 2:
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor")


def test_open_model_reads_a_runs_parameters(saved):
  workdir, host = saved
  opened = open_model(workdir)
  params, config, step = opened.params, opened.config, opened.step
  assert step == 4 and config.model.d_model == 32
  assert set(params) == set(host.params)
  np.testing.assert_array_equal(np.asarray(params["embedding"]), host.params["embedding"])
  assert params["embedding"].sharding.device_set == {jax.local_devices()[0]}
  mesh = sharding_lib.make_mesh(_config(data=4, fsdp=1, tensor=2))
  opened = open_model(workdir, step=2, mesh=mesh)
  assert opened.step == 2
  assert opened.params["embedding"].sharding.spec == jax.sharding.PartitionSpec("tensor")
  with pytest.raises(ArtifactError, match="step 3"):
    open_model(workdir, step=3)
  with pytest.raises(ArtifactError, match="neither a training run directory"):
    open_model(os.path.dirname(workdir))


@pytest.fixture(scope="module")
def lora_workdir(saved, tmp_path_factory):
  """A LoRA run on top of `saved` (its init_from): adapters with non-zero B checkpointed at step 3."""
  from llm_jax.finetune import lora

  base_dir, host = saved
  workdir = str(tmp_path_factory.mktemp("lora"))
  shutil.copy(os.path.join(base_dir, "tokenizer.model"), workdir)
  config = _config(data=8, fsdp=1, tensor=1)
  with config.unlocked():
    config.init_from = base_dir
    config.finetune.lora.rank = 2
    config.finetune.lora.alpha = 4.0
  spec = lora.spec_from_config(config)
  adapters = lora.init_adapters(host.params, spec, seed=1)
  rng = np.random.default_rng(0)
  adapters = jax.tree_util.tree_map_with_path(
    lambda p, x: x + rng.normal(0, 0.05, x.shape).astype(np.float32) if p[-1].key == "b" else x, adapters
  )
  state = lora.init_state(host.params, opt_lib.make_optimizer(config), config).replace(params=adapters)
  config_lib.save_json(config, os.path.join(workdir, "config.json"))
  ckpts = ckpt_lib.Checkpoints(workdir, async_save=False)
  ckpts.save(3, state, {"step": 3})
  ckpts.close()
  # Adapter inference, as the training loop evaluates a LoRA run: base + merged adapters.
  model = Decoder(ModelConfig.from_config(config))
  tokens = np.random.default_rng(1).integers(4, 128, (2, 16)).astype(np.int32)
  live = np.asarray(model.apply({"params": lora.merge(host.params, adapters, spec)}, tokens))
  base = np.asarray(model.apply({"params": host.params}, tokens))
  return dict(workdir=workdir, model=model, tokens=tokens, live=live, base=base, host=host)


def test_open_model_of_a_lora_run_merges_the_adapters(lora_workdir):
  run = lora_workdir
  assert not np.allclose(run["live"], run["base"])  # the adapters change the outputs
  opened = open_model(run["workdir"])
  params, config, step = opened.params, opened.config, opened.step
  assert step == 3 and config.finetune.lora.rank == 2
  assert jax.tree.structure(params) == jax.tree.structure(run["host"].params)  # full parameters
  np.testing.assert_allclose(
    np.asarray(run["model"].apply({"params": params}, run["tokens"])), run["live"], rtol=1e-6, atol=1e-6
  )
  mesh = sharding_lib.make_mesh(_config(data=4, fsdp=1, tensor=2))
  sharded = open_model(run["workdir"], mesh=mesh).params
  assert sharded["embedding"].sharding.spec == jax.sharding.PartitionSpec("tensor")
  with sharding_lib.activate(mesh, config):
    logits = jax.jit(run["model"].apply)({"params": sharded}, run["tokens"])
  np.testing.assert_allclose(np.asarray(logits), run["live"], rtol=1e-5, atol=1e-5)
  saved = ckpt_lib.Checkpoints(run["workdir"], read_only=True).saved_shapes(3)["params"]
  assert "blocks/attn/query/kernel/a" in flatten(saved)  # the checkpoint holds only adapters
  assert "embedding" not in flatten(saved)


def test_changed_shape_lists_keys(saved):
  workdir, _ = saved
  config = _config(data=8, fsdp=1, tensor=1)
  with config.unlocked():
    config.model.d_model = 64
  target, _ = _target(config)
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ckpt_lib.Checkpoints(workdir).restore(target)
  assert "params/embedding" in str(e.value) and "params/blocks/mlp/up/kernel" in str(e.value)
  assert "(128, 32)" in str(e.value) and "(128, 64)" in str(e.value)


def test_retention_keeps_last_and_every_mth(tmp_path):
  ckpts = ckpt_lib.Checkpoints(str(tmp_path), keep=2, keep_every=4, async_save=False)
  x = {"w": np.zeros(3, np.float32)}
  for s in range(1, 10):
    ckpts.save(s, x, {"step": s})
  ckpts.wait()
  assert ckpts.steps() == [4, 8, 9]
  assert not ckpts.save(9, x, {"step": 9})  # an existing step is never overwritten
  ckpts.close()


def test_an_empty_step_directory_is_not_a_checkpoint(tmp_path):
  """checkpoints/6 left empty (a copy or a sync cut short, a mkdir by hand) is no checkpoint: training and
  every reader agree the latest is 4, and training saves step 6 when it comes."""
  from llm_jax.artifacts import run as run_artifacts

  ckpts = ckpt_lib.Checkpoints(str(tmp_path), keep=5, async_save=False)
  x = {"w": np.zeros(3, np.float32)}
  for s in (2, 4):
    ckpts.save(s, x, {"step": s})
  ckpts.close()
  empty = os.path.join(str(tmp_path), "checkpoints", "6")
  os.makedirs(empty)
  readers = ckpt_lib.Checkpoints(str(tmp_path), read_only=True)
  assert readers.steps() == [2, 4] and readers.latest_step() == 4
  readers.close()
  assert run_artifacts.resolve_step(str(tmp_path), None) == 4
  assert os.path.isdir(empty)  # readers change nothing
  ckpts = ckpt_lib.Checkpoints(str(tmp_path), keep=5, async_save=False)
  assert ckpts.steps() == [2, 4] and ckpts.latest_step() == 4
  assert ckpts.save(6, x, {"step": 6})
  ckpts.wait()
  assert ckpts.steps() == [2, 4, 6]
  ckpts.close()


def _corrupt(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for f in files:
      if f not in ("commit_success.txt",):
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"\x00garbage")


def test_corrupt_latest_names_step_and_falls_back(tmp_path, devices):
  config = _config(data=8, fsdp=1, tensor=1)
  model, optimizer = _parts(config)
  mesh = sharding_lib.make_mesh(config)
  state, shardings = state_lib.create_state(model, optimizer, mesh, config, seed=0)
  ckpts = ckpt_lib.Checkpoints(str(tmp_path))
  ckpts.save(10, state, {"step": 10})
  ckpts.save(20, state.replace(step=state.step + 20), {"step": 20})
  ckpts.close()
  _corrupt(os.path.join(str(tmp_path), "checkpoints", "20"))
  target = ckpt_lib.abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"step 20.*restore_fallback.*step 10") as e:
    ckpt_lib.Checkpoints(str(tmp_path)).restore(target)
  assert "\n" not in str(e.value) and len(str(e.value)) < 400, str(e.value)  # one line, no dump
  ckpts = ckpt_lib.Checkpoints(str(tmp_path))
  step, restored, data = ckpts.restore(target, fallback=True)
  assert step == 10 and data == {"step": 10} and int(restored.step) == 0
  assert ckpts.steps() == [10] and ckpts.latest_step() == 10  # no longer counted
  assert os.path.isdir(os.path.join(str(tmp_path), "checkpoints", "corrupt", "20"))
  assert ckpts.save(20, restored, {"step": 20})  # the step can be saved again
  ckpts.close()


def test_keep_best_outlives_retention_and_best_step_names_it(tmp_path):
  ckpts = ckpt_lib.Checkpoints(str(tmp_path), keep=2, keep_best=True, async_save=False)
  x = {"w": np.zeros(3, np.float32)}
  val = {2: 3.0, 4: 2.0, 6: 2.5, 8: 2.7}
  for s in range(1, 10):
    ckpts.save(s, x, {"step": s}, metrics={"val_loss": val[s]} if s in val else None)
  ckpts.wait()
  assert ckpts.steps() == [4, 8, 9] and ckpts.best() == (4, 2.0)
  ckpts.close()
  assert ckpt_lib.Checkpoints(str(tmp_path), read_only=True).best_step() == 4
  again = ckpt_lib.Checkpoints(str(tmp_path), keep=2, keep_best=True, async_save=False)
  again.save(10, x, {"step": 10}, metrics={"val_loss": 2.2})  # retention after a restart
  again.save(11, x, {"step": 11})
  again.wait()
  assert again.steps() == [4, 10, 11] and again.best_step() == 4
  again.close()


def test_a_metadata_read_is_guarded_like_a_restore(tmp_path, monkeypatch):
  """A broken checkpoint can fail at its metadata (before any restore): the storage library's reads
  left behind must already meet the hooks that drop their 'Event loop is closed' tracebacks."""
  monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
  monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
  monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
  ckpts = ckpt_lib.Checkpoints(str(tmp_path / "run"), async_save=False)
  seen = {}

  def broken_metadata(step):
    seen["quiet"] = getattr(sys.excepthook, "_llm_jax_quiet", False)
    raise ValueError("DATA_LOSS: the node is corrupt")

  monkeypatch.setattr(ckpts.manager, "item_metadata", broken_metadata)
  with pytest.raises(ckpt_lib.CheckpointError, match="step 3 .* is unreadable"):
    ckpts.saved_shapes(3)
  assert seen["quiet"]
  ckpts.close()


def test_reads_left_behind_that_failed_print_no_asyncio_traceback(caplog):
  """Other reads of a broken checkpoint fail too, and asyncio logs each ("Task exception was never
  retrieved", a traceback) when its task is collected: after the hooks, a tensorstore read's failure is
  dropped and any other task's still logged."""
  ckpt_lib._ignore_reads_left_behind()

  async def fails(message):
    raise ValueError(message)

  def abandon(message):
    loop = asyncio.new_event_loop()
    task = loop.create_task(fails(message))
    loop.run_until_complete(asyncio.sleep(0))  # the task runs and fails; nobody reads its result
    loop.close()
    del task
    gc.collect()

  with caplog.at_level(logging.ERROR, logger="asyncio"):
    abandon("DATA_LOSS: Error reading byte range [tensorstore_spec='{}']")
    abandon("a bug of our own")
  logged = [r.getMessage() + str(r.exc_info[1]) for r in caplog.records if r.name == "asyncio"]
  assert len(logged) == 1 and "a bug of our own" in logged[0], logged


def test_an_abandoned_read_collected_later_prints_nothing():
  """A reader that falls back past a broken checkpoint goes on running, and the storage library's
  reads of the broken one are collected later, each an 'Exception ignored in: <coroutine
  _read_array_index_and_device_put>' with a 60-line TensorStore spec (generate printed ~1,000 lines):
  the hook drops those and passes on any other coroutine's."""
  seen = []
  hook = ckpt_lib._unraisable_hook(seen.append)

  async def _read_array_index_and_device_put():
    pass

  async def a_coroutine_of_our_own():
    pass

  for fn in (_read_array_index_and_device_put, a_coroutine_of_our_own):
    coro = fn()
    error = Exception("Encountered error while reading array index: (slice(0, 4, 1),)")
    hook(
      types.SimpleNamespace(
        exc_type=Exception, exc_value=error, exc_traceback=None, err_msg=None, object=coro
      )
    )
    coro.close()
  assert [u.object.cr_code.co_name for u in seen] == ["a_coroutine_of_our_own"]


_SLOW_CLEANUP = """
import asyncio, sys
from orbax.checkpoint._src.path import temporary_paths
real = temporary_paths.cleanup_temporary_paths

async def slow(*args, **kw):  # the cleanup orbax starts in a thread, slow as on a loaded machine
  await asyncio.sleep(1.0)
  return await real(*args, **kw)

temporary_paths.cleanup_temporary_paths = slow
from llm_jax.train.checkpoint import Checkpoints
Checkpoints(sys.argv[1], keep=1).close()
"""


def test_closed_right_after_opening_leaves_no_thread_behind(tmp_path):
  """A run that fails right after opening its checkpoints (e.g. a bad SFT record) exits with its one
  line: close() waits for the temporary-directory cleanup orbax's manager starts in a thread (left
  running, it failed at interpreter shutdown with a 40-line 'cannot schedule new futures' traceback)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo)
  r = subprocess.run(
    [sys.executable, "-c", _SLOW_CLEANUP, str(tmp_path / "ck")],
    capture_output=True,
    text=True,
    timeout=120,
    env=env,
    cwd=repo,
  )
  assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]

"""Launch detection (explicit, SLURM, TPU, single) and the dry run's figures, without starting processes."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from run_cmd import run_command

from llm_jax import config as config_lib
from llm_jax import distributed, dry_run, sharding
from llm_jax.model import Decoder, ModelConfig
from llm_jax.train import optimizer as optimizer_lib
from llm_jax.train import state as state_lib

TINY = [
  "model.num_layers=2",
  "model.d_model=64",
  "model.num_heads=4",
  "model.max_seq_len=32",
  "train.seq_len=32",
  "train.global_batch_size=16",
  "model.vocab_size=256",
]
SLURM = {
  "SLURM_JOB_ID": "4242",
  "SLURM_STEP_NODELIST": "gpu[003-004]",
  "SLURM_NTASKS": "16",
  "SLURM_PROCID": "9",
  "SLURM_LOCALID": "1",
}


def cfg(*overrides):
  return config_lib.load("configs/tiny.py", TINY + list(overrides))


# ------------------------------------------------------------------ detection


def test_nothing_set_is_single_process():
  launch = distributed.detect(cfg(), environ={})
  assert launch.method == "single" and not launch.multi_process


def test_explicit_from_config():
  c = cfg(
    "distributed.coordinator_address=10.0.0.1:1234", "distributed.num_processes=4", "distributed.process_id=3"
  )
  assert distributed.detect(c, environ={}) == distributed.Launch("explicit", "10.0.0.1:1234", 4, 3)


def test_explicit_from_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "h0:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert distributed.detect(cfg(), environ=env) == distributed.Launch("explicit", "h0:99", 2, 1)


def test_config_wins_over_environment():
  c = cfg("distributed.coordinator_address=cfg:1", "distributed.num_processes=8", "distributed.process_id=0")
  env = {"JAX_COORDINATOR_ADDRESS": "env:2", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert distributed.detect(c, environ=env) == distributed.Launch("explicit", "cfg:1", 8, 0)


@pytest.mark.parametrize(
  "overrides, key",
  [
    (["distributed.coordinator_address=h:1"], "distributed.num_processes"),
    (["distributed.coordinator_address=h:1", "distributed.num_processes=2"], "distributed.process_id"),
    (
      ["distributed.coordinator_address=h:1", "distributed.num_processes=2", "distributed.process_id=2"],
      "distributed.process_id=2",
    ),
    (
      ["distributed.coordinator_address=nohost", "distributed.num_processes=2", "distributed.process_id=0"],
      "HOST:PORT",
    ),
    (["distributed.num_processes=2", "distributed.process_id=0"], "distributed.coordinator_address"),
  ],
)
def test_incomplete_explicit_settings_name_the_key(overrides, key):
  with pytest.raises(distributed.DistributedError, match=key.replace(".", r"\.")):
    distributed.detect(cfg(*overrides), environ={})


def test_slurm_step_with_many_tasks():
  assert distributed.detect(cfg(), environ=SLURM).method == "slurm"


def test_slurm_single_task_or_bare_allocation_is_single_process():
  assert distributed.detect(cfg(), environ={**SLURM, "SLURM_NTASKS": "1"}).method == "single"
  bare = {k: v for k, v in SLURM.items() if k not in ("SLURM_STEP_NODELIST", "SLURM_PROCID")}
  assert distributed.detect(cfg(), environ=bare).method == "single"  # salloc shell, no srun


def test_explicit_wins_over_slurm():
  c = cfg("distributed.coordinator_address=h:1", "distributed.num_processes=2", "distributed.process_id=0")
  assert distributed.detect(c, environ=SLURM).method == "explicit"


def test_tpu_pod_from_environment():
  env = {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3", "TPU_WORKER_ID": "2"}
  assert distributed.detect(cfg(), environ=env).method == "tpu"


def test_forced_methods():
  assert distributed.detect(cfg(), environ={**SLURM, "LLM_JAX_CLUSTER": "single"}).method == "single"
  assert distributed.detect(cfg(), environ={"LLM_JAX_CLUSTER": "tpu"}).method == "tpu"
  with pytest.raises(distributed.DistributedError, match="SLURM_JOB_ID"):
    distributed.detect(cfg(), environ={"LLM_JAX_CLUSTER": "slurm"})
  with pytest.raises(distributed.DistributedError, match="coordinator_address"):
    distributed.detect(cfg(), environ={"LLM_JAX_CLUSTER": "explicit"})
  with pytest.raises(distributed.DistributedError, match="LLM_JAX_CLUSTER='mpi'"):
    distributed.detect(cfg(), environ={"LLM_JAX_CLUSTER": "mpi"})


def test_heartbeat_and_shutdown_bounds():
  launch = distributed.detect(
    cfg(
      "distributed.coordinator_address=h:1",
      "distributed.num_processes=2",
      "distributed.process_id=1",
      "distributed.heartbeat_timeout_s=7",
    ),
    environ={},
  )
  kw = distributed._init_kwargs(launch, cfg("distributed.heartbeat_timeout_s=7"), {})
  assert kw["heartbeat_timeout_seconds"] == 7 and kw["shutdown_timeout_seconds"] == 30
  assert kw["num_processes"] == 2 and kw["process_id"] == 1
  with pytest.raises(distributed.DistributedError, match="heartbeat_timeout_s"):
    distributed._init_kwargs(launch, cfg("distributed.heartbeat_timeout_s=0"), {})


def test_single_process_initialize_logs_devices(caplog, devices):
  caplog.set_level("INFO")
  assert distributed.initialize(cfg(), environ={}).method == "single"
  assert not jax.distributed.is_initialized()
  assert "process 0/1" in caplog.text and "8 local" in caplog.text
  assert distributed.is_main_process()


def test_one_process_holds_the_whole_batch(devices):
  mesh = sharding.make_mesh(cfg("sharding.data=2", "sharding.tensor=4"))
  assert sharding.process_batch_slice(mesh) == (0, 1)


# ------------------------------------------------------------------ dry run


def _real_bytes(c, mesh):
  """Bytes per device of params and optimizer state from the real NamedShardings on the fake devices."""
  model = Decoder(ModelConfig.from_config(c, platform="cpu"))
  abstract, shardings = state_lib.state_shardings(model, optimizer_lib.make_optimizer(c), mesh, c)

  def total(tree, shard_tree):
    leaves = jax.tree.leaves(tree)
    shs = jax.tree.leaves(shard_tree, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    return sum(
      int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize for x, s in zip(leaves, shs, strict=True)
    )

  return total(abstract.params, shardings.params), total(abstract.opt_state, shardings.opt_state)


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 2, 2), (1, 4, 2), (1, 8, 1)])
def test_dry_run_matches_the_real_shardings(devices, mesh):
  c = cfg(f"sharding.data={mesh[0]}", f"sharding.fsdp={mesh[1]}", f"sharding.tensor={mesh[2]}")
  est = dry_run.estimate(c, 8, platform="cpu")
  params, opt = _real_bytes(c, sharding.make_mesh(c))
  assert est.param_bytes == params
  assert est.optimizer_bytes == opt
  assert est.mesh == dict(zip(("data", "fsdp", "tensor"), mesh, strict=True))
  assert est.rows_per_device == 16 // (mesh[0] * mesh[1])


def test_dry_run_parameter_count_matches_model_config():
  c = cfg(
    "model.tie_embeddings=false", "model.positions=rope", "model.activation=swiglu", "model.use_bias=false"
  )  # (ModelConfig.param_count misses the swiglu gate bias)
  est = dry_run.estimate(c, 1, platform="cpu")
  assert est.param_count == ModelConfig.from_config(c, platform="cpu").param_count()
  assert est.param_bytes == 4 * est.param_count  # one device holds all float32 parameters
  assert est.optimizer_bytes >= 2 * est.param_bytes  # AdamW's two moments


def test_dry_run_memory_scales_as_it_should():
  plain = dry_run.estimate(cfg(), 1, platform="cpu")
  fsdp = dry_run.estimate(cfg("sharding.data=1", "sharding.fsdp=-1"), 8, platform="cpu")
  assert fsdp.param_bytes < plain.param_bytes / 6  # 8-way, small replicated norms aside
  micro = dry_run.estimate(cfg("train.microbatches=4"), 1, platform="cpu")
  assert micro.activation_bytes < plain.activation_bytes / 3
  assert micro.grad_bytes == 2 * plain.grad_bytes  # the accumulator
  acts = {
    r: dry_run.estimate(cfg(f"model.remat={r}", "model.num_layers=8"), 1, platform="cpu").activation_bytes
    for r in ("none", "dots", "dots_no_batch", "full")
  }
  assert acts["full"] < acts["dots_no_batch"] < acts["dots"] < acts["none"]
  gpu = dry_run.estimate(cfg(), 1, platform="gpu")  # bfloat16 compute, flash attention
  assert gpu.compute_dtype == "bfloat16" and gpu.activation_bytes < plain.activation_bytes


def test_dry_run_verdict_against_device_memory():
  c = config_lib.load("configs/llama_8b.py")
  one = dry_run.estimate(c, 1, platform="gpu", device_memory_bytes=141 * dry_run.GIB)
  four = dry_run.estimate(c, 4, platform="gpu", device_memory_bytes=141 * dry_run.GIB)
  assert not one.fits and four.fits
  assert 7.0e9 < one.param_count < 8.5e9
  text = dry_run.report(four, c, device_name="H200")
  assert "mesh: data=1 fsdp=4 tensor=1" in text and "fits" in text and "DOES NOT FIT" not in text
  assert "DOES NOT FIT" in dry_run.report(one, c)
  assert "unknown" in dry_run.report(dry_run.estimate(cfg(), 1, platform="cpu"), cfg())


def test_dry_run_rejects_an_impossible_mesh():
  with pytest.raises(config_lib.ConfigError, match="sharding"):
    dry_run.estimate(cfg("sharding.data=3"), 8, platform="cpu")


def test_dry_run_cli(capsys):
  assert (
    run_command(
      "llm_jax.dry_run",
      "--config=configs/tiny.py",
      "--devices=8",
      "--device_memory_gib=16",
      "--platform=cpu",
      "--config.sharding.fsdp=2",
    )
    == 0
  )
  out = capsys.readouterr().out
  assert "mesh: data=4 fsdp=2 tensor=1" in out and "fits" in out
  assert (
    run_command("llm_jax.dry_run", "--config=configs/tiny.py", "--devices=8", "--config.sharding.data=3") == 1
  )
  err = capsys.readouterr().err
  assert "sharding.data" in err and "Traceback" not in err
  assert run_command("llm_jax.dry_run", "--config=configs/tiny.py") == 2  # --devices is required


def test_dry_run_on_this_job(capsys, devices):
  est = dry_run.run(cfg())
  assert est.num_devices == 8 and "nothing was compiled" in capsys.readouterr().out


def test_train_cli_dry_run_exits_before_compiling(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "SLURM_", "LLM_JAX_"))}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "llm_jax.train",
      "--config=configs/llama_8b.py",
      f"--workdir={workdir}",
      "--dry_run",
      "--config.sharding.fsdp=2",
      "--config.sharding.data=2",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mesh: data=2 fsdp=2 tensor=1" in proc.stdout and "nothing was compiled" in proc.stdout
  assert "process 0/1" in proc.stderr and "4 local" in proc.stderr
  assert not workdir.exists()  # no data prepared, no run directory, no parameters allocated

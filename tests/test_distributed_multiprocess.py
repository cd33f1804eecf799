"""Two processes on localhost through jax.distributed (CPU, gloo collectives), started by launch/local.sh.

One scenario, in order (each step needs the previous one's run directory):
1. two processes x 4 fake CPU devices train a tiny model with checkpoints; once a few steps are logged,
   process 1 is killed (SIGKILL): process 0 must stop within the heartbeat bound, naming process 1;
2. the command again, on an 8-way tensor-parallel mesh over both processes, resumes from the last
   complete checkpoint and trains two more steps;
3. one process with 8 fake devices (the same global mesh and batch) trains as far from scratch: its
   per-step losses equal those logged by the two-process runs, before and after the restart.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_SH = os.path.join(ROOT, "launch", "local.sh")
HEARTBEAT_S = 10
WORDS = (
  "the quick brown fox jumps over a lazy dog while the model learns tokens from shards on "
  "many hosts and devices"
).split()

pytestmark = pytest.mark.slow


def _overrides(tmp, steps: int, mesh: tuple[int, int, int] = (-1, 1, 1)) -> list[str]:
  return [
    f"--config.{k}"
    for k in (
      f"sharding.data={mesh[0]}",
      f"sharding.fsdp={mesh[1]}",
      f"sharding.tensor={mesh[2]}",
      f"data.corpus={tmp}/corpus/*.txt",
      f"data.cache_dir={tmp}/cache",
      "data.tokenizer.vocab_size=300",
      "data.near_dup_threshold=0",
      "model.num_layers=1",
      "model.d_model=32",
      "model.num_heads=8",
      "model.max_seq_len=16",
      "train.seq_len=16",
      "train.global_batch_size=8",
      f"train.steps={steps}",
      "train.schedule=constant",
      "train.warmup_steps=0",
      "train.log_every=1",
      "train.checkpoint_every=4",
      "train.keep_checkpoints=1000",
      "train.eval_every=0",
      "train.sample_every=0",
      "train.preflight=false",
      f"distributed.heartbeat_timeout_s={HEARTBEAT_S}",
    )
  ]


def _train_cmd(tmp, workdir: str, steps: int, mesh=(-1, 1, 1)) -> list[str]:
  return [
    sys.executable,
    "-m",
    "llm_jax.train",
    "--config=configs/tiny.py",
    f"--workdir={workdir}",
    *_overrides(tmp, steps, mesh),
  ]


def _env(devices: int | None = None) -> dict[str, str]:
  """A clean environment for children: the pytest process's XLA_FLAGS (8 devices) is not theirs."""
  env = {
    k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "SLURM_", "TPU_", "LLM_JAX_"))
  }
  env.update(
    JAX_PLATFORMS="cpu",
    PYTHON=sys.executable,
    TF_CPP_MIN_LOG_LEVEL="0",
    PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
  )
  if "LLM_JAX_CACHE" in os.environ:  # the test run's compilation cache (conftest.py), not ~/.cache
    env["LLM_JAX_CACHE"] = os.environ["LLM_JAX_CACHE"]
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _local(tmp, logdir: str, workdir: str, steps: int, mesh=(-1, 1, 1)) -> subprocess.Popen:
  cmd = [
    "bash",
    LOCAL_SH,
    "-n",
    "2",
    "--cpu_devices",
    "4",
    "--logdir",
    logdir,
    "--grace",
    "60",
    "--",
    *_train_cmd(tmp, workdir, steps, mesh),
  ]
  return subprocess.Popen(
    cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def _losses(workdir: str) -> dict[int, float]:
  path = os.path.join(workdir, "metrics.jsonl")
  out = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue  # a torn last line
        if "loss" in row and "grad_norm" in row:
          out[int(row["step"])] = float(row["loss"])
  return out


def _read(path: str) -> str:
  with open(path, errors="replace") as f:
    return f.read()


def _complete_checkpoints(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


BATCH_WORKER = """
import json, sys
import jax, numpy as np
from llm_jax import config as config_lib, distributed, sharding
c = config_lib.load("configs/tiny.py", sys.argv[1:])
distributed.initialize(c)
g = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
out = {}
for mesh in ("1,1,4", "2,1,2", "4,1,1", "1,4,1", "1,2,2"):
  with c.unlocked():
    c.sharding.data, c.sharding.fsdp, c.sharding.tensor = (int(x) for x in mesh.split(","))
  m = sharding.make_mesh(c)
  i, n = sharding.process_batch_slice(m)
  rows = 8 // n
  b = sharding.global_batch({"x": g[i * rows:(i + 1) * rows]}, m)["x"]
  total = jax.jit(lambda a: (a * jax.numpy.arange(1, 9)[:, None]).sum(), out_shardings=None)(b)
  out[mesh] = [i, n, list(b.shape), int(total)]
print("RESULT " + json.dumps(out), flush=True)
"""


def test_every_mesh_gets_the_whole_global_batch_across_processes(tmp_path):
  """Batch rows split over data/fsdp, or replicated (tensor parallelism across processes), are right."""
  logdir = str(tmp_path / "logs")
  cmd = [
    "bash",
    LOCAL_SH,
    "-n",
    "2",
    "--cpu_devices",
    "2",
    "--logdir",
    logdir,
    "--",
    sys.executable,
    "-c",
    BATCH_WORKER,
  ]
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  want = int((np.arange(24).reshape(8, 3) * np.arange(1, 9)[:, None]).sum())
  results = []
  for i in range(2):
    line = [
      x for x in _read(os.path.join(logdir, f"process_{i}.log")).splitlines() if x.startswith("RESULT ")
    ][0]
    results.append(json.loads(line[len("RESULT ") :]))
  for mesh, (_, _, shape, total) in results[0].items():
    assert shape == [8, 3] and total == want, (mesh, results)
    assert results[1][mesh][2:] == [shape, total]
  assert results[0]["1,1,4"][:2] == [0, 1] and results[1]["1,1,4"][:2] == [0, 1]  # replicated rows
  assert results[0]["4,1,1"][:2] == [0, 2] and results[1]["4,1,1"][:2] == [1, 2]  # split rows


FAILING_WORKER = """
import sys
import jax
from jax.experimental import multihost_utils
from llm_jax import config as config_lib, distributed
c = config_lib.load("configs/tiny.py", ["distributed.heartbeat_timeout_s=5"])
distributed.initialize(c)
multihost_utils.sync_global_devices("both started")
if jax.process_index() == 1:
  raise RuntimeError("process 1 breaks")
multihost_utils.sync_global_devices("process 1 never gets here")
"""


def test_an_exception_in_one_process_stops_the_other_naming_it(tmp_path):
  """No wait at the shutdown barrier: the failing process exits, its peer stops within the heartbeat."""
  logdir = str(tmp_path / "logs")
  cmd = [
    "bash",
    LOCAL_SH,
    "-n",
    "2",
    "--cpu_devices",
    "1",
    "--logdir",
    logdir,
    "--grace",
    "60",
    "--",
    sys.executable,
    "-c",
    FAILING_WORKER,
  ]
  t = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  elapsed = time.time() - t
  log0, log1 = (_read(os.path.join(logdir, f"process_{i}.log")) for i in range(2))
  assert proc.returncode != 0
  assert "RuntimeError: process 1 breaks" in log1 and "process 1/2 failed" in log1
  # Process 0 stops on the broken collective, naming the failure process 1 recorded, or (when blocked)
  # through the coordination service's heartbeat check, naming process 1 by its id.
  assert (
    "failed first: process 1: RuntimeError: process 1 breaks" in log0
    or "stopped sending heartbeats):\n1\n" in log0
  ), log0[-3000:]
  assert elapsed < 45, elapsed  # startup + the 5 s heartbeat, not the shutdown barrier's timeout


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multiprocess")
  rng = random.Random(0)
  (tmp / "corpus").mkdir()
  for i in range(30):
    paragraphs = (" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(5))
    (tmp / "corpus" / f"doc{i}.txt").write_text("\n\n".join(paragraphs))
  return tmp


@pytest.fixture(scope="module")
def killed(tmp):
  """Phase 1: a two-process run, process 1 killed after step 9 is logged."""
  workdir, logdir = str(tmp / "run"), str(tmp / "logs1")
  proc = _local(tmp, logdir, workdir, steps=100_000)
  deadline = time.time() + 240
  while max(_losses(workdir), default=0) < 9:
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      out = proc.communicate()[0]
      pytest.fail(
        f"the two-process run stopped or stalled before step 9 (rc {proc.returncode}):\n"
        f"{out[-4000:]}\nprocess 1:\n{_read(os.path.join(logdir, 'process_1.log'))[-3000:]}"
      )
    time.sleep(0.1)
  with open(os.path.join(logdir, "pids")) as f:
    pids = [int(x) for x in f.read().split()]
  os.kill(pids[1], signal.SIGKILL)
  t_kill = time.time()
  try:
    out = proc.communicate(timeout=HEARTBEAT_S + 50)[0]
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail("process 0 did not stop within the heartbeat bound after process 1 was killed")
  return dict(
    workdir=workdir,
    elapsed=time.time() - t_kill,
    rc=proc.returncode,
    out=out,
    log0=_read(os.path.join(logdir, "process_0.log")),
    losses=_losses(workdir),
    checkpoints=_complete_checkpoints(workdir),
  )


@pytest.fixture(scope="module")
def resumed(tmp, killed):
  """Phase 2: two processes again, resuming from the last complete checkpoint on another mesh: 8-way
  tensor parallel across both processes, so each loads the whole (replicated) batch."""
  last = killed["checkpoints"][-1]
  logdir = str(tmp / "logs2")
  proc = _local(tmp, logdir, killed["workdir"], steps=last + 2, mesh=(1, 1, 8))
  out = proc.communicate(timeout=240)[0]
  return dict(
    last=last,
    rc=proc.returncode,
    out=out,
    log0=_read(os.path.join(logdir, "process_0.log")),
    log1=_read(os.path.join(logdir, "process_1.log")),
    losses=_losses(killed["workdir"]),
  )


@pytest.fixture(scope="module")
def reference(tmp, killed, resumed):
  """Phase 3: one process, 8 devices, from scratch, as many steps as the two-process runs reached."""
  steps = max(max(killed["losses"]), resumed["last"] + 2)
  workdir = str(tmp / "single")
  proc = subprocess.run(
    _train_cmd(tmp, workdir, steps),
    cwd=ROOT,
    env=_env(devices=8),
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return _losses(workdir)


def test_killing_one_process_stops_the_other_naming_it(killed):
  print(
    f"process 1 killed after step {max(killed['losses'])}; process 0 stopped "
    f"{killed['elapsed']:.1f} s later; checkpoints {killed['checkpoints']}"
  )
  assert killed["rc"] != 0, killed["out"][-3000:]
  assert killed["elapsed"] < HEARTBEAT_S + 30, killed["elapsed"]
  assert "process 1 (pid" in killed["out"] and "signal 9" in killed["out"]  # local.sh's summary
  log0 = killed["log0"]
  assert "process 0/2" in log0 and "4 local" in log0 and "of 8 in the job" in log0
  # JAX's coordination service names the dead task by its process id.
  assert "stopped sending heartbeats" in log0, log0[-3000:]
  dead = log0.split("stopped sending heartbeats):", 1)[1].strip().splitlines()[0]
  assert dead.split(",")[0].strip() == "1", dead
  assert killed["checkpoints"] and killed["checkpoints"][0] == 4


def test_restart_resumes_from_the_last_checkpoint(killed, resumed):
  assert resumed["rc"] == 0, resumed["out"][-4000:]
  assert f"resumed from the checkpoint at step {resumed['last']}" in resumed["log0"]
  assert f"resumed from the checkpoint at step {resumed['last']}" in resumed["log1"]
  assert max(resumed["losses"]) == resumed["last"] + 2
  for step in (resumed["last"] + 1, resumed["last"] + 2):
    if step in killed["losses"]:  # the killed run got there too: the restart repeats it exactly
      assert resumed["losses"][step] == pytest.approx(killed["losses"][step], rel=1e-5)


def test_two_process_losses_equal_the_single_process_run(killed, resumed, reference):
  assert len(killed["losses"]) >= 9
  for step, loss in killed["losses"].items():
    assert loss == pytest.approx(reference[step], rel=1e-5), step
  for step in (resumed["last"] + 1, resumed["last"] + 2):
    assert resumed["losses"][step] == pytest.approx(reference[step], rel=1e-5), step
  assert reference[9] < reference[1]  # it does learn

"""launch/slurm_cpu.sbatch (the body shared with slurm_gpu.sbatch) submitted to a real SLURM.

Runs where SLURM answers (`sinfo` shows a usable node with at least 2 CPUs: start one on this machine
with `sudo launch/slurm_local/start.sh`); skips with the reason elsewhere, or fails when
LLM_JAX_REQUIRE_SLURM=1 (as .ci/run sets, so that CI cannot pass by skipping them). In order:
1. one process, 2 CPU devices: configs/tiny.py for 20 steps (the reference);
2. `sbatch launch/slurm_cpu.sbatch`: 2 tasks x 1 CPU device, the same run: every per-step loss equals the
   reference's, the run directory is complete, each task logs its place in the job;
3. the same job, sent SIGTERM mid-run (`scancel --signal=TERM`, what preemption and `--signal` do): every
   process saves a checkpoint and exits 75, the script requeues the job, it resumes from that step, and
   the final losses equal the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(ROOT, "launch", "slurm_cpu.sbatch")
STEPS = 20
JOB_TIMEOUT_S = 900
OVERRIDES = [
  f"--config.train.steps={STEPS}",
  "--config.train.warmup_steps=5",  # tiny.py warms up over 50 steps; a 20-step run must not
  "--config.train.log_every=1",
  "--config.train.eval_every=10",
  "--config.train.eval_batches=1",
  "--config.train.sample_every=0",
  "--config.train.checkpoint_every=10",
  "--config.train.preflight=false",
]
RUN_FILES = ("config.json", "run.json", "manifest.json", "tokenizer.model", "metrics.jsonl")


def _slurm_problem() -> str | None:
  """Why the SLURM tests cannot run here, or None."""
  if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
    return "SLURM is not installed (no sinfo/sbatch); start one with sudo launch/slurm_local/start.sh"
  try:
    proc = subprocess.run(
      ["sinfo", "-h", "-N", "-o", "%T %c"], check=False, capture_output=True, text=True, timeout=10
    )
  except subprocess.TimeoutExpired:
    return "sinfo did not answer within 10 s"
  if proc.returncode != 0:
    return f"sinfo failed: {proc.stderr.strip()[:200]}; start SLURM with sudo launch/slurm_local/start.sh"
  usable = [
    line.split()
    for line in proc.stdout.splitlines()
    if line.split() and line.split()[0].rstrip("*~#") in ("idle", "mixed", "allocated")
  ]
  if not any(int(cpus) >= 2 for _, cpus in usable):
    return f"no usable SLURM node with 2 CPUs (sinfo: {proc.stdout.strip()!r})"
  return None


_PROBLEM = _slurm_problem()
if _PROBLEM is not None and os.environ.get("LLM_JAX_REQUIRE_SLURM") == "1":
  raise RuntimeError(f"LLM_JAX_REQUIRE_SLURM=1 but {_PROBLEM}")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))]


def _env(tmp) -> dict[str, str]:
  """The environment sbatch passes on: this interpreter, this checkout, logs and caches under tmp."""
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("JAX_", "XLA_", "SLURM_", "SBATCH_", "TPU_", "LLM_JAX_"))
  }
  env.update(
    PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    LLM_JAX_PYTHON=sys.executable,
    LLM_JAX_LOGDIR=str(tmp / "logs"),
    LLM_JAX_CACHE=str(tmp / "cache"),
    TF_CPP_MIN_LOG_LEVEL="0",
  )
  return env


def _overrides(tmp) -> list[str]:
  return [*OVERRIDES, f"--config.data.cache_dir={tmp}/cache/prepared"]


def _losses(workdir) -> dict[int, float]:
  out = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue  # a torn last line while the job writes
        if "loss" in row and "grad_norm" in row:
          out[int(row["step"])] = float(row["loss"])
  return out


def _read(path) -> str:
  if not os.path.exists(path):
    return f"({path} does not exist)"
  with open(path, errors="replace") as f:
    return f.read()


def _job_info(job_id: str) -> dict[str, str]:
  """scontrol's fields of a job (JobState, ExitCode, Restarts, ...)."""
  proc = subprocess.run(
    ["scontrol", "show", "job", "-o", job_id], check=False, capture_output=True, text=True, timeout=30
  )
  return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def _submit(tmp, name: str) -> dict:
  workdir, logdir = tmp / name, tmp / "logs"
  logdir.mkdir(exist_ok=True)
  cmd = [
    "sbatch",
    "--parsable",
    f"--job-name=llm_jax_{name}",
    f"--output={logdir}/%x-%j.out",
    SBATCH,
    "configs/tiny.py",
    str(workdir),
    *_overrides(tmp),
  ]
  proc = subprocess.run(cmd, check=False, cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  job_id = proc.stdout.strip().split(";")[0]
  prefix = f"{logdir}/llm_jax_{name}-{job_id}"
  return {
    "id": job_id,
    "workdir": str(workdir),
    "out": f"{prefix}.out",
    "task_logs": [f"{prefix}-{i}.log" for i in (0, 1)],
    "t0": time.time(),
  }


def _describe(job: dict) -> str:
  return (
    f"job {job['id']}: {_job_info(job['id'])}\n--- {job['out']}:\n{_read(job['out'])[-2000:]}\n"
    + "".join(f"--- {p}:\n{_read(p)[-3000:]}\n" for p in job["task_logs"])
  )


def _wait(job: dict) -> dict:
  """Waits for the job to end (through any requeue); cancels it and fails after JOB_TIMEOUT_S."""
  while True:
    info = _job_info(job["id"])
    if info.get("JobState") in (
      "COMPLETED",
      "FAILED",
      "CANCELLED",
      "TIMEOUT",
      "NODE_FAIL",
      "OUT_OF_MEMORY",
      "BOOT_FAIL",
      "DEADLINE",
      "PREEMPTED",
    ):
      break
    if time.time() - job["t0"] > JOB_TIMEOUT_S:
      subprocess.run(["scancel", job["id"]], check=False, timeout=30)
      pytest.fail(f"the job did not end within {JOB_TIMEOUT_S} s\n{_describe(job)}")
    time.sleep(1)
  return dict(
    job,
    info=info,
    wall_s=time.time() - job["t0"],
    losses=_losses(job["workdir"]),
    out_text=_read(job["out"]),
    logs=[_read(p) for p in job["task_logs"]],
  )


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="module")
def reference(tmp):
  """One process, 2 CPU devices (the job's global mesh and batch), the same overrides."""
  env = _env(tmp)
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  t = time.time()
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "llm_jax.train",
      "--config=configs/tiny.py",
      f"--workdir={tmp / 'single'}",
      *_overrides(tmp),
    ],
    check=False,
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=JOB_TIMEOUT_S,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  print(f"reference (1 process): {time.time() - t:.0f} s")
  return _losses(tmp / "single")


@pytest.fixture(scope="module")
def job(tmp, reference):
  """The 2-task job, uninterrupted."""
  done = _wait(_submit(tmp, "job"))
  print(f"2-task job {done['id']}: {done['wall_s']:.0f} s from sbatch to the end")
  return done


@pytest.fixture(scope="module")
def preempted(tmp, job):
  """The same job, sent SIGTERM once step 3 is logged; the script requeues it and it resumes."""
  submitted = _submit(tmp, "preempted")
  while max(_losses(submitted["workdir"]), default=0) < 3:
    if _job_info(submitted["id"]).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
      pytest.fail(f"the job ended before step 3\n{_describe(submitted)}")
    if time.time() - submitted["t0"] > JOB_TIMEOUT_S:
      subprocess.run(["scancel", submitted["id"]], check=False, timeout=30)
      pytest.fail(f"the job did not reach step 3 within {JOB_TIMEOUT_S} s\n{_describe(submitted)}")
    time.sleep(0.2)
  signalled_after = max(_losses(submitted["workdir"]))
  subprocess.run(["scancel", "--signal=TERM", submitted["id"]], check=True, timeout=30)
  done = _wait(submitted)
  print(
    f"preempted job {done['id']}: SIGTERM after step {signalled_after}, "
    f"{done['wall_s']:.0f} s from sbatch to the end (requeue included)"
  )
  return dict(done, signalled_after=signalled_after)


def _assert_complete_run_dir(workdir: str, checkpoints: set[int]) -> None:
  for name in RUN_FILES:
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(workdir, "tb")))
  assert checkpoints <= {int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()}
  with open(os.path.join(workdir, "run.json")) as f:
    devices = json.load(f)["devices"]
  assert devices["process_count"] == 2 and devices["count"] == 2 and devices["local_count"] == 1, devices


def test_two_task_job_matches_the_single_process_run(job, reference):
  assert job["info"]["JobState"] == "COMPLETED" and job["info"]["ExitCode"] == "0:0", _describe(job)
  assert job["info"]["NumTasks"] == "2" and job["info"]["Restarts"] == "0", job["info"]
  assert sorted(reference) == list(range(1, STEPS + 1))
  assert sorted(job["losses"]) == list(range(1, STEPS + 1)), _describe(job)
  for step, loss in reference.items():
    assert job["losses"][step] == pytest.approx(loss, rel=1e-5), step
  assert reference[STEPS] < reference[1]  # it learns
  _assert_complete_run_dir(job["workdir"], {10, 20})
  for i, log in enumerate(job["logs"]):
    assert "joining a slurm job" in log, log[-3000:]
    assert f"process {i}/2 on host" in log and "1 local cpu devices" in log and "of 2 in the job" in log
    assert f"complete: step {STEPS}/{STEPS}" in log, log[-3000:]
  assert "srun exited with 0" in job["out_text"] and "requeue" not in job["out_text"], job["out_text"]


def test_sigterm_checkpoints_requeues_and_resumes_with_the_same_losses(preempted, job, reference):
  out, logs = preempted["out_text"], preempted["logs"]
  assert preempted["info"]["JobState"] == "COMPLETED", _describe(preempted)
  assert preempted["info"]["Restarts"] == "1", preempted["info"]
  stopped = re.findall(r"stopped by SIGTERM at step (\d+); checkpoint saved", logs[0])
  assert len(stopped) == 1, _describe(preempted)
  step = int(stopped[0])
  assert preempted["signalled_after"] <= step < STEPS, (preempted["signalled_after"], step)
  for log in logs:  # both processes stopped at the agreed step, then resumed from its checkpoint
    assert f"stopped by SIGTERM at step {step}; checkpoint saved" in log
    assert f"resumed from the checkpoint at step {step}" in log
    assert f"complete: step {STEPS}/{STEPS}" in log
  assert "srun exited with 75" in out and f"requeueing job {preempted['id']}" in out, out
  assert "restart 1" in out and out.rstrip().endswith("srun exited with 0"), out
  _assert_complete_run_dir(preempted["workdir"], {step, 10, 20})
  with open(os.path.join(preempted["workdir"], "run.json")) as f:
    assert [s["start_step"] for s in json.load(f)["sessions"]] == [0, step]
  assert sorted(preempted["losses"]) == list(range(1, STEPS + 1))
  for s in range(1, STEPS + 1):
    assert preempted["losses"][s] == pytest.approx(job["losses"][s], rel=1e-5), s
    assert preempted["losses"][s] == pytest.approx(reference[s], rel=1e-5), s

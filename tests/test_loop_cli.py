"""`python -m llm_jax.train` as a user runs it: a misspelled key, kill -9 during an async checkpoint save,
Ctrl-C, and the same command again resuming."""

import json
import os
import signal
import subprocess
import sys
import time

from test_loop import overrides, write_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(tmp):
  env = dict(os.environ)
  env.update(
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=str(tmp / "xla_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    PYTHONPATH=REPO,
  )
  return env


def _config_file(tmp) -> str:
  """A config file over configs/base.py with the tiny test settings."""
  over = overrides(str(tmp / "corpus"), str(tmp / "data_cache"))
  over.update({"train.eval_every": 4, "train.eval_batches": 1})
  path = tmp / "tiny_test_config.py"
  path.write_text(
    "from configs import base\n"
    "from llm_jax import config as config_lib\n\n\n"
    "def get_config():\n"
    "  c = base.get_config()\n"
    f"  for k, v in {over!r}.items():\n"
    "    config_lib.set_key(c, k, v)\n"
    "  return c\n"
  )
  return str(path)


def _cli(config, workdir, *extra):
  return [sys.executable, "-m", "llm_jax.train", f"--config={config}", f"--workdir={workdir}", *extra]


def test_misspelled_key_fails_with_its_name(tmp_path):
  out = subprocess.run(
    _cli("configs/tiny.py", tmp_path / "w", "--config.train.stpes=5"),
    cwd=REPO,
    env=_env(tmp_path),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 2  # a usage error
  assert "train.stpes" in out.stderr and "did you mean steps" in out.stderr
  assert "Traceback" not in out.stderr
  assert not os.path.exists(tmp_path / "w")


KILLER = """
import os, signal, sys
from llm_jax import config as config_lib
from llm_jax.train import checkpoint, loop
save = checkpoint.Checkpoints.save
def save_then_die(self, step, state, data_state, **kwargs):
  out = save(self, step, state, data_state, **kwargs)
  if step == 8:  # the async write has started, it has not been committed
    os.kill(os.getpid(), signal.SIGKILL)
  return out
checkpoint.Checkpoints.save = save_then_die
loop.train(config_lib.load(sys.argv[1]), sys.argv[2])
"""


def _steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


def _train(env, config, workdir, *extra):
  """The training command run to its end: (returncode, stdout, stderr) as subprocess.run gives."""
  return subprocess.run(
    _cli(config, workdir, *extra), cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )


def test_kill9_during_async_save_then_ctrl_c_then_same_command_resumes(tmp_path):
  write_corpus(str(tmp_path / "corpus"))
  config = _config_file(tmp_path)
  workdir = str(tmp_path / "run")
  env = _env(tmp_path)

  killed = subprocess.run(
    [sys.executable, "-c", KILLER, config, workdir],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  entries = os.listdir(os.path.join(workdir, "checkpoints"))
  assert "4" in entries and "8" not in entries, entries  # step 8 was never committed
  assert any(e.startswith("8.") for e in entries), entries  # ... its temporary directory remains

  # The CLI resumes from step 4; Ctrl-C once it is training stops it cleanly with a checkpoint.
  proc = subprocess.Popen(
    _cli(config, workdir, "--config.train.steps=400"),
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if max(_steps(workdir), default=0) >= 10:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  output = proc.communicate(timeout=120)[0]
  assert proc.returncode == 75, output[-3000:]
  assert "stopped by SIGINT" in output
  steps = sorted(int(e) for e in os.listdir(os.path.join(workdir, "checkpoints")) if e.isdigit())
  stopped = steps[-1]
  assert stopped >= 10 and not any("tmp" in e for e in os.listdir(os.path.join(workdir, "checkpoints")))
  record = json.load(open(os.path.join(workdir, "run.json")))
  assert [s["start_step"] for s in record["sessions"]] == [0, 4]

  # The command again (a budget a few steps past the stop, to keep the test short): resumes there.
  done = _train(env, config, workdir, f"--config.train.steps={stopped + 3}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"complete: step {stopped + 3}/{stopped + 3}" in done.stdout
  record = json.load(open(os.path.join(workdir, "run.json")))
  assert [s["start_step"] for s in record["sessions"]] == [0, 4, stopped]
  steps = _steps(workdir)
  assert steps == sorted(set(steps)) and steps[-1] == stopped + 3  # no step logged twice

  # A budget the run has passed: nothing trained, the run directory untouched (its config.json was
  # rewritten with the lower budget, and the line said "loss nan").
  files = {n: open(os.path.join(workdir, n), "rb").read() for n in ("config.json", "run.json")}
  again = _train(env, config, workdir, f"--config.train.steps={stopped}")
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"complete: step {stopped + 3}/{stopped} (nothing to train" in again.stdout, again.stdout
  assert "nan" not in again.stdout
  assert files == {n: open(os.path.join(workdir, n), "rb").read() for n in files}

  # A broken latest checkpoint: one line naming the step and the flag, nothing from the storage library.
  last = stopped + 3
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", str(last), "state")):
    for name in files:
      if os.path.basename(root) == "d":  # the array data (OCDBT nodes), not the metadata
        with open(os.path.join(root, name), "r+b") as f:
          f.write(b"\x00" * 64)
  broken = _train(env, config, workdir, f"--config.train.steps={last + 2}")
  assert broken.returncode == 1, broken.stderr[-3000:]
  errors = [line for line in broken.stderr.splitlines() if line.startswith("error (")]
  assert len(errors) == 1 and f"step {last}" in errors[0] and "train.restore_fallback" in errors[0]
  assert len(errors[0]) < 400, errors[0]
  for noise in ("Traceback", "Event loop is closed", "tensorstore", "zarr", "OCDBT"):
    assert noise not in broken.stderr, broken.stderr[-3000:]

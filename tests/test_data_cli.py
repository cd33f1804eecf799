"""The data commands on the shared cli shell: --help, usage errors exit 2, bad data exits 1 with one line."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=120):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run(
    [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
  )


@pytest.mark.parametrize(
  "module,flag", [("llm_jax.data.prepare", "--workdir"), ("llm_jax.data.bench", "--skip_prepare")]
)
def test_help_and_usage_errors(module, flag):
  out = _run(module, "--help")  # (absl's --help exits 1; the shell in llm_jax/cli.py keeps that)
  assert flag in out.stdout and "--config" in out.stdout and "Traceback" not in out.stderr
  missing = _run(module)  # --config is required
  assert missing.returncode == 2 and "config" in missing.stderr
  typo = _run(module, "--config=configs/tiny.py", "--config.data.corpuss=x")
  assert typo.returncode == 2 and "corpuss" in typo.stderr


def test_bench_rejects_a_bad_shape_before_any_work():
  out = _run("llm_jax.data.bench", "--config=configs/tiny.py", "--shapes=128by16")
  assert out.returncode == 2 and "--shapes" in out.stderr and "128by16" in out.stderr

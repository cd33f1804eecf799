"""bench/gpu_common.sh's python_env: when the wheels in .whl/ still leave an import missing, it stops and
names the module instead of letting a device run fail halfway through a stage. And the device scripts'
settings that would otherwise fail halfway (bench/gpu_side_by_side.sh's PARITY_DEADLINE)."""

import os
import subprocess

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_common.sh")

# A stand-in interpreter: every import check fails on one module; `-m pip install` succeeds.
FAKE_PY = """#!/bin/sh
if [ "$1" = "-m" ]; then exit 0; fi
echo "Traceback (most recent call last):" >&2
echo "ModuleNotFoundError: No module named 'phonenumbers'" >&2
exit 1
"""


def test_python_env_stops_and_names_a_module_the_wheels_do_not_provide(tmp_path):
  py = tmp_path / "python"
  py.write_text(FAKE_PY)
  py.chmod(0o755)
  (tmp_path / ".whl").mkdir()
  (tmp_path / ".whl" / "grain-0-py3-none-any.whl").write_text("")
  env = {**os.environ, "PY": str(py), "OUT": str(tmp_path / "out")}
  cmd = f"source {os.path.abspath(SCRIPT)}; python_env; echo reached-the-stages"
  r = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 1, (r.stdout, r.stderr)
  assert "reached-the-stages" not in r.stdout
  assert "No module named 'phonenumbers'" in r.stderr and "fetch_wheels.sh" in r.stderr


def test_a_parity_deadline_that_is_not_whole_seconds_stops_the_script_at_once(tmp_path):
  """Seen before the check: bash's "[: 10m: integer expression expected" mid-run, the deadline ignored."""
  script = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_side_by_side.sh")
  env = {**os.environ, "PARITY_DEADLINE": "10m", "OUT": str(tmp_path / "out"), "PY": "/bin/false"}
  root = os.path.join(os.path.dirname(__file__), "..")
  r = subprocess.run(
    ["bash", script, "parity_seeds"], cwd=root, env=env, capture_output=True, text=True, timeout=60
  )
  assert r.returncode == 2, (r.stdout, r.stderr)
  assert "PARITY_DEADLINE=10m: expected whole seconds" in r.stderr
  assert not (tmp_path / "out").exists()  # nothing ran

"""`python -m llm_jax.serve` as users start it (a subprocess), and the load test against it."""

import asyncio
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import httpx
import pytest
from run_cmd import run_captured
from tiny_package import SERVER_CFG, write_tiny_package

from llm_jax.serve import loadtest

CFG = SERVER_CFG
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(d, log_name: str, *flags: str):
  """(process, url, saw_503): `python -m llm_jax.serve` over d/pkg on a free port, once /health is 200."""
  port = _free_port()
  env = dict(
    os.environ,
    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    XLA_FLAGS="",
    JAX_PLATFORMS="cpu",
  )
  with open(d / log_name, "w") as log:
    command = [sys.executable, "-m", "llm_jax.serve", f"--package={d / 'pkg'}", "--port", str(port)]
    proc = subprocess.Popen(
      [*command, *flags, f"--compile_cache={d / 'xla'}"],
      stdout=log,
      stderr=subprocess.STDOUT,
      env=env,
      cwd=ROOT,
    )
  url = f"http://127.0.0.1:{port}"
  saw_503 = False
  deadline = time.time() + 180
  while time.time() < deadline:
    if proc.poll() is not None:
      pytest.fail((d / log_name).read_text())
    try:
      code = httpx.get(f"{url}/health", timeout=2).status_code
    except httpx.TransportError:
      code = None
    saw_503 |= code == 503
    if code == 200:
      return proc, url, saw_503
    time.sleep(0.1)
  proc.kill()
  pytest.fail("server not healthy in 180 s:\n" + (d / log_name).read_text())


def _stop(proc) -> None:
  proc.terminate()
  try:
    proc.wait(timeout=15)
  except subprocess.TimeoutExpired:
    proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  d = tmp_path_factory.mktemp("cli")
  write_tiny_package(d, CFG)
  (d / "key").write_text("s" * 32 + "\n")
  proc, url, saw_503 = _start(
    d,
    "server.log",
    "--slots=4",
    "--max_concurrent=16",
    "--decode_chunk",
    "2",
    "--api_key_file",
    str(d / "key"),
    f"--audit_log={d / 'audit.jsonl'}",
    "--audit_max_bytes=1000000",
    "--audit_backups=2",
  )
  try:
    yield url, d, saw_503
  finally:
    _stop(proc)


def test_cli_starts_warm_and_answers(server):
  url, d, saw_503 = server
  text = (d / "server.log").read_text()
  assert "ready:" in text and "programs were built in" in text and "start-up" in text
  auth = {"Authorization": "Bearer " + "s" * 32}
  assert httpx.post(f"{url}/v1/completions", json={"prompt": "the"}).status_code == 401
  r = httpx.post(
    f"{url}/v1/completions",
    headers=auth,
    timeout=30,
    json={"prompt": "the cat", "max_tokens": 5, "temperature": 0},
  )
  assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
  assert text.index("engine process started") < text.index("listening on")
  del saw_503  # usually seen, but a fast machine may compile before the first poll
  assert f"compilation cache: {d / 'xla'}" in text and len(os.listdir(d / "xla")) >= 3


def _health_200s(url: str) -> float:
  """The server's count of GET /health answered 200 (/metrics)."""
  text = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer " + "s" * 32}, timeout=10).text
  line = next(
    x for x in text.splitlines() if x.startswith('llm_requests_total{route="/health",status="200"}')
  )
  return float(line.split()[-1])


@pytest.mark.parametrize("processes", [1, 2])
def test_loadtest_against_cli_server(server, processes):
  """The load test's summary, its 8 clients in one process or shared by two (one clock)."""
  url, d, _ = server
  (d / "loadkey").write_text("s" * 32)
  health_before = _health_200s(url)
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "llm_jax.serve.loadtest",
      "--url",
      url,
      "--concurrency",
      "8",
      "--requests=24",
      "--max_tokens",
      "8",
      "--json",
      "--api_key_file",
      str(d / "loadkey"),
      f"--processes={processes}",
    ],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=ROOT,
  )
  assert out.returncode == 0, out.stderr
  summary = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
  assert summary["ok"] == 24 and summary["errors"] == {}
  assert summary["output_tokens"] == 24 * 8
  assert summary["client_processes"] == processes and summary["client_cpu_s"] > 0
  assert summary["ttft_s"]["p50"] > 0 and summary["tpot_s"]["p99"] >= summary["tpot_s"]["p50"]
  slow = summary["slowest_ttft"]  # the three slowest first tokens, by request number
  assert len(slow) == 3 and {i for i, _ in slow} <= set(range(24))
  assert slow[0][1] == summary["ttft_s"]["p99"] and slow[0][1] >= slow[1][1] >= slow[2][1]
  # the slowest with the time to their first chunk (text or not), which never comes after the first text
  assert [r["index"] for r in summary["slowest"][:3]] == [i for i, _ in slow]
  assert all(0 < r["first_chunk"] <= r["ttft"] <= r["latency"] for r in summary["slowest"])
  assert summary["first_chunk_s"]["p50"] <= summary["ttft_s"]["p50"]
  lines = [json.loads(x) for x in (d / "audit.jsonl").read_text().splitlines()]
  assert sum(a["path"] == "/v1/completions" and a["status"] == 200 for a in lines) >= 24
  # the client's 8 connections opened before the clock started: one GET /health each
  assert _health_200s(url) - health_before == 8
  assert stat.S_IMODE((d / "audit.jsonl").stat().st_mode) == 0o600


def test_loadtest_refuses_other_hosts():
  for url in ("http://10.0.0.5:8000", "http://example.com", "ftp://127.0.0.1:1"):
    with pytest.raises(loadtest.LoadTestError):
      loadtest.check_loopback(url)
  assert loadtest.check_loopback("http://localhost:8000/") == "http://localhost:8000"
  assert loadtest.check_loopback("http://[::1]:8000") == "http://[::1]:8000"
  assert loadtest.percentiles([3.0, 1.0, 2.0, 4.0]) == {"p50": 2.0, "p90": 4.0, "p99": 4.0}


def test_loadtest_processes_count_every_failure():
  """Several client processes against a port nobody listens on: every request is counted once, as
  the error it met, and the auto count never exceeds the clients."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]  # closed again: nothing listens there
  out = asyncio.run(
    loadtest.run_load(f"http://127.0.0.1:{port}", concurrency=3, requests=7, processes=2, timeout_s=5)
  )
  assert out["client_processes"] == 2 and out["ok"] == 0
  assert out["errors"] == {"ConnectError": 7}
  assert loadtest.auto_processes(1) == 1 and 1 <= loadtest.auto_processes(32) <= 4


def _run(*args):
  env = dict(
    os.environ,
    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    XLA_FLAGS="",
    JAX_PLATFORMS="cpu",
  )
  return subprocess.run(
    [sys.executable, "-m", *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
  )


def test_the_command_line_leaves_the_web_stack_for_after_the_fork():
  """`python -m llm_jax.serve` forks the engine's process before it imports fastapi, uvicorn and the
  routes (the child loads the model meanwhile): importing the command line's module imports none of
  them. Its log shows the fork before the listening line (test_cli_starts_warm_and_answers's server)."""
  code = (
    "import sys, llm_jax.serve.__main__\n"
    "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'llm_jax.serve.app') if m in sys.modules))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]"


def test_usage_errors_exit_2_with_one_line(tmp_path, capsys):
  out = _run("llm_jax.serve.loadtest", "--url=http://192.168.1.1:80", "--requests=1")
  assert out.returncode == 2 and "loopback" in out.stderr and "Traceback" not in out.stderr
  out = run_captured(capsys, "llm_jax.serve", f"--package={tmp_path / 'missing'}")
  assert out.returncode == 2 and "missing" in out.stderr and "Traceback" not in out.stderr
  out = run_captured(capsys, "llm_jax.serve", f"--package={tmp_path}", "--slots=0")
  assert out.returncode == 2 and "slots" in out.stderr
  out = _run("llm_jax.serve", "--help")  # (absl exits 1 after --help; in-process, --help is gone)
  assert "--audit_max_bytes" in out.stdout and "--max_concurrent" in out.stdout


def test_the_server_exits_when_its_engine_process_dies(server):
  """The command line's default: the engine forked into its own process. Killed, the server exits with
  status 1 and names the exit in its last line."""
  _, d, _ = server
  proc, url, _ = _start(
    d, "dying.log", "--slots=2", "--decode_chunk=2", "--audit_log", str(d / "dying.jsonl")
  )
  try:
    found = re.search(r"engine process started \(pid (\d+), fork\)", (d / "dying.log").read_text())
    assert found, (d / "dying.log").read_text()
    os.kill(int(found.group(1)), signal.SIGKILL)
    assert proc.wait(timeout=60) == 1
    text = (d / "dying.log").read_text()
    assert "the engine process exited (exit code -9)" in text.splitlines()[-1], text[-2000:]
  finally:
    if proc.poll() is None:
      _stop(proc)

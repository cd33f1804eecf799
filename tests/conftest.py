"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

# Tests compile many small programs and run each briefly: LLVM's optimization of the CPU code is much
# of a compile and buys nothing here. Level 1, not 0: at level 0 XLA's CPU runtime aborted the process
# in 2 of 9 runs of tests/test_encoder.py::test_classifier_learns_a_separable_set (0 of 6 at the
# default level, 0 of 10 at level 1). test_step.py: 79 s at level 1, 132 s at the default. Fusion
# emitters off: XLA:CPU emits its fusions straight to LLVM IR, not through its MLIR emitters
# (test_speculative.py + test_model.py: 151 s against 179 s, one VM, back to back). The commands
# tests start inherit the flags.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "")
  + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1"
  + " --xla_cpu_use_fusion_emitters=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import shutil
import tempfile

# One compilation cache for the whole run, in a temporary folder of its own (never the user's
# ~/.cache/llm_jax): tests and the commands they start compile the same tiny programs again and again
# (a resumed run, the reference run beside a two-process one, a second server). pytest's first process
# makes the folder before it starts xdist's workers, which inherit the variables; it removes the folder
# at the end. Every program is kept, however quick to compile: 12% off four in-process test files.
_OWN_CACHE = "LLM_JAX_CACHE" not in os.environ
if _OWN_CACHE:
  os.environ["LLM_JAX_CACHE"] = tempfile.mkdtemp(prefix="llm_jax_tests_")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["LLM_JAX_CACHE"], "jax_compile"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(os.environ["LLM_JAX_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def devices():
  import jax

  assert jax.device_count() == 8, jax.devices()
  return jax.devices()


@pytest.fixture(scope="module")
def short_spans():
  """Decode cache spans from 8 positions (not 128): with a 32-position test model the server's all-rows
  program is built for spans 8, 16 and the whole cache, so requests cross span buckets as they decode."""
  from llm_jax.generate import decode  # after the device flags above are set

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(decode, "MIN_SPAN", 8)  # decode_span reads the decode module's own name
    yield

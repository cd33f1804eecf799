"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

# Tests compile many small programs and run each briefly: LLVM's optimization of the CPU code is much
# of a compile and buys nothing here. Level 1, not 0: at level 0 XLA's CPU runtime aborted the process
# in 2 of 9 runs of tests/test_encoder.py::test_classifier_learns_a_separable_set (0 of 6 at the
# default level, 0 of 10 at level 1). test_step.py: 79 s at level 1, 132 s at the default. The
# commands tests start inherit both flags.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "")
  + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest


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

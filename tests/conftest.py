import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight fake CPU devices for the sharded tests; single-device code runs on the first.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
# The tests' programs are small and many: compiling them is most of the suite's time, and
# LLVM's optimisation of the CPU code costs more than it saves (with it off, five of the
# slowest tests ran 17-27% faster on 2 cores, seventh session). Subprocesses inherit it.
FAST_COMPILE = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + FAST_COMPILE


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a subprocess with `devices` fake CPU devices (and the fast compile)."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"

# No persistent compilation cache for the test processes: an xdist worker once died in
# XLA's deserialization of a cached CPU executable (`compilation_cache.
# get_executable_and_time`, a segfault, seventeenth session's repeated runs), and on
# 2 cores the cache saved ~0% (test_generate, test_model) to ~7% (test_train). The tests
# that run train.py in subprocesses keep a cache of their own for those runs.

import jax  # noqa: E402

# Computations on the CPU run inline, not queued. The Pallas GPU interpreter runs a kernel's
# threads as nested computations from inside the kernel's own (io_callback), and XLA:CPU
# admits a bounded number of computations in flight per device: with asynchronous dispatch
# the test's next operations (queued behind the interpreted kernel) can fill that bound,
# and the interpreter's next nested computation then waits for a slot that only its own
# kernel's end would free: a deadlock (gdb: `xla::Semaphore::ScopedAcquire` in
# `CpuPjRtRawLoadedExecutable::Execute`; eighteenth session: `pytest -n 2 --count=6
# tests/test_sparse_attention.py -k kernel_interpreted_equals_reference` hung in 2 of 2
# runs, and passed 30 of 30 with this). The flag has no environment variable; it must be
# set before the CPU backend starts.
jax.config.update("jax_cpu_enable_async_dispatch", False)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng(request):
  """Fresh random inputs every run; the seed is printed on failure. To reproduce a failure,
  rerun with MOHGE_TEST_SEED=<seed>."""
  seed = int(os.environ.get("MOHGE_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
  request.node.user_properties.append(("seed", seed))
  print(f"random seed: {seed}")
  return np.random.default_rng(seed)

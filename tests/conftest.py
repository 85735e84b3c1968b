import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight fake CPU devices for the sharded tests; single-device code runs on the first.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import numpy as np
import pytest


@pytest.fixture
def rng(request):
  """Fresh random inputs every run; the seed is printed on failure. To reproduce a failure,
  rerun with MOHGE_TEST_SEED=<seed>."""
  seed = int(os.environ.get("MOHGE_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
  request.node.user_properties.append(("seed", seed))
  print(f"random seed: {seed}")
  return np.random.default_rng(seed)

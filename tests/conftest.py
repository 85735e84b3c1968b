import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest


@pytest.fixture
def rng(request):
  """Fresh random inputs every run; the seed is printed on failure to reproduce."""
  seed = int.from_bytes(os.urandom(4), "little")
  request.node.user_properties.append(("seed", seed))
  print(f"random seed: {seed}")
  return np.random.default_rng(seed)

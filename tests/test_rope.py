"""mohge_jax.rope: the rotation is relative (scores depend on position differences only),
and YaRN keeps high frequencies, interpolates low ones and scales the scores."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from mohge_jax import rope
from mohge_jax.config import load_config


def test_rope_rotation_is_relative(rng):
  m = load_config(None, []).model
  inv = rope.rope_inv_freq(m, 16)[0]
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  def score(pq, pk):
    return float(jnp.sum(rope.apply_rope(q, jnp.array([[pq]]), inv)
                         * rope.apply_rope(k, jnp.array([[pk]]), inv)))
  # Absolute tolerance in units of |q||k| (the score's scale): a score near 0 made a
  # relative one fail on float32 rounding of the rotation angles.
  scale = float(jnp.linalg.norm(q) * jnp.linalg.norm(k))
  assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-5 * scale)


def test_yarn_frequencies_and_scale():
  m = load_config("configs/mohge_3b.yaml").model
  plain = rope.rope_inv_freq(load_config(None, []).model, 64)[0]
  inv, mscale2 = rope.rope_inv_freq(m, 64)
  assert mscale2 == pytest.approx((0.1 * 0.707 * math.log(40) + 1) ** 2)
  np.testing.assert_allclose(inv[:4], plain[:4])  # high frequencies kept
  np.testing.assert_allclose(inv[-4:], plain[-4:] / 40)  # low frequencies interpolated
  assert np.all(np.diff(inv) < 0)

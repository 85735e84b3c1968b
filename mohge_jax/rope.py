"""Rotary position embeddings: inverse frequencies (with DeepSeek-V2's YaRN extension) and
the rotation itself. Used by attention (MLA, MHA) and by DSA's lightning indexer."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mohge_jax.config import ModelConfig


def _yarn_mscale(factor: float, mscale: float) -> float:
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq(m: ModelConfig, dim: int) -> tuple[np.ndarray, float]:
  """Inverse frequencies [dim/2] and the attention-score multiplier (YaRN's mscale^2)."""
  base = m.rope_theta
  inv_freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  if m.rope_scaling == "none":
    return inv_freq, 1.0
  # DeepSeek-V2 YaRN: interpolate low frequencies by `factor`, keep high ones (linear ramp
  # between the dims that rotate beta_fast and beta_slow times over the original context).
  def correction_dim(rotations: float) -> float:
    return dim * math.log(m.yarn_original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low = max(math.floor(correction_dim(m.yarn_beta_fast)), 0)
  high = min(math.ceil(correction_dim(m.yarn_beta_slow)), dim - 1)
  ramp = (np.arange(dim // 2, dtype=np.float64) - low) / max(high - low, 1e-3)
  keep = 1.0 - np.clip(ramp, 0.0, 1.0)  # 1: extrapolate (keep), 0: interpolate
  inv_freq = inv_freq / m.yarn_factor * (1 - keep) + inv_freq * keep
  cos_sin_scale = (_yarn_mscale(m.yarn_factor, m.yarn_mscale)
                   / _yarn_mscale(m.yarn_factor, m.yarn_mscale_all_dim))
  if abs(cos_sin_scale - 1.0) > 1e-12:
    raise NotImplementedError("yarn_mscale != yarn_mscale_all_dim is not supported")
  return inv_freq, _yarn_mscale(m.yarn_factor, m.yarn_mscale_all_dim) ** 2


def apply_rope(x_BxLxHxR: jax.Array, positions_BxL: jax.Array, inv_freq) -> jax.Array:
  """Rotate halves: pairs (i, i + R/2), in float32."""
  angles_BxLxR2 = positions_BxL[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
  cos, sin = jnp.cos(angles_BxLxR2)[:, :, None, :], jnp.sin(angles_BxLxR2)[:, :, None, :]
  x1, x2 = jnp.split(x_BxLxHxR.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxR.dtype)
